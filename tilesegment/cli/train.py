"""``tilesegment train``: train a valid U-Net on images and labels (launch with torchrun for DDP).

Only click is imported at module level; torch and the training stages load inside the command.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from tilesegment.cli.exits import Command
from tilesegment.cli.options import (
    EXISTING_FILE,
    LABEL_KINDS,
    device_option,
    images_option,
    label_pattern_option,
    labels_option,
    precision_option,
    progress_option,
    set_threads,
    show_progress,
    single_device,
    threads_option,
    tile_size_option,
)

#: Every metric ``--select-metric`` knows (which label kinds compute it is checked at the start);
#: kept here so ``--help`` needs no import of the training stages.
SELECT_METRICS = (
    "foreground_dice",
    "foreground_iou",
    "mean_foreground_dice",
    "mean_dice",
    "mean_iou",
    "aji",
    "aji_plus",
    "pq",
    "object_f1",
    "rand_error",
    "pixel_error",
    "info_fscore",
    "val_loss",
)


def _class_names(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(","))
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise click.BadParameter(
            f"{value!r}: give at least two distinct, non-empty names separated by commas "
            "(e.g. membrane,cell)"
        )
    return names


def _half_width(flag: str, text: str) -> Any:
    """An augmentation range S in [0, 1), default 0.1; 0 turns the step off."""
    return click.option(
        flag,
        type=click.FloatRange(0, 1, max_open=True),
        default=0.1,
        show_default=True,
        help=f"{text} 0: off.",
    )


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@click.command(cls=Command)
@images_option()
@labels_option()
@label_pattern_option()
@click.option(
    "-o", "--output", "run_dir", type=click.Path(path_type=Path), required=True,
    help="RUN_DIR for checkpoints (last, best), state, log.jsonl/csv and curves.png.",
)  # fmt: skip
@click.option("--label-kind", type=LABEL_KINDS, help="Label semantics (default: detected, logged).")
@click.option("--class-names", callback=_class_names, help="Comma-separated, e.g. membrane,cell.")
@click.option(
    "--boundary-class", is_flag=True, help="Instances: 3 classes (background, interior, boundary)."
)
@click.option(
    "--train-list",
    type=EXISTING_FILE,
    help="File of training names, one a line, or of image<TAB>label pairs.",
)
@click.option(
    "--val-list",
    type=EXISTING_FILE,
    help="File of validation names, one a line, or of image<TAB>label pairs.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Seeded share of images for validation (without --val-list).",
)
@click.option("--depth", type=click.IntRange(1, 7), default=4, show_default=True)
@click.option("--base-channels", type=click.IntRange(1), default=16, show_default=True)
@click.option("--batch-norm/--no-batch-norm", default=False, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@tile_size_option(default=252, help="Input crop edge in px (a valid U-Net input size).")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--steps-per-epoch", type=click.IntRange(1), default=50, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Global batch over all processes.",
)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(0, min_open=True),
    help="Peak learning rate [default: 1e-3 adam, 1e-2 sgd].",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "step", "constant"]),
    default="cosine",
    show_default=True,
)
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.99, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option(
    "--grad-clip",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Max gradient norm (0: off).",
)
@click.option("--w0", type=click.FloatRange(0), default=10.0, show_default=True)
@click.option("--sigma", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True)
@click.option(
    "--elastic-sigma",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Elastic deformation std (px, 3x3 grid); 0: off.",
)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Flips, scale, stain, intensity and blur jitter (the ranges below).",
)
@_half_width("--scale-jitter", "Zoom by up to 1 + S either way around the model's um/px.")
@_half_width("--hed-scale", "Scale each HED stain amount by U(1 - S, 1 + S).")
@click.option(
    "--hed-shift",
    type=click.FloatRange(0),
    default=0.05,
    show_default=True,
    help="Shift each HED stain amount by U(-S, S) optical density.",
)
@_half_width("--brightness", "Brightness jitter, U(-S, S) on [0, 1] values.")
@_half_width("--contrast", "Contrast jitter, a factor U(1 - S, 1 + S).")
@_half_width("--gamma", "Gamma jitter, an exponent exp(U(-S, S)).")
@click.option(
    "--blur-sigma",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Largest Gaussian blur sigma (px), on half the crops; 0: off.",
)
@click.option(
    "--min-object-size",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="Instances: drop smaller predicted objects (px).",
)
@click.option(
    "--select-metric",
    type=click.Choice(SELECT_METRICS),
    help="Validation metric that picks RUN_DIR/best [default: binary foreground_dice, classes "
    "mean_foreground_dice, instances aji; ISBI membranes: rand_error].",
)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--loader-workers",
    "workers",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="DataLoader worker processes per training process (0: load in the main process).",
)
@device_option(several=False)
@precision_option(auto=False, default="fp32")
@threads_option()
@click.option("--mpp", type=click.FloatRange(0, min_open=True), help="um/px of the images.")
@click.option(
    "--downsample",
    type=click.FloatRange(1, min_open=True),
    help="Shrink images (area-weighted) and labels by this factor before training, e.g. 3 for "
    "PH2's 768 x 560 -> 256 x 187; run, predict and evaluate then shrink images alike and "
    "bring outputs back to the image's grid. For images without um/px: excludes --mpp.",
)
@click.option("--name", help="Model name in the checkpoints [default: RUN_DIR's name].")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR.")
@click.option("--overwrite", is_flag=True, help="Start over in a RUN_DIR that holds a run.")
@progress_option()
def train(run_dir: Path, threads: int | None, progress: bool | None, **options: Any) -> None:
    """Train a valid U-Net on IMAGES/LABELS into RUN_DIR (launch with torchrun for DDP)."""
    from tilesegment.train.config import TrainConfig
    from tilesegment.train.loop import run_training

    set_threads(threads)
    options["device"] = single_device(options["device"])
    cfg = TrainConfig(run_dir=run_dir, progress=show_progress(progress), **options)
    summary = run_training(cfg)
    if not _is_main_process():
        return
    click.echo(_summary_text(summary))


def _summary_text(summary: Any) -> str:
    lines = [f"trained {summary.epochs_run} epochs ({summary.global_step} steps) in "
             f"{summary.run_dir}"]  # fmt: skip
    if not math.isnan(summary.seconds_per_step):
        lines.append(f"  {summary.seconds_per_step:.3f} s/step")
    history = summary.history
    first = next((r for r in history if r.get("train_loss") is not None), None)
    last = history[-1] if history else None
    if first and last and last.get("train_loss") is not None and last is not first:
        lines.append(
            f"  train loss {first['train_loss']:.4f} (epoch {first['epoch']}) -> "
            f"{last['train_loss']:.4f} (epoch {last['epoch']})"
        )
    untrained = next((r for r in history if r["epoch"] == 0), None)
    if summary.best_epoch is not None:
        row = summary.best_row
        metric = summary.best_metric
        before = ""
        if untrained and untrained.get(metric) is not None:
            before = f" (untrained {untrained[metric]:.4f})"
        lines.append(
            f"  best epoch {summary.best_epoch}: {metric} {summary.best_value:.4f}{before}"
        )
        extra = {k: v for k, v in row.items() if k not in ("epoch", "step", "lr", "seconds")}
        lines.append(
            "  " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items() if isinstance(v, float))
        )
        lines.append(f"  best checkpoint: {summary.best_path} (tilesegment run --model ...)")
    lines.append(f"  last checkpoint: {summary.last_path}")
    return "\n".join(lines)
