"""Training data: image/label pairs, their targets and weight maps (the crops drawn from them are
in :mod:`tilesegment.train.sampling`).

Two layouts are read (:func:`load_pairs`), both through the same code for ``train`` and
``evaluate``:

* **stacks**: ``--images train-volume.tif --labels train-labels.tif``, two multi-page TIFFs
  with one slice per page (ISBI 2012). Slice ``i`` of ``train-volume.tif`` is named
  ``train-volume:i``.
* **folders**: ``--images DIR --labels DIR``, files matched by stem (``a.png`` with ``a.tif``).
  Images are PNG, TIFF or JPEG, gray or RGB; labels are single-channel integer images.

A label image is ``binary`` (0/1 or 0/255 masks), ``classes`` (index masks) or ``instances``
(object ids), see :mod:`tilesegment.train.labels`. Binary and instance labels become two classes
(0 = background, 1 = foreground; ISBI: 0 = membrane, 1 = cell interior) after the objects
are separated by a background border (:func:`~tilesegment.train.labels.separate_touching`; a binary
mask is first split into its 4-connected components). With ``boundary_class`` instance data
gets a third class, the objects' one-pixel inner boundary and the cut borders.

Weights (:func:`target_and_weights`) are the paper's ``w = w_c + w0 exp(-(d1 + d2)^2 / 2
sigma^2)`` with ``w_c`` balancing the classes of each image (mean 1), computed once per image.

Sampling (:class:`~tilesegment.train.sampling.CropSampler`): sample ``index`` of ``epoch``
depends only on ``(seed, epoch, index)`` (:func:`tilesegment.train.augment.rng_for`): an
image chosen with probability proportional to its area, a ``tile x tile`` input crop of the image
mirror-padded by the halo whose origin is a multiple of the pooling factor, a random flip /
rotation, the elastic deformation of the whole input-sized crop (image, target and weights
with one displacement field), intensity (and for RGB, stain) jitter, and finally the target and
weights cut to the centred ``tile - 2 * halo`` output window. Deforming before cutting keeps the
target aligned with the pixels the network sees.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from scipy import ndimage as ndi

from tilesegment.errors import ConfigError
from tilesegment.infer.predict import to_model_channels
from tilesegment.train.labels import (
    LabelKind,
    detect_label_kind,
    instances_from_binary,
    separate_touching,
)
from tilesegment.train.weights import border_weight_map, cached_weight_map

log = logging.getLogger(__name__)

#: File name suffixes read as images or labels in folder mode (case-insensitive).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_TIFF_SUFFIXES = (".tif", ".tiff")
LABEL_KINDS: tuple[LabelKind, ...] = ("binary", "classes", "instances")


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True, slots=True, eq=False)
class LabelledImage:
    """One image with its label image, as read from disk (no interpretation yet)."""

    name: str
    """File stem, or ``stem:i`` for slice ``i`` of a multi-page file."""
    image: np.ndarray
    """(H, W, C) uint8 pixels, C = 1 (gray) or 3 (RGB)."""
    label: np.ndarray
    """(H, W) integer (or bool) label image, values as stored."""
    source: str
    """Where the image came from, for messages (``a.png``, ``stack.tif slice 3``)."""
    label_source: str = ""
    """Where the label came from, for messages."""


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


def _read_planes(path: Path, *, what: str) -> tuple[np.ndarray, bool]:
    """(N, H, W[, S]) planes of an image or label file and whether it has a samples axis."""
    if path.suffix.lower() in _TIFF_SUFFIXES:
        return _tiff_planes(path, what=what)
    return _pil_plane(path, what=what)


def _as_pixels(plane: np.ndarray, has_samples: bool, source: str) -> np.ndarray:
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
    if plane.dtype != np.uint8:
        raise ConfigError(f"{source}: image dtype {plane.dtype} is not supported (use uint8)")
    return np.ascontiguousarray(plane)


def _as_label(plane: np.ndarray, has_samples: bool, source: str) -> np.ndarray:
    """(H, W) integer label from one label plane."""
    if has_samples:
        if plane.shape[-1] != 1:
            raise ConfigError(
                f"{source}: label has {plane.shape[-1]} channels; labels must be single-channel "
                "(binary mask, class index or instance id image)"
            )
        plane = plane[..., 0]
    if plane.dtype == np.bool_:
        return plane.astype(np.uint8)
    if np.issubdtype(plane.dtype, np.floating):
        if not np.all(np.isfinite(plane)) or np.any(plane != np.round(plane)):
            raise ConfigError(f"{source}: label has non-integer values")
        plane = plane.astype(np.int64)
    if not np.issubdtype(plane.dtype, np.integer):
        raise ConfigError(f"{source}: label dtype {plane.dtype} is not an integer type")
    if np.issubdtype(plane.dtype, np.signedinteger) and plane.size and plane.min() < 0:
        raise ConfigError(f"{source}: label has negative values (minimum {plane.min()})")
    return np.ascontiguousarray(plane)


def _read_pair(image_path: Path, label_path: Path, stem: str) -> list[LabelledImage]:
    images, img_samples = _read_planes(image_path, what="image")
    labels, lab_samples = _read_planes(label_path, what="label")
    if len(images) != len(labels):
        raise ConfigError(
            f"{image_path} has {len(images)} slices but {label_path} has {len(labels)}"
        )
    pairs = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = stem if len(images) == 1 else f"{stem}:{i}"
        where = f" slice {i}" if len(images) > 1 else ""
        source, label_source = image_path.name + where, label_path.name + where
        pixels = _as_pixels(img, img_samples, source)
        label = _as_label(lab, lab_samples, label_source)
        if pixels.shape[:2] != label.shape:
            raise ConfigError(
                f"{source}: image is {pixels.shape[0]} x {pixels.shape[1]} px but its label "
                f"{label_path.name} is {label.shape[0]} x {label.shape[1]} px (h x w)"
            )
        pairs.append(LabelledImage(name, pixels, label, source, label_source))
    return pairs


def _files_by_stem(folder: Path, *, what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise ConfigError(
                f"{folder}: two {what} files share the stem {path.stem!r} "
                f"({found[path.stem].name}, {path.name})"
            )
        found[path.stem] = path
    if not found:
        raise ConfigError(f"{folder}: no {what} files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def load_pairs(images: Path, labels: Path) -> list[LabelledImage]:
    """Read every image/label pair of a stack pair or of two folders, sorted by name.

    Parameters
    ----------
    images, labels : Path
        Two files (multi-page TIFF stacks or single images) or two folders matched by stem.

    Returns
    -------
    list of LabelledImage

    Raises
    ------
    ConfigError
        Missing paths, a file/folder mix, empty folders, no matching stems, unreadable files,
        image/label size or slice-count mismatch.
    """
    images, labels = Path(images), Path(labels)
    for p, what in ((images, "--images"), (labels, "--labels")):
        if not p.exists():
            raise ConfigError(f"{what} {p} does not exist")
    if images.is_dir() != labels.is_dir():
        raise ConfigError(
            f"--images {images} and --labels {labels} must both be files (stacks) or both folders"
        )
    if not images.is_dir():
        return _read_pair(images, labels, images.stem)
    image_files = _files_by_stem(images, what="image")
    label_files = _files_by_stem(labels, what="label")
    common = sorted(set(image_files) & set(label_files))
    if not common:
        raise ConfigError(
            f"no image in {images} has a label with the same stem in {labels} (e.g. "
            f"{next(iter(image_files))!r} vs {next(iter(label_files))!r})"
        )
    missing = sorted(set(image_files) - set(label_files))
    if missing:
        log.warning("%d image(s) without a label skipped: %s", len(missing), ", ".join(missing[:5]))
    pairs = []
    for stem in common:
        pairs.extend(_read_pair(image_files[stem], label_files[stem], stem))
    return pairs


def read_name_list(path: Path) -> list[str]:
    """Names from a split list: one per line, blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the list ({exc})") from exc
    names = [ln.split("#", 1)[0].strip() for ln in lines]
    return [n for n in names if n]


