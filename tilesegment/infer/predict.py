"""Predict one batch of tiles: uint8 pixels in, class probabilities out. Pure, no I/O.

A :class:`Predictor` owns one model copy on one device. It is not thread-safe (one caller per
predictor); every worker makes its own with :func:`make_predictor` (channels-last, pinned
staging on CUDA, ``torch.compile`` with an eager fallback). With test-time augmentation
(``tta``) it averages the softmax probabilities of each tile over flips and 90° rotations
(:data:`~tilesegment.geometry.TTA_MODES`, where the argument that tiles still equal the
whole-image pass is written down); every path that predicts (in-process, worker pool, dask,
``predict``, ``evaluate``) goes through it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

import numpy as np
import torch

from tilesegment.errors import ConfigError, ModelError
from tilesegment.geometry import PAD_MODE, Symmetry, tta_symmetries, whole_image_padding
from tilesegment.model.checkpoint import ModelSpec
from tilesegment.model.unet import UNet

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]

#: ITU-R BT.601 luma weights, used when a grayscale model meets an RGB image.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_model_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Convert (..., C) uint8 pixels to the model's channel count (1 or 3).

    Gray → RGB repeats the channel; RGB → gray takes BT.601 luma (rounded).
    """
    c = pixels.shape[-1]
    if c == channels:
        return pixels
    if c == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = pixels.astype(np.float32) @ _LUMA
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    raise ConfigError(f"cannot convert {c}-channel pixels to the model's {channels} channels")


