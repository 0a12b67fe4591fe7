"""What a training run samples: its prepared images (:func:`prepare_run_data`) and the seeded
random crops drawn from them (:class:`CropSampler`), shared out over ranks (:class:`RankSampler`).

Sample ``index`` of ``epoch`` depends only on ``(seed, epoch, index)``, so 1 and R processes
see the same data in the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tilesegment.errors import ConfigError
from tilesegment.geometry import UNetGeometry, mirror_indices
from tilesegment.train import data as D
from tilesegment.train.augment import (
    HE_DEFAULTS,
    PhotometricRanges,
    elastic_deformation,
    flip_rotate,
    random_crop_box,
    rng_for,
    scale_crop,
)
from tilesegment.train.config import TrainConfig
from tilesegment.train.data import TrainItem
from tilesegment.train.labels import LabelKind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AugmentOptions:
    """Which augmentations :class:`CropSampler` applies."""

    flips: bool = True
    """Random flip / rotation by multiples of 90 degrees."""
    elastic_sigma: float = 10.0
    """Standard deviation (px) of the elastic deformation on a 3 x 3 grid; 0 disables it."""
    elastic_grid: int = 3
    """Nodes per axis of the coarse displacement grid (paper: 3)."""
    intensity: bool = True
    """HED stain jitter (RGB), gamma/contrast/brightness jitter and blur, by ``photometric``."""
    photometric: PhotometricRanges = HE_DEFAULTS
    """Ranges of the stain, intensity and blur jitter."""
    scale: float = 0.0
    """Zoom by a log-uniform factor in ``[1 / (1 + scale), 1 + scale]`` around the model's
    µm/px (:func:`~tilesegment.train.augment.scale_crop`); 0 disables it."""


def augment_options(cfg: TrainConfig) -> AugmentOptions:
    """The augmentation a training run asks for (``--no-augment``: elastic deformation only)."""
    on = cfg.augment
    ranges = PhotometricRanges(
        hed_scale=cfg.hed_scale,
        hed_shift=cfg.hed_shift,
        brightness=cfg.brightness,
        contrast=cfg.contrast,
        gamma=cfg.gamma,
        blur_sigma=cfg.blur_sigma,
    )
    return AugmentOptions(
        flips=on,
        elastic_sigma=cfg.elastic_sigma,
        intensity=on,
        photometric=ranges,
        scale=cfg.scale_jitter if on else 0.0,
    )


class CropSampler:
    """Seeded random training crops from prepared images (pure numpy).

    Parameters
    ----------
    items : sequence of TrainItem
    tile : int
        Input crop edge in px (a valid U-Net input size).
    halo, pooling : int
        The network's halo and pooling factor (crop origins are multiples of ``pooling`` in
        the image mirror-padded by ``halo``).
    seed : int
    augment : AugmentOptions

    Notes
    -----
    The padded frame of an ``H x W`` image is ``H + 2 * halo`` rows plus up to
    ``pooling - 1`` more mirrored rows at the bottom so that the last aligned crop reaches the
    last image row (same for columns); every image pixel can be a target. Thread-safety and
    picklability: immutable after construction, safe to share and to send to DataLoader
    workers.
    """

    def __init__(
        self,
        items: Sequence[TrainItem],
        *,
        tile: int,
        halo: int,
        pooling: int,
        seed: int,
        augment: AugmentOptions = AugmentOptions(),
    ) -> None:
        self.items = list(items)
        self.tile, self.halo, self.pooling = tile, halo, pooling
        self.output = tile - 2 * halo
        self.seed = seed
        self.augment = augment
        for it in self.items:
            if min(it.image.shape[:2]) < self.output:
                raise ConfigError(
                    f"{it.name}: {it.image.shape[0]} x {it.image.shape[1]} px is smaller than "
                    f"the {self.output} px output window of a {tile} px tile"
                )
        area = np.array([it.image.shape[0] * it.image.shape[1] for it in self.items], float)
        self.probabilities = area / area.sum()

    def frame_shape(self, item: TrainItem) -> tuple[int, int]:
        """(h, w) of the aligned padded frame crops are drawn from."""
        shape = []
        for n in item.image.shape[:2]:
            size = n + 2 * self.halo
            shape.append(size + (-(size - self.tile)) % self.pooling)
        return shape[0], shape[1]

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample ``index`` of ``epoch``.

        Returns
        -------
        image : (tile, tile, C) uint8 ndarray
        target : (out, out) uint8 ndarray
            ``out = tile - 2 * halo``.
        weights : (out, out) float32 ndarray
        """
        rng = rng_for(self.seed, epoch, index)
        item = self.items[int(rng.choice(len(self.items), p=self.probabilities))]
        t, h = self.tile, self.halo
        y, x = random_crop_box(self.frame_shape(item), (t, t), rng, align=self.pooling)
        aug = self.augment
        if aug.scale > 0:
            image, target, weights = scale_crop(
                item.image, item.target, item.weights, (y - h, x - h), t, rng, max_scale=aug.scale
            )
        else:
            rows = mirror_indices(y - h, y - h + t, item.image.shape[0])
            cols = mirror_indices(x - h, x - h + t, item.image.shape[1])
            box = np.ix_(rows, cols)
            image, target, weights = item.image[box], item.target[box], item.weights[box]
        if aug.flips:
            image, target, weights = flip_rotate([image, target, weights], rng)
        if aug.elastic_sigma > 0:
            image, target, weights = elastic_deformation(
                image, target, weights, rng, grid=aug.elastic_grid, sigma=aug.elastic_sigma
            )
        if aug.intensity:
            image = aug.photometric.apply(image, rng)
        window = slice(h, h + self.output)
        return (
            np.ascontiguousarray(image),
            np.ascontiguousarray(target[window, window]),
            np.ascontiguousarray(weights[window, window], dtype=np.float32),
        )


class CropDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are ``(epoch, index)`` pairs (see :class:`RankSampler`).

    Items are ``(image (C, T, T) uint8, target (O, O) int64, weights (O, O) float32)``
    tensors; normalisation happens on the device, as in :class:`~tilesegment.infer.predict.
    Predictor`.
    """

    def __init__(self, sampler: CropSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        image, target, weights = self.sampler.sample(*key)
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.from_numpy(target.astype(np.int64)),
            torch.from_numpy(weights),
        )


class RankSampler(torch.utils.data.Sampler):
    """This rank's share of every global batch of an epoch, as ``(epoch, index)`` keys.

    Global batch ``s`` is samples ``s * B .. s * B + B - 1``; rank ``r`` of ``R`` takes the
    contiguous block ``s * B + r * B / R`` onwards. The samples, and so the whole run, are the
    same for any number of ranks. Set :attr:`epoch` before iterating.
    """

    def __init__(self, *, steps: int, global_batch: int, rank: int, world: int) -> None:
        if global_batch % world:
            raise ConfigError(
                f"--batch-size ({global_batch}) must be divisible by the number of processes "
                f"({world})"
            )
        self.steps, self.global_batch = steps, global_batch
        self.local_batch = global_batch // world
        self.rank = rank
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for s in range(self.steps):
            first = s * self.global_batch + self.rank * self.local_batch
            for j in range(self.local_batch):
                yield self.epoch, first + j

    def __len__(self) -> int:
        return self.steps * self.local_batch


def largest_valid_tile(min_side: int, *, halo: int, valid: Sequence[int]) -> int | None:
    """The largest of ``valid`` whose output window fits in ``min_side`` px, or None."""
    fitting = [v for v in valid if v - 2 * halo <= min_side]
    return max(fitting) if fitting else None


# ------------------------------------------------------------------------------ the data of a run


@dataclass(slots=True)
class RunData:
    """What a training run trains and validates on, prepared once per process."""

    kind: LabelKind
    class_names: tuple[str, ...]
    train: list[TrainItem]
    val: list[TrainItem]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _default_class_names(kind: LabelKind, n: int, boundary: bool) -> tuple[str, ...]:
    if kind != "classes":
        return (
            ("background", "foreground", "boundary") if boundary else ("background", "foreground")
        )
    return ("background", *(f"class{i}" for i in range(1, n)))


def _load_split(cfg: TrainConfig) -> tuple[list[D.LabelledImage], list[D.LabelledImage]]:
    """The (training, validation) pairs of ``cfg``'s data and lists."""
    pairs, (train_names, val_names) = D.load_data(
        cfg.images,
        cfg.labels,
        label_pattern=cfg.label_pattern,
        lists=(cfg.train_list, cfg.val_list),
        only_listed=cfg.train_list is not None,
    )
    return D.split_pairs(
        pairs,
        train_names=train_names,
        val_names=val_names,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )


