"""Training data: image/label pairs, their targets and weight maps (the crops drawn from them are
in :mod:`tilesegment.train.sampling`).

``train`` and ``evaluate`` read their pairs through :func:`load_data`: the files are found by
:mod:`tilesegment.train.discover` (stacks, ``.npy``/``.npz``, DSB2018 samples, image trees with
labels matched by stem and suffix, ``image<TAB>label`` lists) and read by
:mod:`tilesegment.train.readers` (gray or RGB images; single-channel labels, binary masks
normalised to 0/1). What was matched and how labels were normalised is logged.

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

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tilesegment.errors import ConfigError
from tilesegment.infer.predict import to_model_channels
from tilesegment.train.discover import (
    Discovery,
    PairSource,
    describe,
    discover,
    read_list,
    unique_stems,
)
from tilesegment.train.labels import (
    LabelKind,
    detect_label_kind,
    instances_from_binary,
    separate_touching,
)
from tilesegment.train.readers import LabelledImage, read_source
from tilesegment.train.weights import border_weight_map, cached_weight_map

log = logging.getLogger(__name__)

LABEL_KINDS: tuple[LabelKind, ...] = ("binary", "classes", "instances")


# ------------------------------------------------------------------------------ loading
def load_pairs(
    images: Path,
    labels: Path | None = None,
    *,
    label_pattern: str | None = None,
    only: Collection[str] | None = None,
) -> list[LabelledImage]:
    """Read every image/label pair of ``--images``/``--labels`` (any layout of
    :mod:`tilesegment.train.discover`), sorted by name.

    Parameters
    ----------
    images : Path
        A stack file (TIFF, ``.npy``, ``.npz``), a DSB2018 folder or an image tree.
    labels : Path, optional
        The label stack or tree; default: the same tree as ``images`` (or the same ``.npz``).
    label_pattern : str, optional
        ``--label-pattern``, e.g. ``'{stem}_GT.png'``; default: the recognised suffixes.
    only : collection of str, optional
        Read only these pairs (names from a ``--list``); images without a label and labels
        without an image outside them are ignored.

    Returns
    -------
    list of LabelledImage

    Raises
    ------
    ConfigError
        Missing paths, ambiguous matches, images without a label or labels without an image
        (one line naming the files), unreadable files, image/label size or slice mismatches.
    """
    found = discover(images, labels, label_pattern=label_pattern)
    _refuse_partial(found, only)
    sources = [p for p in found.pairs if only is None or _wanted(p, only)]
    log.info(
        "matched %s%s", describe(found), f"; reading the {len(sources)} listed" * (only is not None)
    )
    return _read_all(sources)


def _wanted(source: PairSource, only: Collection[str]) -> bool:
    return source.layout == "stack" or source.name in only


def _refuse_partial(found: Discovery, only: Collection[str] | None) -> None:
    unlabelled = [p for p in found.unlabelled if only is None or p.stem in only]
    orphans = found.orphans if only is None else []
    if unlabelled:
        shown = ", ".join(str(p.relative_to(found.root)) for p in unlabelled[:3])
        raise ConfigError(
            f"{len(unlabelled)} of {len(unlabelled) + len(found.pairs)} images in {found.root} "
            f"have no label ({shown}{', ...' * (len(unlabelled) > 3)}); add their labels "
            "(stem + _mask, _label, _lesion, ... or --label-pattern), or name the pairs to use "
            "with --list"
        )
    if orphans:
        shown = ", ".join(p.name for p in orphans[:3])
        raise ConfigError(
            f"{len(orphans)} label(s) match no image in {found.root} ({shown}"
            f"{', ...' * (len(orphans) > 3)}); add or rename their images, or point --labels "
            "at the labels only"
        )
    if not found.pairs:
        raise ConfigError(f"{found.root}: no image/label pairs found")


def _read_all(sources: Sequence[PairSource]) -> list[LabelledImage]:
    pairs = [pair for source in sources for pair in read_source(source)]
    notes = Counter(p.label_note for p in pairs if p.label_note)
    if notes:
        log.info(
            "labels normalised: %s",
            "; ".join(f"{n} x {note}" for note, n in notes.most_common()),
        )
    jpeg = [p.label_source for p in pairs if "JPEG" in p.label_note]
    if jpeg:
        log.warning("%d anti-aliased JPEG mask(s) thresholded at 128, e.g. %s", len(jpeg), jpeg[0])
    return sorted(pairs, key=lambda p: p.name) if len(sources) > 1 else pairs


def load_data(
    images: Path | None,
    labels: Path | None = None,
    *,
    label_pattern: str | None = None,
    lists: Sequence[Path | None] = (),
    only_listed: bool = False,
) -> tuple[list[LabelledImage], list[list[str] | None]]:
    """The pairs of a ``train`` or ``evaluate`` command and the names of each of its lists.

    ``lists`` are ``--list``-style files (:func:`~tilesegment.train.discover.read_list`; None
    for an option not given): of names, which select pairs of ``images``, or of
    ``image<TAB>label`` pairs, which are the data (then ``images`` must be None). With
    ``only_listed`` only the listed pairs are read.
    """
    read = [read_list(p) if p is not None else None for p in lists]
    given = [lst for lst in read if lst is not None]
    paired = [lst for lst in given if lst.pairs]
    names = [list(lst.names) if lst is not None else None for lst in read]
    if paired:
        if images is not None or labels is not None or len(paired) != len(given):
            raise ConfigError(
                f"{paired[0].path} lists image<TAB>label pairs: give every list as pairs and no "
                "--images/--labels"
            )
        sources = {p.image.resolve(): p for lst in paired for p in lst.pairs}
        unique_stems([p.image for p in sources.values()])
        log.info("%d pair(s) from %s", len(sources), ", ".join(str(lst.path) for lst in paired))
        return _read_all(list(sources.values())), names
    if images is None:
        raise ConfigError("give --images (and --labels), or a --list of image<TAB>label pairs")
    only = {n.split(":", 1)[0] for lst in given for n in lst.names} if only_listed else None
    return load_pairs(images, labels, label_pattern=label_pattern, only=only), names


def read_name_list(path: Path) -> list[str]:
    """Names from a split list: one per line, blank lines and ``#`` comments ignored (for a
    list of ``image<TAB>label`` pairs, the image stems)."""
    return list(read_list(path).names)


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


# ------------------------------------------------------------------------------ downsample
def downsample_pairs(
    pairs: Sequence[LabelledImage], factor: float, kind: LabelKind
) -> list[LabelledImage]:
    """The pairs as the network of a ``downsample`` model sees them: shrunk by ``factor``.

    Images go through the kernel ``run`` resamples with
    (:func:`~tilesegment.io.resample.resample_array`: triangle widened to ``factor`` px, i.e.
    area-weighted and antialiased, at global pixel centres), onto the shape ``run`` gives
    (``round(H / factor)``). Labels land on the same grid without mixing values:

    * binary and class masks by the kernel-weighted majority (the arg-max of the one-hot
      classes resampled with the same kernel; ties go to the lower class), which is how the
      predicted probabilities come back to an image's grid, so the target is what a perfect
      prediction would give;
    * instance ids by the id at each pixel's centre (:func:`~tilesegment.io.resample.
      nearest_array`, the point the kernel is centred on): every id is an input id and each
      object stays one object, with no blend of two ids or of an id and background. The
      separation of touching objects and the border weights (``sigma`` in px) are computed
      afterwards, on the shrunk labels, i.e. in the network's pixels, as without downsampling.
      Objects under about ``factor`` px across may vanish, as they would from the image.

    The weight-map cache is keyed by the label pixels, so shrunk labels get their own entries.
    """
    from tilesegment.io.resample import nearest_array, resample_array, scale_and_shape, to_uint8

    out = []
    for p in pairs:
        scale, shape = scale_and_shape(p.image.shape[:2], 1.0, factor)
        image = to_uint8(resample_array(p.image, shape, scale))
        if kind == "instances":
            label = nearest_array(p.label, shape, scale)
        else:
            label = majority_label(p.label, shape, scale)
        out.append(dataclasses.replace(p, image=image, label=label))
    return out


def majority_label(label: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """``label`` (H, W) moved onto ``shape`` by the kernel-weighted majority of its values.

    >>> majority_label(np.array([[0, 0, 7, 7, 7, 0]]), (1, 2), 3.0).tolist()
    [[0, 7]]
    """
    from tilesegment.io.resample import resample_array

    values = np.unique(label)
    if values.size == 1:
        return np.full(shape, values[0], dtype=label.dtype)
    onehot = (label[..., None] == values).astype(np.float32)
    return values[resample_array(onehot, shape, scale).argmax(-1)].astype(label.dtype)


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