def split_pairs(
    pairs: Sequence[LabelledImage],
    *,
    train_names: Sequence[str] | None = None,
    val_names: Sequence[str] | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """(train, validation) pairs, from explicit name lists or a seeded random fraction.

    With ``val_names`` those pairs validate and ``train_names`` (default: all others) train.
    Otherwise ``round(val_fraction * n)`` pairs (at least 1 when the fraction is > 0) of the
    ``train_names`` pool are drawn for validation by a generator seeded with ``seed``; the draw
    depends only on the names (in reading order: sorted stems, stack slices in order) and the
    seed. Both lists keep that order.
    """
    by_name = {p.name: p for p in pairs}
    for names, flag in ((train_names, "--train-list"), (val_names, "--val-list")):
        unknown = [n for n in names or () if n not in by_name]
        if unknown:
            raise ConfigError(
                f"{flag}: {len(unknown)} name(s) not in the data, e.g. {unknown[:3]} "
                f"(names look like {sorted(by_name)[:2]})"
            )
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction ({val_fraction}) must be in [0, 1)")
    order = [p.name for p in pairs]  # reading order: sorted stems, slices in stack order
    listed_train = set(train_names) if train_names is not None else set(order)
    pool = [n for n in order if n in listed_train]
    if val_names is not None:
        listed_val = set(val_names)
        overlap = sorted(listed_train & listed_val) if train_names is not None else []
        if overlap:
            raise ConfigError(f"--train-list and --val-list share names, e.g. {overlap[:3]}")
        val = [n for n in order if n in listed_val]
        train = [n for n in pool if n not in listed_val]
    else:
        n_val = round(val_fraction * len(pool))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(pool) - 1)
        permutation = np.random.default_rng([seed, 0x5EED]).permutation(len(pool))
        chosen = {pool[i] for i in permutation[:n_val]}
        val = [n for n in pool if n in chosen]
        train = [n for n in pool if n not in chosen]
    if not train:
        raise ConfigError("no training images left after the validation split")
    return [by_name[n] for n in train], [by_name[n] for n in val]