def prepare_run_data(cfg: TrainConfig, geometry: UNetGeometry, *, main: bool) -> RunData:
    """Load, split and prepare the images of ``cfg``; logs a summary when ``main``."""
    train_pairs, val_pairs = _load_split(cfg)
    pairs = train_pairs + val_pairs
    kind = D.resolve_label_kind(pairs, cfg.label_kind)
    if cfg.boundary_class and kind != "instances":
        raise ConfigError(f"--boundary-class needs instance labels, not {kind!r}")
    n_classes = D.number_of_classes(pairs, kind, boundary_class=cfg.boundary_class)
    if cfg.class_names is not None:
        if kind == "classes" and len(cfg.class_names) >= n_classes:
            n_classes = len(cfg.class_names)
        if len(cfg.class_names) != n_classes:
            hint = (
                "" if cfg.label_kind else f" (label kind detected as {kind!r}: pass --label-kind?)"
            )
            raise ConfigError(
                f"--class-names gives {len(cfg.class_names)} names "
                f"({','.join(cfg.class_names)}) but the {kind} labels need {n_classes} "
                f"classes{hint}"
            )
        names = tuple(cfg.class_names)
    else:
        names = _default_class_names(kind, n_classes, cfg.boundary_class)
    channels = 3 if any(p.image.shape[-1] == 3 for p in pairs) else 1
    if cfg.downsample is not None:
        train_pairs = _shrink(train_pairs, cfg.downsample, kind, main=main)
    cache = cfg.run_dir / "cache" if cfg.w0 > 0 else None
    options = D.WeightOptions(w0=cfg.w0, sigma=cfg.sigma, cache_dir=cache)
    common = {
        "num_classes": n_classes,
        "channels": channels,
        "boundary_class": cfg.boundary_class,
        "weights": options,
    }
    train = D.prepare_items(train_pairs, kind, role="training", **common)
    val = D.prepare_items(val_pairs, kind, role="validation", **common)
    if not train:
        raise ConfigError(
            f"none of the {len(train_pairs)} training label images has foreground; nothing "
            "to learn (check --labels and --label-kind)"
        )
    train = _drop_small_images(train, cfg.tile_size, geometry)
    mean, std = D.channel_stats(train)
    if main:
        log.info(
            "data: %s for training, %d for validation; %s labels -> %d classes (%s); "
            "mean %s std %s",
            D.describe_items(train),
            len(val),
            kind,
            n_classes,
            ", ".join(names),
            [round(m, 4) for m in mean],
            [round(s, 4) for s in std],
        )
    return RunData(kind, names, train, val, channels, mean, std)


def _shrink(
    pairs: list[D.LabelledImage], factor: float, kind: LabelKind, *, main: bool
) -> list[D.LabelledImage]:
    """The training pairs shrunk by ``factor`` (:func:`~tilesegment.train.data.
    downsample_pairs`); validation images stay whole: they are predicted as ``evaluate``
    predicts them (shrunk, then brought back) and scored on their own grid."""
    shrunk = D.downsample_pairs(pairs, factor, kind)
    if main and shrunk:
        (h, w), (sh, sw) = pairs[0].image.shape[:2], shrunk[0].image.shape[:2]
        how = "centre ids" if kind == "instances" else "kernel-weighted majority"
        log.info(
            "--downsample %g: training images shrunk (e.g. %s %d x %d -> %d x %d px, labels "
            "by %s); validation scored on the images' own grid",
            factor,
            pairs[0].name,
            h,
            w,
            sh,
            sw,
            how,
        )
    return shrunk


def _drop_small_images(items: list[TrainItem], tile: int, net: UNetGeometry) -> list[TrainItem]:
    out = tile - 2 * net.halo
    kept = [it for it in items if min(it.image.shape[:2]) >= out]
    if len(kept) == len(items):
        return kept
    biggest = max(min(it.image.shape[:2]) for it in items)
    suggestion = largest_valid_tile(biggest, halo=net.halo, valid=net.valid_input_sizes(64))
    hint = f"; use --tile-size {suggestion} or less" if suggestion else ""
    if not kept:
        raise ConfigError(
            f"--tile-size {tile} px needs images of at least {out} x {out} px (tile - 2 x halo "
            f"{net.halo}), but the largest training image side is {biggest} px{hint}"
        )
    kept_ids = {id(it) for it in kept}
    for it in items:
        if id(it) not in kept_ids:
            log.warning(
                "%s: %d x %d px is smaller than the %d px output window; skipped for training%s",
                it.name,
                it.image.shape[0],
                it.image.shape[1],
                out,
                hint,
            )
    return kept
