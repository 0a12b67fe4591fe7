"""Checkpoints: ``NAME.safetensors`` (weights) + ``NAME.json`` (everything else). Never pickled.

The JSON config carries the architecture, the class names and colours, the input channel order
and normalisation, the µm/px the model expects and the training provenance::

    {
      "format": "tilesegment-model", "format_version": 1, "name": "nuclei-he",
      "architecture": {"type": "valid-unet", "depth": 4, "base_channels": 16, ...},
      "classes": {"names": ["background", "nucleus"], "colours": [[0,0,0,0], [255,0,0,255]]},
      "input": {"channel_order": "RGB", "mean": [..], "std": [..]},
      "mpp": 0.25, "halo": 92, "valid_input_sizes": "188 + 16k",
      "downsample": 3.0,
      "instances": {"interior": 1, "boundary": 2, "max_growth_px": 8, "min_seed_px": 4},
      "weights_sha256": "...", "training": {...}
    }

``instances`` is optional (see :class:`InstanceSpec`): a model that predicts a nucleus
interior and a nucleus boundary class names them there, and its instances are its interior
components grown into the nucleus region (:mod:`tilesegment.postprocess.seeded`). Without it,
instances are the connected components of class 1.

``downsample`` is optional too, for models of images without a µm/px (PNG/JPEG tutorials'
data): ``F > 1`` means the network sees every image shrunk by ``F`` (``train --downsample``;
``run``, ``predict`` and ``evaluate`` shrink it with the kernel of
:mod:`tilesegment.io.resample` and bring the outputs back to the image's own grid). Absent or
null means 1. A model declares ``mpp`` or ``downsample``, never both: the first fixes the
scale by micrometres, the second by pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tilesegment.errors import ModelError
from tilesegment.instances import InstanceSpec
from tilesegment.model.unet import UNet, UNetConfig

log = logging.getLogger(__name__)

FORMAT = "tilesegment-model"
FORMAT_VERSION = 1

#: Default class colours (RGBA) when a checkpoint names none: transparent background, then a
#: qualitative palette.
DEFAULT_COLOURS = (
    (0, 0, 0, 0),
    (230, 25, 75, 255),
    (60, 180, 75, 255),
    (0, 130, 200, 255),
    (245, 130, 48, 255),
    (145, 30, 180, 255),
    (70, 240, 240, 255),
    (240, 50, 230, 255),
)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything about a model except its weights."""

    name: str
    """Short name (the checkpoint's file stem)."""
    unet: UNetConfig
    """Architecture."""
    class_names: tuple[str, ...]
    """One name per output class; class 0 is background."""
    class_colours: tuple[tuple[int, int, int, int], ...]
    """RGBA colour per class, for label metadata and previews."""
    channel_order: str = "RGB"
    """``"RGB"`` or ``"L"`` (grayscale); images with other channel counts are converted."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel mean of pixel / 255 subtracted before the network."""
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    """Per-channel standard deviation that pixel / 255 - mean is divided by."""
    mpp: float | None = None
    """µm per pixel the model was trained at, or None if resolution-agnostic."""
    training: dict[str, Any] = field(default_factory=dict, compare=False)
    """Provenance: data, command, metrics, licence terms. Informational only."""
    instances: InstanceSpec | None = None
    """Interior and boundary classes for seeded instances; None: components of class 1."""
    downsample: float | None = None
    """Image px per network px (> 1) of a model without ``mpp``: the network sees images
    shrunk by this factor and its outputs are brought back to the image's grid; None: 1."""

    def __post_init__(self) -> None:
        n = self.unet.classes
        if self.downsample is not None:  # frozen: an int 3 is kept as 3.0
            object.__setattr__(self, "downsample", _check_downsample(self))
        if (
            self.instances is not None
            and max(self.instances.interior, self.instances.boundary) >= n
        ):
            raise ModelError(
                f"model {self.name!r}: instances {self.instances.to_json()} name a class "
                f"beyond its {n} classes"
            )
        if len(self.class_names) != n or len(self.class_colours) != n:
            raise ModelError(
                f"model {self.name!r}: {n} classes but {len(self.class_names)} names and "
                f"{len(self.class_colours)} colours"
            )
        c = self.unet.in_channels
        if len(self.mean) != c or len(self.std) != c:
            raise ModelError(
                f"model {self.name!r}: {c} input channels but mean/std of length "
                f"{len(self.mean)}/{len(self.std)}"
            )
        if self.channel_order not in ("RGB", "L"):
            raise ModelError(
                f"model {self.name!r}: channel_order {self.channel_order!r} must be 'RGB' or 'L'"
            )
        if (self.channel_order == "RGB") != (c == 3):
            raise ModelError(
                f"model {self.name!r}: channel_order {self.channel_order!r} does not match "
                f"{c} input channels"
            )

    @classmethod
    def default(
        cls, unet: UNetConfig, *, name: str = "model", mpp: float | None = None
    ) -> ModelSpec:
        """A spec with generic class names/colours and neutral normalisation."""
        names = ("background", *(f"class{i}" for i in range(1, unet.classes)))
        cycle = len(DEFAULT_COLOURS) - 1  # background's colour is never reused
        colours = (
            DEFAULT_COLOURS[0],
            *(DEFAULT_COLOURS[1 + (i - 1) % cycle] for i in range(1, unet.classes)),
        )
        order = "RGB" if unet.in_channels == 3 else "L"
        if unet.in_channels not in (1, 3):
            raise ModelError(f"`in_channels` ({unet.in_channels}) must be 1 (gray) or 3 (RGB)")
        c = unet.in_channels
        return cls(name, unet, names, colours, order, (0.5,) * c, (0.25,) * c, mpp)

    def to_json(self, *, weights_sha256: str | None = None) -> dict[str, Any]:
        arch = {"type": "valid-unet", **self.unet.to_dict()}
        halo, valid_sizes = _geometry(self.unet)
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "architecture": arch,
            "classes": {
                "names": list(self.class_names),
                "colours": [list(c) for c in self.class_colours],
            },
            "input": {
                "channel_order": self.channel_order,
                "mean": list(self.mean),
                "std": list(self.std),
                "scale": 255,
            },
            "mpp": self.mpp,
            "halo": halo,
            "valid_input_sizes": valid_sizes,
            "training": self.training,
        }
        if self.instances is not None:
            doc["instances"] = self.instances.to_json()
        if self.downsample is not None:  # absent = 1, as in configs written before it existed
            doc["downsample"] = self.downsample
        if weights_sha256 is not None:
            doc["weights_sha256"] = weights_sha256
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, source: Path) -> ModelSpec:
        try:
            if doc.get("format") != FORMAT:
                raise ModelError(f"{source}: not a tilesegment model config (format field)")
            if int(doc.get("format_version", 0)) > FORMAT_VERSION:
                raise ModelError(
                    f"{source}: format_version {doc['format_version']} is newer than this "
                    f"tilesegment understands ({FORMAT_VERSION}); upgrade tilesegment"
                )
            arch = dict(doc["architecture"])
            if arch.pop("type", "valid-unet") != "valid-unet":
                raise ModelError(f"{source}: unsupported architecture type")
            unet = UNetConfig(**arch)
            inp = doc["input"]
            return cls(
                name=str(doc.get("name", source.stem)),
                unet=unet,
                class_names=tuple(doc["classes"]["names"]),
                class_colours=tuple(tuple(int(v) for v in c) for c in doc["classes"]["colours"]),
                channel_order=inp["channel_order"],
                mean=tuple(float(v) for v in inp["mean"]),
                std=tuple(float(v) for v in inp["std"]),
                mpp=None if doc.get("mpp") is None else float(doc["mpp"]),
                training=dict(doc.get("training", {})),
                instances=(
                    None
                    if doc.get("instances") is None
                    else InstanceSpec.from_json(doc["instances"], source=str(source))
                ),
                downsample=_downsample_from_json(doc.get("downsample"), source),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"{source}: malformed model config ({exc})") from exc


