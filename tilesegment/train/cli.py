"""Click commands ``tilesegment train`` and ``tilesegment evaluate`` (registered by cli.py).

Only click is imported at module level; torch and the training stages load inside the
commands so ``tilesegment --help`` stays instant. Errors are tilesegment exceptions, turned
into one-line messages and exit codes by the group in :mod:`tilesegment.cli`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

_KINDS = click.Choice(["binary", "classes", "instances"])
_EXISTING = click.Path(exists=True, path_type=Path)
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


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


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@click.command()
@click.option("--images", type=_EXISTING, required=True, help="Image stack (TIFF) or folder.")
@click.option(
    "--labels", type=_EXISTING, required=True, help="Label stack or folder (matched by stem)."
)
@click.option(
    "-o", "--output", "run_dir", type=click.Path(path_type=Path), required=True,
    help="RUN_DIR for checkpoints (last, best), state, log.jsonl/csv and curves.png.",
)  # fmt: skip
@click.option("--label-kind", type=_KINDS, help="Label semantics (default: detected, logged).")
@click.option("--class-names", callback=_class_names, help="Comma-separated, e.g. membrane,cell.")
@click.option(
    "--boundary-class", is_flag=True, help="Instances: 3 classes (background, interior, boundary)."
)
@click.option("--train-list", type=_EXISTING_FILE, help="File of training names, one a line.")
@click.option("--val-list", type=_EXISTING_FILE, help="File of validation names, one a line.")
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
@click.option(
    "--tile-size",
    type=click.IntRange(1),
    default=252,
    show_default=True,
    help="Input crop edge in px (a valid U-Net input).",
)
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
@click.option("--augment/--no-augment", default=True, show_default=True, help="Flips and jitter.")
@click.option(
    "--min-object-size",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="Instances: drop smaller predicted objects (px).",
)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True
)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads per process.")
@click.option("--mpp", type=click.FloatRange(0, min_open=True), help="um/px of the images.")
@click.option("--name", help="Model name in the checkpoints [default: RUN_DIR's name].")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR.")
@click.option("--overwrite", is_flag=True, help="Start over in a RUN_DIR that holds a run.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
def train(run_dir: Path, threads: int | None, progress: bool | None, **options: Any) -> None:
    """Train a valid U-Net on IMAGES/LABELS into RUN_DIR (launch with torchrun for DDP)."""
    from tilesegment.train.loop import TrainConfig, run_training

    _set_threads(threads)
    show = sys.stderr.isatty() if progress is None else progress
    cfg = TrainConfig(run_dir=run_dir, progress=show, **options)
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


@click.command()
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Checkpoint NAME (or NAME.json / NAME.safetensors).",
)
@click.option("--images", type=_EXISTING, required=True, help="Image stack (TIFF) or folder.")
@click.option("--labels", type=_EXISTING, required=True, help="Label stack or folder.")
@click.option("--label-kind", type=_KINDS, help="Default: as trained, else detected.")
@click.option("--list", "name_list", type=_EXISTING_FILE, help="Only the names in this file.")
@click.option(
    "--min-object-size", type=click.IntRange(0), help="Instances: drop smaller objects (px)."
)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True
)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def evaluate(
    model_path: Path,
    images: Path,
    labels: Path,
    label_kind: str | None,
    name_list: Path | None,
    min_object_size: int | None,
    device: str,
    precision: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Score a model on IMAGES/LABELS: whole-image predictions, a table per image and mean."""
    from tilesegment.train.data import read_name_list
    from tilesegment.train.evaluate import evaluate_model

    _set_threads(threads)
    names = read_name_list(name_list) if name_list else None
    report, spec = evaluate_model(
        model_path,
        images,
        labels,
        label_kind=label_kind,  # type: ignore[arg-type]
        names=names,
        device=device,
        precision=precision,
        min_object_size=min_object_size,
    )
    if as_json:
        doc = {"model": str(model_path), "name": spec.name, **report.to_json()}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"model {spec.name} ({model_path}), {report.kind} labels, {len(report.per_image)}"
               " image(s)")  # fmt: skip
    click.echo(report.table())
