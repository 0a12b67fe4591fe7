"""The training loop: weighted cross-entropy, DDP, checkpoints and resume, logs and curves.

Loss
    Pixel-wise softmax cross-entropy on the valid output window, weighted by the weight map
    and normalised by the weights of the *global* batch: ``sum(w * CE) / sum(w)`` over every
    pixel of every crop of the step, on all ranks together. Each rank computes its local sum,
    one all-reduce gives the global ``sum(w)`` (and the global loss, for logging and the NaN
    check, so every rank stops together), and rank ``r`` back-propagates
    ``R * sum_r(w * CE) / sum(w)``; DDP's gradient averaging (divide by R) then yields exactly
    the gradient of the single-process loss. A weighted mean, unlike a plain mean, keeps the
    loss scale independent of how much border weight a batch happens to contain.
Data split
    The global batch of step ``s`` is samples ``s * B .. s * B + B - 1`` of the epoch; rank
    ``r`` of ``R`` takes the block of ``B / R`` starting at ``s * B + r * B / R``
    (:class:`~tilesegment.train.data.RankSampler`). A sample depends only on (seed, epoch,
    index), so 1 and R processes see the same data in the same batches. (With
    ``--batch-norm`` the statistics are per rank, over its B / R crops, and DDP broadcasts
    rank 0's running statistics: the run then depends on R; no SyncBatchNorm.)
Checkpoints
    After every epoch rank 0 writes ``RUN_DIR/last`` (``.safetensors`` + ``.json``, a normal
    model checkpoint), ``RUN_DIR/best`` when the validation metric improved, and the training
    state ``RUN_DIR/state.safetensors`` + ``state.json``: the optimizer ``state_dict`` with
    its tensors flattened into safetensors under ``optim/<param>/<name>`` and everything else
    (hyper-parameters, step counters) in JSON, the GradScaler state, the epoch/step
    counters, the best score and the history; no pickle anywhere. The state
    JSON records the SHA-256 of ``last.safetensors`` so a torn pair is detected on resume.
Determinism
    Crops come from (seed, epoch, index); torch's global RNG (dropout) is re-seeded at every
    epoch from (seed, epoch, rank), so its state is a function of the counters and needs no
    saving; the learning rate is a pure function of the global step; validation runs on a
    copy of the network. A run resumed from epoch k therefore
    continues exactly where an uninterrupted run would be (bit for bit on CPU with the same
    thread count).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from tilesegment.errors import ConfigError, TilesegmentError
from tilesegment.model.checkpoint import (
    ModelSpec,
    checkpoint_paths,
    file_sha256,
    load_checkpoint,
    new_model,
    save_checkpoint,
)
from tilesegment.model.unet import UNet, UNetConfig
from tilesegment.train import data as D
from tilesegment.train.evaluate import SELECTION_METRIC, SUMMARY_METRICS, evaluate_items
from tilesegment.train.labels import LabelKind

log = logging.getLogger(__name__)

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["cosine", "step", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]

STATE_FORMAT = "tilesegment-train-state"
STATE_VERSION = 1
#: Default learning rate per optimizer.
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2}
#: Options that must not change when a run is resumed (the data, the model, the sampling).
_FROZEN_ON_RESUME = (
    "images",
    "labels",
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
)


class TrainingDiverged(TilesegmentError, FloatingPointError):
    """The loss or the gradient became NaN or infinite."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything a training run depends on (the CLI options of ``tilesegment train``)."""

    images: Path
    """Image stack file or folder."""
    labels: Path
    """Label stack file or folder."""
    run_dir: Path
    """Output folder: checkpoints, state, logs, curves, weight-map cache."""
    label_kind: LabelKind | None = None
    """binary, classes or instances; None = detect (logged)."""
    class_names: tuple[str, ...] | None = None
    """One name per output class; None = generic names."""
    boundary_class: bool = False
    """Instances: 3 classes (background, interior, boundary)."""
    train_list: Path | None = None
    """Text file of training names (stems, or ``stem:i`` for stack slices)."""
    val_list: Path | None = None
    """Text file of validation names."""
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
    """Flips/rotations and intensity/stain jitter."""
    min_object_size: int = 10
    """Instances: predicted objects smaller than this (px) are dropped before scoring."""
    seed: int = 0
    workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    device: str = "cpu"
    precision: Precision = "fp32"
    """Autocast dtype; bf16/fp16 need CUDA."""
    channels_last: bool = True
    mpp: float | None = None
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


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True, slots=True)
class _Ranks:
    world: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _ranks_from_env() -> _Ranks:
    """WORLD_SIZE / RANK / LOCAL_RANK as set by torchrun; one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"malformed WORLD_SIZE/RANK/LOCAL_RANK environment ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} / WORLD_SIZE {world} from the environment are invalid")
    return _Ranks(world, rank, local)


def _device_for(cfg: TrainConfig, ranks: _Ranks) -> torch.device:
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {cfg.device!r} is not a torch device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
        if ranks.world > 1:
            device = torch.device("cuda", ranks.local_rank)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ConfigError(
            f"--precision {cfg.precision} needs a CUDA device; training on {device.type} "
            "runs in fp32"
        )
    return device


# --------------------------------------------------------------------------- schedule
def learning_rate(step: int, total: int, peak: float, schedule: Schedule) -> float:
    """Learning rate for (0-based) optimizer step ``step`` of ``total``.

    >>> learning_rate(0, 100, 1.0, "cosine"), round(learning_rate(100, 100, 1.0, "cosine"), 3)
    (1.0, 0.01)
    >>> [learning_rate(s, 100, 1.0, "step") for s in (0, 50, 75)]
    [1.0, 0.1, 0.010000000000000002]
    """
    if schedule == "constant" or total <= 0:
        return peak
    t = min(step / total, 1.0)
    if schedule == "cosine":
        return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))
    if schedule == "step":
        return peak * 0.1 ** (int(t >= 0.5) + int(t >= 0.75))
    raise ConfigError(f"--lr-schedule {schedule!r} must be cosine, step or constant")


# --------------------------------------------------------------------------- state files
def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON.

    Tensors of ``sd["state"][p][name]`` become ``optim/<p>/<name>``; in the JSON their place
    holds ``{"tensor": key}``. ``param_groups`` must be JSON-serialisable (true for torch's
    optimizers: numbers, bools, None, tuples of floats, parameter indices).
    """
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        doc: dict[str, Any] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                key = f"optim/{pid}/{name}"
                tensors[key] = value.detach().to("cpu").contiguous()
                doc[name] = {"tensor": key}
            else:
                doc[name] = value
        state[str(pid)] = doc
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], doc: dict, template: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; ``template`` is a fresh optimizer's
    ``state_dict`` whose tuple-valued hyper-parameters (e.g. Adam's ``betas``) are restored
    as tuples."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in doc["state"].items():
        state[int(pid)] = {
            name: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for name, v in entry.items()
        }
    groups = []
    for saved, fresh in zip(doc["param_groups"], template["param_groups"], strict=True):
        group = dict(saved)
        for key, value in fresh.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _atomic_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def _save_state(run_dir: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    weights = run_dir / "state.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
    tmp.replace(weights)
    doc["state_sha256"] = file_sha256(weights)
    _atomic_json(run_dir / "state.json", doc)


def _load_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = run_dir / "state.json"
    if not path.is_file():
        raise ConfigError(
            f"--resume: {path} not found; {run_dir} holds no resumable run (start it without "
            "--resume)"
        )
    try:
        doc = json.loads(path.read_text())
        tensors = load_file(str(run_dir / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"--resume: unreadable training state in {run_dir} ({exc})") from exc
    if doc.get("format") != STATE_FORMAT or int(doc.get("format_version", 0)) > STATE_VERSION:
        raise ConfigError(f"--resume: {path} is not a tilesegment training state")
    if doc.get("state_sha256") != file_sha256(run_dir / "state.safetensors"):
        raise ConfigError(f"--resume: {run_dir}/state.safetensors does not match state.json")
    weights, _ = checkpoint_paths(run_dir / "last")
    if not weights.is_file() or doc.get("weights_sha256") != file_sha256(weights):
        raise ConfigError(
            f"--resume: {weights} does not match {path} (interrupted while saving?); the "
            "run cannot be resumed exactly"
        )
    return tensors, doc


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    current = cfg.to_json()
    changed = [k for k in _FROZEN_ON_RESUME if current.get(k) != saved.get(k)]
    if changed:
        detail = ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed
        )
        raise ConfigError(f"--resume: options differ from the interrupted run ({detail})")
    for key in ("epochs", "lr", "lr_schedule"):
        if current.get(key) != saved.get(key):
            log.warning(
                "--resume with a different --%s (%r, was %r): the curve will differ from an "
                "uninterrupted run from here on",
                key.replace("_", "-"),
                current.get(key),
                saved.get(key),
            )


_RUN_FILES = (
    "last.json",
    "last.safetensors",
    "best.json",
    "best.safetensors",
    "state.json",
    "state.safetensors",
    "log.jsonl",
    "log.csv",
    "curves.png",
)


def _check_run_dir(cfg: TrainConfig) -> None:
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"-o {run_dir} exists and is not a folder")
    existing = [f for f in _RUN_FILES if (run_dir / f).exists()]
    if cfg.resume or not existing or cfg.overwrite:
        return
    raise ConfigError(
        f"{run_dir} already holds a training run ({existing[0]}); pass --resume to continue "
        "it or --overwrite to start over"
    )


# --------------------------------------------------------------------------- data
@dataclass(slots=True)
class _Data:
    kind: LabelKind
    class_names: tuple[str, ...]
    train: list[D.TrainItem]
    val: list[D.TrainItem]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _default_class_names(kind: LabelKind, n: int, boundary: bool) -> tuple[str, ...]:
    if kind != "classes":
        return (
            ("background", "foreground", "boundary") if boundary else ("background", "foreground")
        )
    return ("background", *(f"class{i}" for i in range(1, n)))


def _prepare_data(cfg: TrainConfig, net: UNet, ranks: _Ranks) -> _Data:
    pairs = D.load_pairs(cfg.images, cfg.labels)
    train_names = D.read_name_list(cfg.train_list) if cfg.train_list else None
    val_names = D.read_name_list(cfg.val_list) if cfg.val_list else None
    train_pairs, val_pairs = D.split_pairs(
        pairs,
        train_names=train_names,
        val_names=val_names,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )
    kind = D.resolve_label_kind(train_pairs + val_pairs, cfg.label_kind)
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
    train = _drop_small_images(train, cfg.tile_size, net)
    mean, std = D.channel_stats(train)
    if ranks.is_main:
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
    return _Data(kind, names, train, val, channels, mean, std)


def _drop_small_images(items: list[D.TrainItem], tile: int, net: UNet) -> list[D.TrainItem]:
    out = tile - 2 * net.halo
    kept = [it for it in items if min(it.image.shape[:2]) >= out]
    if len(kept) == len(items):
        return kept
    biggest = max(min(it.image.shape[:2]) for it in items)
    suggestion = D.largest_valid_tile(biggest, halo=net.halo, valid=net.valid_input_sizes(64))
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


# --------------------------------------------------------------------------- logging
_CSV_BASE = ("epoch", "step", "train_loss", "val_loss")


def _csv_columns(kind: str) -> tuple[str, ...]:
    return (*_CSV_BASE, *SUMMARY_METRICS[kind], "lr", "seconds")


def _write_logs(run_dir: Path, history: Sequence[dict[str, Any]], kind: str) -> None:
    """Rewrite log.jsonl and log.csv from the history (cheap: one row per epoch)."""
    with (run_dir / "log.jsonl.tmp").open("w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    (run_dir / "log.jsonl.tmp").replace(run_dir / "log.jsonl")
    columns = _csv_columns(kind)
    with (run_dir / "log.csv.tmp").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in history:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    (run_dir / "log.csv.tmp").replace(run_dir / "log.csv")


_warned_matplotlib = False


def draw_curves(path: Path, history: Sequence[dict[str, Any]], kind: str) -> bool:
    """Loss and metric curves per epoch as a PNG; False (warned once) without matplotlib."""
    global _warned_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib import pyplot as plt
    except ImportError:
        if not _warned_matplotlib:
            log.warning("matplotlib is not installed (pip install tilesegment[bench]): no curves")
            _warned_matplotlib = True
        return False
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="weighted cross-entropy", title="loss")
    ax_loss.legend()
    for key in SUMMARY_METRICS[kind]:
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax_metric.plot(*zip(*pts, strict=True), marker=".", label=key)
    ax_metric.set(xlabel="epoch", title="validation metrics")
    if ax_metric.lines:
        ax_metric.legend()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------- the loop
class _Trainer:
    """One rank's training state; constructed by :func:`run_training`."""

    def __init__(self, cfg: TrainConfig, ranks: _Ranks, device: torch.device) -> None:
        self.cfg, self.ranks, self.device = cfg, ranks, device
        probe = UNet(UNetConfig(depth=cfg.depth, base_channels=1, in_channels=1))
        probe.check_input_size(cfg.tile_size, name="--tile-size")
        self.data = _prepare_data(cfg, probe, ranks)
        self.kind = self.data.kind
        self.metric, self.lower_is_better = (
            SELECTION_METRIC[self.kind] if self.data.val else ("train_loss", True)
        )
        unet = UNetConfig(
            depth=cfg.depth,
            base_channels=cfg.base_channels,
            in_channels=self.data.channels,
            classes=len(self.data.class_names),
            batch_norm=cfg.batch_norm,
            dropout=cfg.dropout,
        )
        name = cfg.name or cfg.run_dir.resolve().name
        base = ModelSpec.default(unet, name=name, mpp=cfg.mpp)
        self.spec = dataclasses.replace(
            base,
            class_names=self.data.class_names,
            mean=self.data.mean,
            std=self.data.std,
        )
        self.net = new_model(self.spec, seed=cfg.seed).to(device).train()
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = self.net
        if ranks.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        c = unet.in_channels
        self._mean = torch.tensor(self.spec.mean, device=device).view(1, c, 1, 1)
        self._inv_std = (1.0 / torch.tensor(self.spec.std, device=device)).view(1, c, 1, 1)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "value": None}
        self.total_steps = cfg.epochs * cfg.steps_per_epoch
        self.train_seconds = 0.0
        self.train_steps_timed = 0
        self.sampler = D.RankSampler(
            steps=cfg.steps_per_epoch,
            global_batch=cfg.batch_size,
            rank=ranks.rank,
            world=ranks.world,
        )
        crops = D.CropSampler(
            self.data.train,
            tile=cfg.tile_size,
            halo=self.net.halo,
            pooling=self.net.pooling,
            seed=cfg.seed,
            augment=D.AugmentOptions(
                flips=cfg.augment, elastic_sigma=cfg.elastic_sigma, intensity=cfg.augment
            ),
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        self.loader = torch.utils.data.DataLoader(
            D.CropDataset(crops),
            batch_size=self.sampler.local_batch,
            sampler=self.sampler,
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            worker_init_fn=_worker_init,
            generator=generator,
            pin_memory=device.type == "cuda",
        )

    # ---------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        params = self.net.parameters()
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        raise ConfigError(f"--optimizer {cfg.optimizer!r} must be adam or sgd")

    def resume(self) -> None:
        tensors, doc = _load_state(self.cfg.run_dir)
        _check_resume_config(self.cfg, doc["config"])
        net, spec = load_checkpoint(self.cfg.run_dir / "last", device=self.device)
        if spec.unet != self.spec.unet:
            raise ConfigError(
                f"--resume: the saved model is {spec.unet}, expected {self.spec.unet}"
            )
        self.net.load_state_dict(net.state_dict())
        self.net.train()
        template = self.optimizer.state_dict()
        self.optimizer.load_state_dict(
            unflatten_optimizer_state(tensors, doc["optimizer"], template)
        )
        if self.scaler is not None and doc.get("scaler"):
            self.scaler.load_state_dict(doc["scaler"])
        self.epoch, self.step = int(doc["epoch"]), int(doc["global_step"])
        self.history = list(doc["history"])
        self.best = dict(doc["best"])
        self.train_seconds = float(doc.get("train_seconds", 0.0))
        self.train_steps_timed = int(doc.get("train_steps_timed", 0))
        if self.ranks.is_main:
            log.info("resumed %s at epoch %d, step %d", self.cfg.run_dir, self.epoch, self.step)
            _write_logs(self.cfg.run_dir, self.history, self.kind)

    # ---------------------------------------------------------------- one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_step(self, batch: Sequence[torch.Tensor]) -> float:
        """One optimizer step on this rank's share of a global batch; returns the global loss."""
        image, target, weights = (t.to(self.device, non_blocking=True) for t in batch)
        x = image.float().mul_(1.0 / 255.0)
        x = (x - self._mean) * self._inv_std
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = learning_rate(self.step, self.total_steps, self.cfg.peak_lr, self.cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            logits = self.model(x)
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        local_sum = (weights * ce).sum()
        totals = torch.stack([local_sum.detach(), weights.sum()]).double()
        if self.ranks.world > 1:
            dist.all_reduce(totals)
        global_loss = float(totals[0] / totals[1])
        if not math.isfinite(global_loss):
            self._diverged("loss", global_loss, lr)
        loss = local_sum * (self.ranks.world / totals[1].float())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
            if not torch.isfinite(norm) and self.scaler is None:
                self._diverged("gradient norm", float(norm), lr)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        return global_loss

    def _diverged(self, what: str, value: float, lr: float) -> None:
        last = checkpoint_paths(self.cfg.run_dir / "last")[1]
        keep = f"; the last good checkpoint is {last}" if last.exists() else ""
        raise TrainingDiverged(
            f"training diverged: the {what} is {value} at epoch {self.epoch + 1}, step "
            f"{self.step + 1} (lr {lr:.3g}); lower --lr (e.g. {self.cfg.peak_lr / 10:.2g}) or "
            f"check the labels and weight maps{keep}"
        )

    # ---------------------------------------------------------------- epochs
    def validate(self) -> tuple[float | None, dict[str, Any]]:
        """(validation loss, mean metrics) of the current weights on the validation images."""
        if not self.data.val:
            return None, {}
        from tilesegment.infer.predict import Predictor

        net = copy.deepcopy(self.net).eval()
        precision = self.cfg.precision if self.device.type == "cuda" else "fp32"
        predictor = Predictor(net, self.spec, device=self.device, precision=precision)
        report = evaluate_items(
            self.data.val, predictor, self.kind, min_object_size=self.cfg.min_object_size
        )
        return _finite(report.loss), report.mean

    def _improved(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        best = self.best.get("value")
        if best is None:
            return True
        return value < best if self.lower_is_better else value > best

    def _row(self, train_loss: float | None, seconds: float) -> dict[str, Any]:
        val_loss, metrics = self.validate()
        lr = learning_rate(self.step, self.total_steps, self.cfg.peak_lr, self.cfg.lr_schedule)
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": _finite(train_loss),
            "val_loss": val_loss,
        }
        row.update({k: _finite(v) for k, v in metrics.items()})
        row.update(lr=lr, seconds=round(seconds, 3))
        return row

    def save(self, row: dict[str, Any]) -> None:
        """Checkpoints, state, logs and curves after an epoch (rank 0 only)."""
        cfg = self.cfg
        run_dir = cfg.run_dir
        improved = row["epoch"] > 0 and self._improved(row.get(self.metric))
        if improved:
            self.best = {"epoch": row["epoch"], "value": row[self.metric], "metric": self.metric}
        training = {
            "command": "tilesegment train",
            "label_kind": self.kind,
            "boundary_class": cfg.boundary_class,
            "data": {
                "images": str(Path(cfg.images).resolve()),
                "labels": str(Path(cfg.labels).resolve()),
                "train": [it.name for it in self.data.train],
                "validation": [it.name for it in self.data.val],
            },
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.ranks.world,
            "config": cfg.to_json(),
            "metrics": {k: v for k, v in row.items() if k not in ("lr", "seconds")},
            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        spec = dataclasses.replace(self.spec, training=training)
        weights, _ = save_checkpoint(self.net, spec, run_dir / "last")
        if improved:
            save_checkpoint(self.net, spec, run_dir / "best")
        tensors, optim_doc = flatten_optimizer_state(self.optimizer.state_dict())
        doc = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "epoch": self.epoch,
            "global_step": self.step,
            "weights_sha256": file_sha256(weights),
            "optimizer": optim_doc,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": self.best,
            "history": self.history,
            "config": cfg.to_json(),
            "train_seconds": self.train_seconds,
            "train_steps_timed": self.train_steps_timed,
        }
        _save_state(run_dir, tensors, doc)
        _write_logs(run_dir, self.history, self.kind)
        draw_curves(run_dir / "curves.png", self.history, self.kind)

    def run(self, stop_after_epoch: int | None = None) -> TrainSummary:
        cfg, main = self.cfg, self.ranks.is_main
        if main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.history and main and self.data.val:
            start = time.perf_counter()
            row = self._row(None, 0.0)
            row["seconds"] = round(time.perf_counter() - start, 3)
            self.history.append(row)
            log.info("epoch 0 (untrained): %s", _describe(row, self.kind))
        bar = _progress_bar(cfg, main, self.step, self.total_steps)
        try:
            while self.epoch < cfg.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    break
                self._one_epoch(bar)
        finally:
            if bar is not None:
                bar.close()
        return self._summary()

    def _one_epoch(self, bar: Any) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        self.net.train()
        self.sampler.epoch = self.epoch
        torch.manual_seed(_torch_seed(cfg.seed, self.epoch, self.ranks.rank))
        losses = []
        for batch in self.loader:
            t0 = time.perf_counter()
            losses.append(self.train_step(batch))
            self.train_seconds += time.perf_counter() - t0
            self.train_steps_timed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{losses[-1]:.4f}")
        self.epoch += 1
        if self.ranks.is_main:
            row = self._row(float(np.mean(losses)), 0.0)
            row["seconds"] = round(time.perf_counter() - start, 3)
            self.history.append(row)
            self.save(row)
            log.info("epoch %d/%d: %s", self.epoch, cfg.epochs, _describe(row, self.kind))
            if bar is not None:
                bar.set_postfix(epoch=self.epoch, **_short(row, self.kind))
        if self.ranks.world > 1:
            dist.barrier()

    def _summary(self) -> TrainSummary:
        run_dir = self.cfg.run_dir
        best_epoch = self.best.get("epoch")
        best_path = run_dir / "best" if best_epoch is not None else None
        timed = self.train_steps_timed
        return TrainSummary(
            run_dir=run_dir,
            epochs_run=self.epoch,
            global_step=self.step,
            best_epoch=best_epoch,
            best_metric=self.metric,
            best_value=math.nan if self.best.get("value") is None else self.best["value"],
            best_path=best_path,
            last_path=run_dir / "last",
            history=list(self.history),
            seconds_per_step=self.train_seconds / timed if timed else math.nan,
        )


def _torch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of torch's global RNG (dropout) for one epoch of one rank.

    Re-seeding at every epoch from the counters makes the RNG state a function of
    (seed, epoch, rank): nothing to save, and a resumed run draws the same numbers.
    """
    return int(np.random.SeedSequence([seed, epoch, rank, 0x70C4]).generate_state(1)[0])


def _worker_init(worker_id: int) -> None:
    """DataLoader workers: one thread each (they only run numpy augmentation)."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # nothing should use the global RNG; make it reproducible anyway  # noqa: NPY002


def _describe(row: dict[str, Any], kind: str) -> str:
    parts = [f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss") if row.get(k) is not None]
    parts += [f"{k} {row[k]:.4f}" for k in SUMMARY_METRICS[kind] if row.get(k) is not None]
    return ", ".join(parts) + f", lr {row['lr']:.3g}, {row['seconds']:.1f} s"


def _short(row: dict[str, Any], kind: str) -> dict[str, str]:
    key = SELECTION_METRIC[kind][0]
    out = {}
    if row.get("train_loss") is not None:
        out["loss"] = f"{row['train_loss']:.4f}"
    if row.get(key) is not None:
        out[key] = f"{row[key]:.4f}"
    return out


def _progress_bar(cfg: TrainConfig, main: bool, done: int, total: int) -> Any:
    if not (cfg.progress and main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", desc="train", dynamic_ncols=True)


def run_training(cfg: TrainConfig, *, stop_after_epoch: int | None = None) -> TrainSummary:
    """Train (or resume) a valid U-Net as configured; the entry point of ``tilesegment train``.

    Launched by ``torchrun`` it runs as one rank of a DistributedDataParallel job (gloo on CPU,
    NCCL on CUDA; WORLD_SIZE/RANK/LOCAL_RANK from the environment). Only rank 0 writes files.

    Parameters
    ----------
    cfg : TrainConfig
    stop_after_epoch : int, optional
        Stop (as if interrupted) once this many epochs are complete; the run can be resumed.

    Raises
    ------
    ConfigError
        Bad data, options or run folder.
    TrainingDiverged
        The loss or gradient became NaN/inf.
    """
    _check_config(cfg)
    ranks = _ranks_from_env()
    device = _device_for(cfg, ranks)
    _check_run_dir(cfg)
    if cfg.batch_size % ranks.world:
        raise ConfigError(
            f"--batch-size ({cfg.batch_size}) must be divisible by the number of processes "
            f"({ranks.world})"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    try:
        if ranks.world > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
            started = True
        trainer = _Trainer(cfg, ranks, device)
        if cfg.resume:
            trainer.resume()
        elif cfg.overwrite and ranks.is_main:
            for name in _RUN_FILES:
                (cfg.run_dir / name).unlink(missing_ok=True)
        if ranks.world > 1:
            dist.barrier()
        return trainer.run(stop_after_epoch)
    finally:
        if started:
            dist.destroy_process_group()


def _check_config(cfg: TrainConfig) -> None:
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
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if cfg.lr_schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"--lr-schedule {cfg.lr_schedule!r} must be cosine, step or constant")
    if cfg.optimizer not in DEFAULT_LR:
        raise ConfigError(f"--optimizer {cfg.optimizer!r} must be adam or sgd")