def _check_downsample(spec: ModelSpec) -> float:
    """``spec.downsample`` as a float, after checking it is > 1 and alone (no ``mpp``)."""
    value = spec.downsample
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 1):  # type: ignore[arg-type]
        raise ModelError(
            f"model {spec.name!r}: downsample ({value!r}) must be a number > 1 (or null for 1)"
        )
    if spec.mpp is not None:
        raise ModelError(
            f"model {spec.name!r} declares both mpp ({spec.mpp}) and downsample ({value}); a "
            "model is scaled by one of them: drop one from its JSON"
        )
    return float(value)  # type: ignore[arg-type]


def _downsample_from_json(value: Any, source: Path) -> float | None:
    """``downsample`` of a config: None for absent, null or 1; else a float > 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{source}: downsample ({value!r}) must be a number > 1 or null")
    return None if value == 1 else float(value)


def _geometry(cfg: UNetConfig) -> tuple[int, str]:
    net = UNet(cfg)
    lo = net.valid_input_sizes(1)[0]
    return net.halo, f"{lo} + {net.pooling}k"


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) paths for ``NAME``, ``NAME.json`` or ``NAME.safetensors``."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model: UNet, spec: ModelSpec, path: str | Path) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json``; returns both paths.

    Weights are written first and the JSON (which records their SHA-256) last, each through a
    temporary file renamed into place, so a crash never leaves a config pointing at bad weights.
    """
    weights, config = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp_w = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": FORMAT, "name": spec.name})
    tmp_w.replace(weights)
    doc = spec.to_json(weights_sha256=file_sha256(weights))
    tmp_c = config.with_name(config.name + ".tmp")
    tmp_c.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_c.replace(config)
    return weights, config


