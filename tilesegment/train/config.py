"""What a training run is asked to do (:class:`TrainConfig`), what it reports
(:class:`TrainSummary`), and how its data is named in a checkpoint's provenance."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tilesegment.errors import ConfigError, TilesegmentError
from tilesegment.train.labels import LabelKind

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["cosine", "step", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]

#: Default learning rate per optimizer.
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2}


#: Options that must not change when a run is resumed (the data, the model, the sampling).
FROZEN_ON_RESUME = (
    "images",
    "labels",
    "label_pattern",
    "label_kind",
    "class_names",
    "boundary_class",
    "train_list",
    "val_list",
    "val_fraction",
    "depth",
    "base_channels",
    "batch_norm",
    "dropout",
    "tile_size",
    "batch_size",
    "steps_per_epoch",
    "seed",
    "optimizer",
    "w0",
    "sigma",
    "elastic_sigma",
    "augment",
    "scale_jitter",
    "hed_scale",
    "hed_shift",
    "brightness",
    "contrast",
    "gamma",
    "blur_sigma",
    "select_metric",
    "downsample",
)


class TrainingDiverged(TilesegmentError, FloatingPointError):
    """The loss or the gradient became NaN or infinite."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything a training run depends on (the CLI options of ``tilesegment train``)."""

    run_dir: Path
    """Output folder: checkpoints, state, logs, curves, weight-map cache."""
    images: Path | None = None
    """Image stack file or folder (tree); None when the lists hold image<TAB>label pairs."""
    labels: Path | None = None
    """Label stack file or folder; None = the same tree as ``images``."""
    label_pattern: str | None = None
    """File-name template of the labels (``{stem}_GT.png``); None = the recognised suffixes."""
    label_kind: LabelKind | None = None
    """binary, classes or instances; None = detect (logged)."""
    class_names: tuple[str, ...] | None = None
    """One name per output class; None = generic names."""
    boundary_class: bool = False
    """Instances: 3 classes (background, interior, boundary)."""
    train_list: Path | None = None
    """Text file of training names (stems, or ``stem:i`` for stack slices) or of
    image<TAB>label pairs."""
    val_list: Path | None = None
    """Text file of validation names or pairs."""
    val_fraction: float = 0.1
    """Seeded fraction of images held out for validation when no --val-list is given."""
    depth: int = 4
    base_channels: int = 16
    batch_norm: bool = False
    dropout: float = 0.0
    tile_size: int = 252
    """Input crop edge in px; must be a valid U-Net input size."""
    epochs: int = 20
    steps_per_epoch: int = 50
    """Optimizer steps per epoch (an epoch is this many random global batches)."""
    batch_size: int = 4
    """Global batch (crops per step over all processes)."""
    optimizer: Optimizer = "adam"
    lr: float | None = None
    """Peak learning rate; None = 1e-3 (Adam) or 1e-2 (SGD)."""
    lr_schedule: Schedule = "cosine"
    """cosine (to 1 % of lr), step (x0.1 at 50 % and 75 % of the steps) or constant."""
    momentum: float = 0.99
    """SGD momentum (the paper's 0.99)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global L2 norm of the gradients; 0 disables clipping."""
    w0: float = 10.0
    sigma: float = 5.0
    elastic_sigma: float = 10.0
    """Elastic deformation (3 x 3 grid) displacement std in px; 0 disables it."""
    augment: bool = True
    """Flips/rotations, scale jitter and stain/intensity/blur jitter (False: none of them)."""
    scale_jitter: float = 0.1
    """Zoom by a log-uniform factor in [1 / (1 + s), 1 + s] around the model's µm/px; 0: off."""
    hed_scale: float = 0.1
    """HED stain amounts scaled by U(1 - s, 1 + s) (Tellez et al. 2018)."""
    hed_shift: float = 0.05
    """HED stain amounts shifted by U(-s, s) optical density."""
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.1
    """Half-widths of the intensity jitter, see tilesegment.train.augment.intensity_jitter."""
    blur_sigma: float = 1.0
    """Largest Gaussian blur sigma (px), applied to half the crops; 0: off."""
    min_object_size: int = 10
    """Instances: predicted objects smaller than this (px) are dropped before scoring."""
    select_metric: str | None = None
    """Validation metric that picks the best checkpoint; None = by label kind
    (:data:`tilesegment.train.evaluate.SELECTION_METRIC`)."""
    seed: int = 0
    workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    device: str = "cpu"
    precision: Precision = "fp32"
    """Autocast dtype; bf16/fp16 need CUDA."""
    channels_last: bool = True
    mpp: float | None = None
    """µm/px of the images, recorded in the model (the images are not resampled)."""
    downsample: float | None = None
    """Shrink every training image and label by this factor (> 1) first, and record it in the
    model; for images without a µm/px, so it excludes ``mpp``. None: 1."""
    name: str | None = None
    """Model name in the checkpoints; default the run folder's name."""
    resume: bool = False
    overwrite: bool = False
    progress: bool = False

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        for k, v in doc.items():
            if isinstance(v, Path):
                doc[k] = str(v.resolve()) if k != "run_dir" else str(v)
            elif isinstance(v, tuple):
                doc[k] = list(v)
        return doc

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