# ------------------------------------------------------------------------------ targets
def resolve_label_kind(pairs: Sequence[LabelledImage], kind: LabelKind | None) -> LabelKind:
    """The given kind, or the one detected over all label images (logged)."""
    if kind is not None:
        if kind not in LABEL_KINDS:
            raise ConfigError(f"--label-kind ({kind!r}) must be one of {', '.join(LABEL_KINDS)}")
        return kind
    kinds = {p.name: detect_label_kind(p.label) for p in pairs}
    for candidate in ("instances", "classes", "binary"):
        examples = [n for n, k in kinds.items() if k == candidate]
        if examples:
            top = max(int(p.label.max(initial=0)) for p in pairs)
            log.warning(
                "label kind not given: detected %r (%d of %d label images look %s, e.g. %s; "
                "largest value %d); pass --label-kind to override",
                candidate,
                len(examples),
                len(kinds),
                candidate,
                examples[0],
                top,
            )
            return candidate  # type: ignore[return-value]
    raise ConfigError("no label images to detect the label kind from")


def number_of_classes(
    pairs: Sequence[LabelledImage], kind: LabelKind, *, boundary_class: bool = False
) -> int:
    """Output classes the labels need: 2 (binary/instances), 3 with a boundary class, or the
    largest class index + 1."""
    if kind != "classes":
        return 3 if boundary_class else 2
    values = sorted(set().union(*(np.unique(p.label).tolist() for p in pairs)))
    n = max(2, 1 + int(max(values, default=0)))
    unused = [c for c in range(n) if c not in values]
    if len(values) > 1 and unused:
        log.warning(
            "class labels hold the values %s: the model gets %d classes, of which %s never "
            "occur (their outputs are never trained); if the values are codes rather than class "
            "indices, remap the labels to 0..%d first (--class-names then names them)",
            ", ".join(map(str, values)),
            n,
            _ranges(unused),
            len(values) - 1,
        )
    return n


def _ranges(values: Sequence[int]) -> str:
    """``[2, 3, 4, 6]`` -> ``"2-4, 6"``.

    >>> _ranges([2, 3, 4, 6])
    '2-4, 6'
    """
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _check_values(label: np.ndarray, kind: LabelKind, num_classes: int, source: str) -> None:
    if kind == "binary":
        values = np.unique(label)
        allowed = {0, 1} if values.size and values.max() <= 1 else {0, 255}
        bad = [int(v) for v in values if int(v) not in allowed]
        if bad:
            raise ConfigError(
                f"{source}: --label-kind binary expects values 0/1 or 0/255, found "
                f"{sorted(int(v) for v in values)[:8]} (use --label-kind classes or instances?)"
            )
    elif kind == "classes":
        top = int(label.max(initial=0))
        if top >= num_classes:
            raise ConfigError(
                f"{source}: class value {top} but the model has {num_classes} classes "
                "(--class-names)"
            )


def balanced_class_weights(target: np.ndarray, num_classes: int) -> np.ndarray:
    """``w_c = N / (K * N_c)`` per pixel, K = number of classes present (mean 1).

    >>> balanced_class_weights(np.array([[0, 0, 0, 1]]), 2)
    array([[0.6666667, 0.6666667, 0.6666667, 2.       ]], dtype=float32)
    """
    counts = np.bincount(target.ravel(), minlength=num_classes).astype(np.float64)
    present = int(np.count_nonzero(counts))
    with np.errstate(divide="ignore"):
        per_class = np.where(counts > 0, target.size / (present * counts), 0.0)
    return per_class.astype(np.float32)[target]