#: File signatures of model files that are not tilesegment checkpoints: (magic, what it is).
_FOREIGN_FORMATS = (
    (b"PK\x03\x04", "a torch.save file, i.e. a zip archive of pickles"),
    (b"\x80", "a Python pickle, e.g. an old-style torch.save file"),
    (b"\x89HDF", "an HDF5 file, e.g. a Keras model"),
)


def not_a_checkpoint(path: str | Path) -> ModelError | None:
    """The error for ``path`` if it is an existing file other than ``NAME.json`` or
    ``NAME.safetensors`` (a ``.pt``/``.pth``/``.ckpt`` file, say), naming what it looks like
    and how to convert it; None otherwise."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors") or not p.is_file():
        return None
    try:
        with p.open("rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    what = next((w for magic, w in _FOREIGN_FORMATS if head.startswith(magic)), "")
    what = what or f"a {p.suffix or 'suffix-less'} file of another format"
    return ModelError(
        f"{p}: not a tilesegment checkpoint ({what}); tilesegment reads only NAME.safetensors "
        "+ NAME.json and never unpickles a file: convert it once with save_checkpoint, as shown "
        "under 'Converting a PyTorch checkpoint' in the README, or create a new one with "
        "`tilesegment model init`"
    )


def load_spec(path: str | Path) -> ModelSpec:
    """Read only the JSON config of a checkpoint."""
    _, config = checkpoint_paths(path)
    foreign = not_a_checkpoint(path)
    if foreign is not None:
        raise foreign
    if not config.is_file():
        raise ModelError(
            f"{config}: model config not found; a checkpoint is NAME.json + NAME.safetensors "
            "(create one with `tilesegment model init`)"
        )
    try:
        doc = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config}: unreadable model config ({exc})") from exc
    if not isinstance(doc, dict):
        raise ModelError(f"{config}: model config must be a JSON object")
    return ModelSpec.from_json(doc, source=config)


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", verify_hash: bool = True
) -> tuple[UNet, ModelSpec]:
    """Build the network from ``NAME.json`` and load ``NAME.safetensors`` into it (no pickle)."""
    weights, config = checkpoint_paths(path)
    spec = load_spec(path)
    if not weights.is_file():
        raise ModelError(f"{weights}: model weights not found next to {config.name}")
    if verify_hash:
        doc = json.loads(config.read_text())
        expected = doc.get("weights_sha256")
        if expected and expected != file_sha256(weights):
            raise ModelError(
                f"{weights}: SHA-256 does not match {config.name}; the weights were changed "
                "or the pair is mismatched"
            )
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights}: unreadable safetensors file ({exc})") from exc
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise ModelError(
            f"{weights}: {len(broken)} of {len(state)} weight tensors of model {spec.name!r} "
            f"hold NaN or inf values (e.g. {broken[0]}); the checkpoint is broken: retrain it "
            "or restore a good copy"
        )
    net = UNet(spec.unet)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            f"{weights}: weights do not match the architecture in {config.name} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    net.load_state_dict(state)
    net.to(device).eval()
    return net, spec


def new_model(spec: ModelSpec, *, seed: int = 0) -> UNet:
    """A freshly initialised network for ``spec``, deterministic for a given seed."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = UNet(spec.unet)
    finally:
        torch.random.set_rng_state(gen_state)
    return net.eval()