@dataclass(slots=True)
class TrainSummary:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    epochs_run: int
    """Epochs completed in total (including those before a resume)."""
    global_step: int
    best_epoch: int | None
    """Epoch of the best checkpoint (0 = the untrained model never wins: None then)."""
    best_metric: str
    best_value: float
    best_path: Path | None
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_step: float = math.nan

    @property
    def best_row(self) -> dict[str, Any]:
        return next((r for r in self.history if r["epoch"] == self.best_epoch), {})


def check_config(cfg: TrainConfig) -> None:
    checks = (
        (cfg.epochs >= 1, f"--epochs ({cfg.epochs}) must be >= 1"),
        (cfg.steps_per_epoch >= 1, f"--steps-per-epoch ({cfg.steps_per_epoch}) must be >= 1"),
        (cfg.batch_size >= 1, f"--batch-size ({cfg.batch_size}) must be >= 1"),
        (cfg.peak_lr > 0 and math.isfinite(cfg.peak_lr), f"--lr ({cfg.lr}) must be > 0"),
        (cfg.workers >= 0, f"--workers ({cfg.workers}) must be >= 0"),
        (cfg.grad_clip >= 0, f"--grad-clip ({cfg.grad_clip}) must be >= 0"),
        (cfg.w0 >= 0, f"--w0 ({cfg.w0}) must be >= 0"),
        (cfg.sigma > 0, f"--sigma ({cfg.sigma}) must be > 0"),
        (cfg.elastic_sigma >= 0, f"--elastic-sigma ({cfg.elastic_sigma}) must be >= 0"),
        (0 <= cfg.val_fraction < 1, f"--val-fraction ({cfg.val_fraction}) must be in [0, 1)"),
        (cfg.blur_sigma >= 0, f"--blur-sigma ({cfg.blur_sigma}) must be >= 0"),
        (cfg.hed_shift >= 0, f"--hed-shift ({cfg.hed_shift}) must be >= 0"),
        *(
            (
                0 <= getattr(cfg, k) < 1,
                f"--{k.replace('_', '-')} ({getattr(cfg, k)}) must be in [0, 1)",
            )
            for k in ("scale_jitter", "hed_scale", "brightness", "contrast", "gamma")
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if cfg.downsample is not None:
        if cfg.mpp is not None:
            raise ConfigError(
                f"--mpp {cfg.mpp:g} and --downsample {cfg.downsample:g} exclude each other: a "
                "model is scaled by µm/px (--mpp) or, for images without one, by a factor "
                "(--downsample); give one"
            )
        if not (math.isfinite(cfg.downsample) and cfg.downsample > 1):
            raise ConfigError(f"--downsample ({cfg.downsample}) must be a number > 1")
    if cfg.lr_schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"--lr-schedule {cfg.lr_schedule!r} must be cosine, step or constant")
    if cfg.optimizer not in DEFAULT_LR:
        raise ConfigError(f"--optimizer {cfg.optimizer!r} must be adam or sgd")


def provenance_path(path: str | Path | None) -> str | None:
    """How a checkpoint names a file or folder of its training data: the data set's folder and
    the item (``/any/where/monuseg/images`` -> ``monuseg/images``), never a machine's path.

    >>> provenance_path("/work/shared/data/isbi2012/train-volume.tif")
    'isbi2012/train-volume.tif'
    """
    if path is None:
        return None
    return "/".join(Path(path).resolve().parts[-2:])


def provenance_config(cfg: TrainConfig) -> dict[str, Any]:
    """:meth:`TrainConfig.to_json` as a checkpoint records it: data paths by
    :func:`provenance_path`, the run folder by its name."""
    doc = cfg.to_json()
    for key in ("images", "labels", "train_list", "val_list"):
        doc[key] = provenance_path(doc[key])
    doc["run_dir"] = Path(cfg.run_dir).name
    return doc