def _inner_boundary(instances: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of another id (or background)."""
    eroded = ndi.grey_erosion(instances, footprint=ndi.generate_binary_structure(2, 1))
    dilated = ndi.grey_dilation(instances, footprint=ndi.generate_binary_structure(2, 1))
    return (instances != 0) & ((eroded != instances) | (dilated != instances))


@dataclass(frozen=True, slots=True)
class WeightOptions:
    """Parameters of the weight maps."""

    w0: float = 10.0
    """Height of the border term (paper: 10); 0 disables it."""
    sigma: float = 5.0
    """Width of the border term in px (paper: about 5)."""
    cache_dir: Path | None = None
    """Directory for cached border weight maps (``.npy`` keyed by label content), or None."""


def target_and_weights(
    label: np.ndarray,
    kind: LabelKind,
    *,
    num_classes: int,
    boundary_class: bool = False,
    weights: WeightOptions = WeightOptions(),
    source: str = "label",
) -> tuple[np.ndarray, np.ndarray]:
    """Class target and pixel weights of one label image.

    Parameters
    ----------
    label : (H, W) int ndarray
    kind : {"binary", "classes", "instances"}
    num_classes : int
        Model classes (binary/instances: 2, or 3 with ``boundary_class``).
    boundary_class : bool
        Instances only: class 2 = the objects' inner boundary and the separation borders.
    weights : WeightOptions
    source : str
        Name used in error messages.

    Returns
    -------
    target : (H, W) uint8 ndarray
        Class per pixel.
    weight : (H, W) float32 ndarray
        ``w_c`` (class balance of this image, mean 1) plus, for binary and instance labels,
        the border term on background pixels.
    """
    _check_values(label, kind, num_classes, source)
    if kind == "classes":
        target = label.astype(np.uint8)
        return target, balanced_class_weights(target, num_classes)
    instances = instances_from_binary(label != 0) if kind == "binary" else label.astype(np.int64)
    separated = separate_touching(instances)
    target = (separated != 0).astype(np.uint8)
    if boundary_class:
        if kind != "instances":
            raise ConfigError("--boundary-class needs --label-kind instances")
        target[_inner_boundary(separated) | ((instances != 0) & (separated == 0))] = 2
    kwargs: dict[str, Any] = {"w0": weights.w0, "sigma": weights.sigma, "class_weights": (0, 0)}
    if weights.w0 > 0:
        if weights.cache_dir is not None:
            border = cached_weight_map(separated, weights.cache_dir, **kwargs)
        else:
            border = border_weight_map(separated, **kwargs)
    else:
        border = np.zeros(label.shape, np.float32)
    return target, balanced_class_weights(target, num_classes) + border


@dataclass(frozen=True, slots=True, eq=False)
class TrainItem:
    """One prepared image: pixels, class target and weights, all (H, W)-aligned."""

    name: str
    image: np.ndarray
    """(H, W, C) uint8."""
    target: np.ndarray
    """(H, W) uint8 class per pixel."""
    weights: np.ndarray
    """(H, W) float32 loss weight per pixel."""
    truth: np.ndarray
    """(H, W) label image the metrics compare against (binary: 0/1, instances: ids,
    classes: class ids)."""


def prepare_items(
    pairs: Sequence[LabelledImage],
    kind: LabelKind,
    *,
    num_classes: int,
    channels: int,
    boundary_class: bool = False,
    weights: WeightOptions = WeightOptions(),
    role: str = "training",
) -> list[TrainItem]:
    """Targets and weight maps for every pair; pairs without foreground are skipped (logged)."""
    items = []
    for p in pairs:
        target, w = target_and_weights(
            p.label,
            kind,
            num_classes=num_classes,
            boundary_class=boundary_class,
            weights=weights,
            source=p.label_source or p.source,
        )
        if not np.any(target != 0):
            log.warning(
                "%s: label has no foreground; skipped for %s", p.label_source or p.source, role
            )
            continue
        if kind == "binary":
            truth = (p.label != 0).astype(np.uint8)
        else:
            truth = p.label
        image = to_model_channels(p.image, channels)
        items.append(TrainItem(p.name, image, target, w, truth))
    return items


def channel_stats(items: Sequence[TrainItem]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``pixel / 255`` over all training pixels."""
    c = items[0].image.shape[-1]
    total = np.zeros(c)
    squares = np.zeros(c)
    n = 0
    for it in items:
        v = it.image.reshape(-1, c).astype(np.float64) / 255.0
        total += v.sum(0)
        squares += np.square(v).sum(0)
        n += v.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    std = np.where(std < 1e-3, 1.0, std)  # a constant channel: do not blow it up
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def describe_items(items: Sequence[TrainItem]) -> str:
    """'25 images of 512 x 512 px' or '24 images, 1000 x 1000 to ... px'."""
    shapes = sorted({it.image.shape[:2] for it in items})
    if len(shapes) == 1:
        return f"{len(items)} image(s) of {shapes[0][0]} x {shapes[0][1]} px"
    return (
        f"{len(items)} images, {shapes[0][0]} x {shapes[0][1]} to "
        f"{shapes[-1][0]} x {shapes[-1][1]} px"
    )


def total_pixels(items: Sequence[TrainItem]) -> int:
    return int(sum(math.prod(it.image.shape[:2]) for it in items))
