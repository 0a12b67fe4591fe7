"""Reading training data: the pixels and labels of one pair source (see ``discover``).

Which files form a pair is decided in :mod:`tilesegment.train.discover`; this module reads them
and turns what is stored into what training needs:

* **images** become (H, W, C) uint8 with C = 1 or 3: alpha is dropped (DSB2018's RGBA PNGs are
  RGB), 16-bit images are scaled to 8 bits, float arrays of a ``.npy`` stack in [0, 1] are
  scaled by 255 (logged).
* **labels** become (H, W) integer images. Binary masks are normalised to 0/1: masks stored as
  0/255, as 1-bit images (PH2's BMPs), as gray-looking RGB (equal channels), and anti-aliased
  JPEG masks (thresholded at 128). Each :class:`LabelledImage` says what was done in
  ``label_note`` and :func:`tilesegment.train.data.load_data` logs one summary line.
* **DSB2018 samples** (one binary PNG per nucleus) are merged into one instance-id image, ids
  1..N in the sorted order of the mask files; pixels claimed by two masks become background.
* **stacks**: multi-page TIFFs and ``.npy``/``.npz`` arrays (images (N, H, W[, C]), masks
  (N, H, W[, 1])); slice ``i`` of ``stem.tif`` is named ``stem:i``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from tilesegment.errors import ConfigError
from tilesegment.train.discover import ARRAY_SUFFIXES, PairSource

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
#: Keys of an ``.npz`` that holds both arrays (case-insensitive).
NPZ_IMAGE_KEYS = ("images", "image", "imgs", "img", "x")
NPZ_LABEL_KEYS = ("masks", "mask", "labels", "label", "y")


@dataclass(frozen=True, slots=True, eq=False)
class LabelledImage:
    """One image with its label image, as read from disk (binary masks normalised to 0/1)."""

    name: str
    """File stem, or ``stem:i`` for slice ``i`` of a multi-page file."""
    image: np.ndarray
    """(H, W, C) uint8 pixels, C = 1 (gray) or 3 (RGB)."""
    label: np.ndarray
    """(H, W) integer (or bool) label image."""
    source: str
    """Where the image came from, for messages (``a.png``, ``stack.tif slice 3``)."""
    label_source: str = ""
    """Where the label came from, for messages."""
    label_note: str = ""
    """How the stored label was normalised (``"0/255 -> 0/1"``), empty when it was not."""


# ------------------------------------------------------------------------------ planes
def _tiff_planes(path: Path, *, what: str) -> tuple[np.ndarray, bool]:
    """All pages of a TIFF as (N, H, W[, S]) and whether the last axis is samples."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise ConfigError(f"{path}: cannot read the {what} TIFF ({exc})") from exc
    has_samples = axes.endswith("S")
    core = 3 if has_samples else 2
    if data.ndim < core:
        raise ConfigError(f"{path}: {what} TIFF has shape {data.shape} (axes {axes!r})")
    return data.reshape((-1, *data.shape[data.ndim - core :])), has_samples


def _pil_plane(path: Path, *, what: str) -> tuple[np.ndarray, bool]:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if what == "image" and mode not in ("L", "RGB", "I;16", "I", "1"):
                im = im.convert("RGB") if mode not in ("LA", "La") else im.convert("L")
            data = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc})") from exc
    if data.dtype == np.int32:  # 16-bit gray through Pillow's "I" mode
        data = data.astype(np.int64)
    return data[None], data.ndim == 3


