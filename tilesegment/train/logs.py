"""What a training run writes for people: ``log.jsonl``, ``log.csv``, ``curves.png`` and one
line per epoch."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilesegment.train.evaluate import SUMMARY_METRICS

log = logging.getLogger(__name__)

_CSV_BASE = ("epoch", "step", "train_loss", "val_loss")


def _csv_columns(kind: str) -> tuple[str, ...]:
    return (*_CSV_BASE, *SUMMARY_METRICS[kind], "lr", "seconds")


def write_logs(run_dir: Path, history: Sequence[dict[str, Any]], kind: str) -> None:
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


def finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def describe(row: dict[str, Any], kind: str) -> str:
    parts = [f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss") if row.get(k) is not None]
    parts += [f"{k} {row[k]:.4f}" for k in SUMMARY_METRICS[kind] if row.get(k) is not None]
    return ", ".join(parts) + f", lr {row['lr']:.3g}, {row['seconds']:.1f} s"


def short(row: dict[str, Any], key: str) -> dict[str, str]:
    """The progress bar's loss and selection metric ``key``."""
    out = {}
    if row.get("train_loss") is not None:
        out["loss"] = f"{row['train_loss']:.4f}"
    if row.get(key) is not None:
        out[key] = f"{row[key]:.4f}"
    return out
