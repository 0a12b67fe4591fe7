"""A U-Net with *valid* convolutions (Ronneberger et al. 2015) that knows its own geometry.

Every 3×3 convolution is unpadded, so each output pixel depends on a fixed input window and a
tile's output equals the whole-image output wherever they overlap, provided tile origins keep the
pooling phase (multiples of ``2**depth``). Its halo and valid sizes come from
:class:`tilesegment.geometry.UNetGeometry` (the same layer arithmetic, without the module).

>>> net = UNet(UNetConfig(depth=4, base_channels=8))
>>> net.halo, net.pooling, net.output_size(572), net.input_size(388)
(92, 16, 388, 572)
>>> net.valid_input_sizes(3)
[188, 204, 220]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from tilesegment.errors import ConfigError
from tilesegment.geometry import UNetGeometry

Upsampling = Literal["transpose", "bilinear"]


@dataclass(frozen=True, slots=True)
class UNetConfig:
    """Architecture of a valid U-Net (everything needed to rebuild it from a checkpoint)."""

    depth: int = 4
    """Number of 2×2 poolings; the pooling factor is ``2**depth``."""
    base_channels: int = 64
    """Feature channels at the first level; doubled at every level down."""
    in_channels: int = 3
    """Input image channels (3 for RGB, 1 for grayscale)."""
    classes: int = 2
    """Output classes (logits per pixel)."""
    batch_norm: bool = False
    """Batch normalisation after every convolution."""
    dropout: float = 0.0
    """Dropout probability at the bottom of the network (the paper's 'drop-out layers at the end
    of the contracting path'); 0 disables it."""
    upsampling: Upsampling = "transpose"
    """``"transpose"``: 2×2 up-convolution (the paper). ``"bilinear"``: bilinear ×2 followed by a
    1×1 convolution, with the 1 px border that sees the upsampler's edge clamping cropped off."""

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 7:
            raise ConfigError(f"`depth` ({self.depth}) must be between 1 and 7")
        for name in ("base_channels", "in_channels", "classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` ({getattr(self, name)}) must be >= 1")
        if self.classes < 2:
            raise ConfigError(f"`classes` ({self.classes}) must be >= 2 (softmax over classes)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` ({self.dropout}) must be in [0, 1)")
        if self.upsampling not in ("transpose", "bilinear"):
            raise ConfigError(
                f"`upsampling` ({self.upsampling!r}) must be 'transpose' or 'bilinear'"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (cin, cout):
        layers.append(nn.Conv2d(c_in, cout, 3, padding=0, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    """×2 up-sampling halving the channels; ``crop`` px per side are invalid and removed."""

    def __init__(self, cin: int, cout: int, mode: Upsampling) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.conv = nn.ConvTranspose2d(cin, cout, 2, stride=2)
            self.crop = 0
        else:
            self.conv = nn.Conv2d(cin, cout, 1)
            self.crop = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.conv(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        c = self.crop
        return self.conv(x[..., c:-c, c:-c])


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dy = (x.shape[-2] - h) // 2
    dx = (x.shape[-1] - w) // 2
    return x[..., dy : dy + h, dx : dx + w]


class UNet(nn.Module):
    """Valid-convolution U-Net: (N, C, H, W) → logits (N, classes, H - 2·halo, W - 2·halo).

    Inputs must have a valid size on both axes (see :meth:`valid_input_sizes`); other sizes raise
    :class:`~tilesegment.errors.ConfigError` naming the nearest valid ones.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config.base_channels
        chans = [c * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        cin = config.in_channels
        for ch in chans[:-1]:
            self.down.append(_double_conv(cin, ch, config.batch_norm))
            cin = ch
        self.bottom = _double_conv(chans[-2], chans[-1], config.batch_norm)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for i in range(config.depth, 0, -1):
            self.ups.append(_Up(chans[i], chans[i - 1], config.upsampling))
            self.up_convs.append(_double_conv(2 * chans[i - 1], chans[i - 1], config.batch_norm))
        self.head = nn.Conv2d(chans[0], config.classes, 1)
        self.geometry = UNetGeometry.of(config.depth, config.upsampling)
        self.halo = self.geometry.halo
        self._init_weights()

    # ------------------------------------------------------------------ geometry
    # The size arithmetic lives in tilesegment.geometry (pure, no nn.Module); these delegate.
    @property
    def pooling(self) -> int:
        """Total pooling factor ``2**depth``: valid sizes and tile origins step by it."""
        return self.geometry.pooling

    def is_valid_input(self, n: int) -> bool:
        return self.geometry.is_valid_input(n)

    def valid_input_sizes(self, count: int, start: int = 0) -> list[int]:
        return self.geometry.valid_input_sizes(count, start)

    def nearest_valid_inputs(self, n: int) -> tuple[int, ...]:
        return self.geometry.nearest_valid_inputs(n)

    def check_input_size(self, n: int, *, name: str = "input size") -> None:
        self.geometry.check_input_size(n, name=name)

    def output_size(self, input_size: int) -> int:
        return self.geometry.output_size(input_size)

    def input_size(self, output_size: int) -> int:
        return self.geometry.input_size(output_size)

    # ------------------------------------------------------------------ network
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                # He initialisation, as the paper recommends for ReLU networks.
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in x.shape[-2:]:
            self.check_input_size(int(n))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.bottom(x))
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips), strict=True):
            x = up(x)
            x = conv(torch.cat([_center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1))
        return self.head(x)