def read_planes(path: Path, *, what: str) -> tuple[np.ndarray, bool]:
    """(N, H, W[, S]) planes of an image or label file and whether it has a samples axis."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _tiff_planes(path, what=what)
    return _pil_plane(path, what=what)


# ------------------------------------------------------------------------------ pixels
def as_pixels(plane: np.ndarray, has_samples: bool, source: str) -> np.ndarray:
    """(H, W, C) uint8 with C in {1, 3} from one image plane."""
    if not has_samples:
        plane = plane[..., None]
    c = plane.shape[-1]
    if c in (2, 4):  # drop alpha
        plane = plane[..., : c - 1]
    elif c not in (1, 3):
        raise ConfigError(f"{source}: image has {c} channels; expected gray or RGB")
    if plane.dtype == np.bool_:
        return plane.astype(np.uint8) * np.uint8(255)
    if plane.dtype == np.uint16:
        log.warning("%s: 16-bit image scaled to 8 bits (value * 255 / 65535)", source)
        return ((plane.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(plane.dtype, np.floating):
        return _float_pixels(plane, source)
    if plane.dtype != np.uint8:
        raise ConfigError(f"{source}: image dtype {plane.dtype} is not supported (use uint8)")
    return np.ascontiguousarray(plane)


def _float_pixels(plane: np.ndarray, source: str) -> np.ndarray:
    """uint8 from float pixels in [0, 1] (scaled by 255) or [0, 255] (rounded)."""
    if not np.all(np.isfinite(plane)) or plane.min(initial=0) < 0:
        raise ConfigError(f"{source}: float image has negative or non-finite values")
    top = float(plane.max(initial=0))
    if top > 255:
        raise ConfigError(f"{source}: float image values reach {top}; expected [0, 1] or [0, 255]")
    scale = 255.0 if top <= 1.0 else 1.0
    return np.round(plane * scale).astype(np.uint8)


# ------------------------------------------------------------------------------ labels
def _single_channel(plane: np.ndarray, source: str, *, jpeg: bool = False) -> tuple[
    np.ndarray, str
]:  # fmt: skip
    """A (H, W, S) label plane as (H, W): one sample, or RGB(A) whose colour channels are
    equal (a gray mask saved as RGB; for a ``jpeg``, within 32 levels: their rounded mean);
    colour-coded labels are refused."""
    c = plane.shape[-1]
    if c == 1:
        return plane[..., 0], ""
    colour = plane[..., :3] if c == 4 else plane
    if c in (3, 4) and all(np.array_equal(colour[..., 0], colour[..., k]) for k in (1, 2)):
        return colour[..., 0], "RGB"
    if c == 3 and jpeg and colour.dtype == np.uint8:
        spread = colour.max(axis=-1).astype(np.int16) - colour.min(axis=-1)
        if spread.max(initial=0) <= 32:
            return np.round(colour.mean(axis=-1)).astype(np.uint8), "RGB"
    raise ConfigError(
        f"{source}: label has {c} channels with different values; labels must be "
        "single-channel (binary mask, class index or instance id image)"
    )


def _integer_label(plane: np.ndarray, source: str) -> np.ndarray:
    if plane.dtype == np.bool_:
        return plane
    if np.issubdtype(plane.dtype, np.floating):
        if not np.all(np.isfinite(plane)) or np.any(plane != np.round(plane)):
            raise ConfigError(f"{source}: label has non-integer values")
        plane = plane.astype(np.int64)
    if not np.issubdtype(plane.dtype, np.integer):
        raise ConfigError(f"{source}: label dtype {plane.dtype} is not an integer type")
    if np.issubdtype(plane.dtype, np.signedinteger) and plane.size and plane.min() < 0:
        raise ConfigError(f"{source}: label has negative values (minimum {plane.min()})")
    return plane


def _dejpeg(label: np.ndarray, source: str) -> tuple[np.ndarray, str]:
    """A lossy JPEG mask: values near 0 and 255 with a fringe between; thresholded at 128."""
    values = np.unique(label)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return label, ""
    extreme = np.count_nonzero((label <= 32) | (label >= 223)) / max(label.size, 1)
    if label.dtype != np.uint8 or extreme < 0.9:
        raise ConfigError(
            f"{source}: a JPEG label that is not a binary mask ({100 * extreme:.0f} % of pixels "
            "near 0 or 255); JPEG changes label values, store labels as PNG or TIFF"
        )
    return (label >= 128).astype(np.uint8), "JPEG thresholded at 128"


def as_label(plane: np.ndarray, has_samples: bool, source: str, *, jpeg: bool = False) -> tuple[
    np.ndarray, str
]:  # fmt: skip
    """(H, W) integer label from one label plane and how it was normalised.

    Binary masks (bool, 0/1, 0/255) become uint8 0/1; ``jpeg`` masks are thresholded at 128.
    """
    notes = []
    if has_samples:
        plane, note = _single_channel(plane, source, jpeg=jpeg)
        notes.append(note)
    plane = _integer_label(plane, source)
    if plane.dtype == np.bool_:
        plane = plane.astype(np.uint8)
        notes.append("1-bit")
    elif jpeg:
        plane, note = _dejpeg(plane, source)
        notes.append(note)
    values = set(np.unique(plane).tolist()) if plane.size else set()
    if values and values <= {0, 255} and 255 in values:
        plane = (plane == 255).astype(np.uint8)
        notes.append("0/255")
    note = ", ".join(n for n in notes if n)
    return np.ascontiguousarray(plane), note


# ------------------------------------------------------------------------------ pairs
def read_source(source: PairSource) -> list[LabelledImage]:
    """Every image/label pair of one source (one for a file pair or a DSB sample, N for a
    stack), labels normalised (see the module docstring)."""
    if source.layout == "dsb":
        return [_read_dsb(source)]
    if source.image.suffix.lower() in ARRAY_SUFFIXES:
        return _read_arrays(source)
    return _read_files(source.image, source.labels[0], source.name)


def _read_files(image_path: Path, label_path: Path, stem: str) -> list[LabelledImage]:
    images, img_samples = read_planes(image_path, what="image")
    labels, lab_samples = read_planes(label_path, what="label")
    if len(images) != len(labels):
        raise ConfigError(
            f"{image_path} has {len(images)} slices but {label_path} has {len(labels)}"
        )
    jpeg = label_path.suffix.lower() in JPEG_SUFFIXES
    return _pairs_of(images, labels, (img_samples, lab_samples), stem, image_path, label_path, jpeg)


def _pairs_of(
    images: np.ndarray,
    labels: np.ndarray,
    samples: tuple[bool, bool],
    stem: str,
    image_path: Path,
    label_path: Path,
    jpeg: bool = False,
) -> list[LabelledImage]:
    pairs = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = stem if len(images) == 1 else f"{stem}:{i}"
        where = f" slice {i}" if len(images) > 1 else ""
        source, label_source = image_path.name + where, label_path.name + where
        pixels = as_pixels(img, samples[0], source)
        label, note = as_label(lab, samples[1], label_source, jpeg=jpeg)
        _check_shapes(pixels, label, source, label_path.name)
        pairs.append(LabelledImage(name, pixels, label, source, label_source, note))
    return pairs


def _check_shapes(pixels: np.ndarray, label: np.ndarray, source: str, label_name: str) -> None:
    if pixels.shape[:2] != label.shape:
        raise ConfigError(
            f"{source}: image is {pixels.shape[0]} x {pixels.shape[1]} px but its label "
            f"{label_name} is {label.shape[0]} x {label.shape[1]} px (h x w)"
        )


def _read_dsb(source: PairSource) -> LabelledImage:
    """A DSB2018 sample: ``images/<id>.png`` and one binary mask per object in ``masks/``.

    Mask ``k`` (1-based, sorted by file name) becomes instance id ``k``; a pixel that two masks
    claim becomes background (logged). Work is proportional to the mask pixels, not to
    masks x image pixels.
    """
    planes, samples = read_planes(source.image, what="image")
    pixels = as_pixels(planes[0], samples, source.image.name)
    ids = np.zeros(pixels.shape[:2], np.int32)
    claimed = []
    for k, path in enumerate(source.labels, start=1):
        mask_planes, mask_samples = read_planes(path, what="label")
        mask = mask_planes[0]
        if mask_samples:
            mask, _ = _single_channel(mask, path.name)
        _check_shapes(pixels, mask, source.image.name, f"{path.parent.name}/{path.name}")
        on = np.flatnonzero(mask)
        ids.flat[on] = k
        claimed.append(on)
    counts = np.bincount(np.concatenate(claimed), minlength=ids.size).reshape(ids.shape)
    overlap = counts > 1
    empty = sum(on.size == 0 for on in claimed)
    if overlap.any() or empty:
        ids[overlap] = 0
        log.warning(
            "%s: %d px claimed by two masks set to background, %d empty mask(s)",
            source.name, int(overlap.sum()), empty,
        )  # fmt: skip
    label = ids.astype(np.uint16) if len(source.labels) < 65536 else ids
    note = "object masks merged into instance ids"
    return LabelledImage(source.name, pixels, label, source.image.name, "masks/*.png", note)


# ------------------------------------------------------------------------------ arrays
def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix.lower() == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read the array file ({exc})") from exc


def _pick(
    arrays: dict[str, np.ndarray], keys: tuple[str, ...], path: Path, what: str
) -> np.ndarray:
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    found = [k for k in arrays if k.lower() in keys]
    if len(found) != 1:
        raise ConfigError(
            f"{path}: cannot tell which array holds the {what} (keys {sorted(arrays)}); save "
            f"them as np.savez(path, images=..., masks=...) or one array per file"
        )
    return arrays[found[0]]


def _read_arrays(source: PairSource) -> list[LabelledImage]:
    """``.npy``/``.npz`` stacks: images (N, H, W[, C]), masks (N, H, W[, 1])."""
    image_path, label_path = source.image, source.labels[0]
    images = _pick(_load_arrays(image_path), NPZ_IMAGE_KEYS, image_path, "images")
    labels = _pick(_load_arrays(label_path), NPZ_LABEL_KEYS, label_path, "masks")
    if images.ndim not in (3, 4) or labels.ndim not in (3, 4):
        raise ConfigError(
            f"{image_path}: expected images (N, H, W[, C]) and masks (N, H, W[, 1]), got "
            f"{images.shape} and {labels.shape}"
        )
    if len(images) != len(labels):
        raise ConfigError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)}"
        )
    if np.issubdtype(images.dtype, np.floating) and images.size and images.max() <= 1.0:
        log.info("%s: float images in [0, 1] scaled by 255 to 8 bits", image_path.name)
    samples = (images.ndim == 4, labels.ndim == 4)
    pairs = _pairs_of(images, labels, samples, source.name, image_path, label_path)
    if label_path == image_path:
        pairs = [replace(p, label_source=p.label_source + " (masks)") for p in pairs]
    return pairs