class Predictor:
    """Runs a U-Net on batches of mirror-padded uint8 tiles on one device.

    Parameters
    ----------
    model : UNet
        The network (moved to ``device`` and set to eval mode here).
    spec : ModelSpec
        Input normalisation and channel order.
    device : str or torch.device
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype for the forward pass; fp32 disables autocast. fp16 is CUDA-only.
    channels_last : bool
        Use the channels-last memory format (faster convolutions on CPU and tensor cores).
    tta : {"none", "flips", "d4"}
        Test-time augmentation: average the probabilities of 1, 4 or 8 forward passes of each
        batch, transformed by the symmetries of :data:`~tilesegment.geometry.TTA_MODES` and
        transformed back, summed in that order (so the same on every path), then divided by
        their number (a power of two: exact).
    """

    def __init__(
        self,
        model: UNet,
        spec: ModelSpec,
        *,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        channels_last: bool = True,
        tta: str = "none",
    ) -> None:
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("`precision` fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.precision = precision
        self.spec = spec
        self.tta = tta
        self.symmetries = tta_symmetries(tta)
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        #: uint8 (N, H, W, C) tiles -> (N, classes, h, w) float32 softmax: what ``make_predictor``
        #: compiles, so normalisation and softmax fuse with the network's first and last ops.
        self.forward = TileNetwork(self.model, spec.mean, spec.std, self.device, dtype)

    @property
    def halo(self) -> int:
        return self.model.halo

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch.

        Parameters
        ----------
        batch : (N, H, W, C) uint8 ndarray
            Mirror-padded input tiles with H and W valid input sizes and C the model's channels.

        Returns
        -------
        (N, classes, H - 2·halo, W - 2·halo) float32 ndarray
            Softmax probabilities.
        """
        return self.probabilities(batch).cpu().numpy()

    @torch.inference_mode()
    def probabilities(self, batch: np.ndarray) -> torch.Tensor:
        """Like ``__call__`` but returns the (float32, CPU or device) tensor."""
        if batch.ndim != 4 or batch.dtype != np.uint8:
            raise ConfigError(f"batch must be (N, H, W, C) uint8, got {batch.shape} {batch.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        probs = self._softmax(x, self.symmetries[0])
        for symmetry in self.symmetries[1:]:
            probs += self._softmax(x, symmetry)
        if len(self.symmetries) > 1:
            probs /= len(self.symmetries)
        # Softmax values lie in [0, 1] or are NaN (inf logits give NaN), so the sum is finite
        # unless one is NaN: one reduction, 0.04 ms against ~700 ms for a 572 px fp32 forward pass
        # of the default model on the 2-core CPU.
        if not probs.sum().isfinite():
            raise ModelError(
                f"model {self.spec.name!r} produced NaN or inf values ({self.precision} on "
                f"{self.device}): its checkpoint is broken or the input is out of the range its "
                "weights can handle; check the model on known images with `tilesegment evaluate`"
            )
        return probs

    def _softmax(self, x: torch.Tensor, symmetry: Symmetry) -> torch.Tensor:
        """Softmax of the model on uint8 (N, H, W, C) ``x`` transformed by ``symmetry``,
        transformed back to (N, classes, h, w)."""
        if symmetry.flip_axes or symmetry.transpose:  # on the uint8 tiles: 4x less to move
            if symmetry.flip_axes:  # (N, C, H, W) axes -2, -1 are (N, H, W, C) axes 1, 2
                x = torch.flip(x, [a - 1 for a in symmetry.flip_axes])
            if symmetry.transpose:
                x = x.transpose(1, 2)
            x = x.contiguous()
        probs = self.forward(x)
        if symmetry.transpose:
            probs = probs.transpose(-2, -1)
        if symmetry.flip_axes:
            probs = torch.flip(probs, symmetry.flip_axes)
        return probs.contiguous()


class TileNetwork(torch.nn.Module):
    """The network between uint8 tiles and class probabilities: scale to [0, 1], normalise
    per channel, run ``model`` (under autocast when ``dtype`` is given), softmax in float32.

    Normalisation happens in the tiles' own (N, H, W, C) layout (each op one contiguous pass,
    the channels broadcast over the last axis) and the (N, C, H, W) view of that memory is
    already channels-last. As one module it compiles into one graph, so the element-wise ops
    fuse instead of costing a pass each (~8 % of a worker's time on a CPU when they did not).
    """

    def __init__(self, model, mean, std, device: torch.device, dtype) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, device=device), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, device=device), persistent=False)
        self.device_type = device.type
        self.dtype = dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the forward pass (none in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mul_(1.0 / 255.0).sub_(self.mean).mul_(self.inv_std)
        x = x.permute(0, 3, 1, 2)  # (N, C, H, W) view of channels-last memory
        with self.autocast():
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1)


def predict_image(image: np.ndarray, predictor: Predictor) -> np.ndarray:
    """Whole-image pass: mirror-pad by the halo (plus bottom/right to a valid size), run the
    network once and crop back. The reference every tiled path must reproduce.

    With a test-time augmenting ``predictor`` each symmetry transforms the whole *padded*
    image, as it transforms each tile on the tiled paths (the definition of
    :data:`~tilesegment.geometry.TTA_MODES`).

    Parameters
    ----------
    image : (H, W, C) uint8 ndarray

    Returns
    -------
    (classes, H, W) float32 ndarray
    """
    if image.ndim == 2:
        image = image[..., None]
    image = to_model_channels(image, predictor.spec.unet.in_channels)
    net = predictor.model
    residue = net.output_size(net.valid_input_sizes(1)[0]) % net.pooling
    pads = whole_image_padding(image.shape[:2], halo=net.halo, pooling=net.pooling, residue=residue)
    padded = np.pad(image, (*pads, (0, 0)), mode=PAD_MODE)
    probs = predictor(padded[None])[0]
    return probs[:, : image.shape[0], : image.shape[1]]


class PinnedPredictor(Predictor):
    """A CUDA predictor that stages each uint8 batch in one reused page-locked host buffer, so
    the host-to-device copy is a DMA that does not block the host.

    The buffer is overwritten only after the previous batch's work on the device is done
    (an event recorded after it is synchronised first), so reuse is safe whoever calls.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._staging = None
        self._in_use = None

    def probabilities(self, batch: np.ndarray):
        import torch

        if self._in_use is not None:
            self._in_use.synchronize()
        if self._staging is None or self._staging.numel() < batch.size:
            self._staging = torch.empty(batch.size, dtype=torch.uint8).pin_memory()
        view = self._staging[: batch.size].view(batch.shape).numpy()
        np.copyto(view, batch)
        out = super().probabilities(view)
        self._in_use = torch.cuda.Event()
        self._in_use.record()
        return out


def make_predictor(
    net, spec, device: str, precision: str, *, compile: bool = False, tta: str = "none"
) -> Predictor:
    """The predictor a worker uses on ``device`` (channels-last; pinned staging on CUDA), with
    test-time augmentation ``tta`` (see :class:`Predictor`)."""
    import torch

    if device.startswith("cuda"):
        # Make it the current device, so that pinned buffers, events and streams belong to it
        # (not to cuda:0 in every worker).
        torch.cuda.set_device(device)
    cls = PinnedPredictor if device.startswith("cuda") else Predictor
    predictor = cls(net, spec, device=device, precision=precision, channels_last=True, tta=tta)
    if compile:
        predictor.forward = CompiledOrEager(predictor.forward)
    return predictor


class CompiledOrEager:
    """A model behind ``torch.compile`` that falls back to eager mode for good when compiling
    or running the compiled graph raises (no C++ compiler, an op inductor cannot lower...).

    Attribute access reaches the model (``halo``, ``output_size``...), as with
    ``torch.compile``'s own wrapper. Compilation happens at the first call, per input shape.
    """

    def __init__(self, model) -> None:
        import torch

        self.eager = model
        self.compiled = torch.compile(model)
        self.failed: str | None = None

    def __call__(self, x):
        import torch

        if self.failed is None:
            try:
                return self.compiled(x)
            except torch.OutOfMemoryError:
                raise  # the batch is halved by the caller; compiling is not to blame
            except Exception as exc:  # any failure of the compiler stack
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.failed = f"{type(exc).__name__}: {first}"
                log.warning("torch.compile failed (%s); running the model eagerly", self.failed)
        return self.eager(x)

    def __getattr__(self, name: str):
        if name in ("eager", "compiled", "failed"):  # not set yet (unpickling, __init__)
            raise AttributeError(name)
        return getattr(self.eager, name)
