"""Benchmark: a few minutes of U-Net training on ISBI 2012 (CPU), before/after numbers.

Trains a valid U-Net on 22 of the 25 ISBI 2012 slices (3 held out by the seeded split) with
the paper's recipe scaled down for a CPU: border weight maps (w0 = 10, sigma = 5), elastic
deformation (3 x 3 grid, sigma = 10 px), flips/rotations, intensity jitter, weighted
cross-entropy, Adam with a cosine schedule. Prints the weighted cross-entropy and the
foreground-restricted Rand error (4-connected cells), pixel error and information F-score
of the untrained model (epoch 0, same seed) and of the best checkpoint on the held-out
slices, the training loss of the first and last epochs, and seconds per optimizer step.

Usage::

    python benchmarks/train_isbi.py [--epochs 12] [--steps-per-epoch 40] [--threads 1]

The run folder (checkpoints, log.csv, curves.png) goes to benchmarks/_work/train_isbi.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

METRICS = ("val_loss", "rand_error", "pixel_error", "info_fscore", "foreground_dice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("TILESEGMENT_DATA", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "train_isbi")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=236)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from tilesegment.train.config import TrainConfig
    from tilesegment.train.loop import run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        images=args.data / "isbi2012" / "train-volume.tif",
        labels=args.data / "isbi2012" / "train-labels.tif",
        run_dir=args.out,
        label_kind="binary",
        class_names=("membrane", "cell"),
        depth=args.depth,
        base_channels=args.base_channels,
        tile_size=args.tile_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        val_fraction=0.12,
        select_metric="rand_error",
        seed=args.seed,
        overwrite=True,
    )
    start = time.perf_counter()
    summary = run_training(cfg)
    seconds = time.perf_counter() - start
    history = summary.history
    before, best = history[0], summary.best_row
    trained = [r for r in history if r["train_loss"] is not None]

    print(
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}; {os.cpu_count()} logical CPUs ({platform.machine()}), "
        f"{args.threads} torch thread(s)"
    )
    print(
        f"depth {args.depth}, base {args.base_channels}, tile {args.tile_size} px (output "
        f"{args.tile_size - 2 * _halo(args.depth)} px), batch {args.batch_size}, "
        f"{args.epochs} x {args.steps_per_epoch} steps, Adam lr {args.lr} cosine, seed {args.seed}"
    )
    print(f"validation slices: {', '.join(_validation_names(summary))}")
    print()
    print(f"| | untrained (epoch 0) | best (epoch {summary.best_epoch}) |")
    print("|---|---:|---:|")
    for key in METRICS:
        print(f"| {key} | {before[key]:.4f} | {best[key]:.4f} |")
    print()
    print(
        f"training loss: epoch 1 mean {trained[0]['train_loss']:.4f} -> epoch "
        f"{trained[-1]['epoch']} mean {trained[-1]['train_loss']:.4f}"
    )
    print(
        f"{summary.global_step} steps, {summary.seconds_per_step:.3f} s/step "
        f"({args.batch_size / summary.seconds_per_step:.1f} crops/s), {seconds:.0f} s in total "
        "including validation and checkpoints"
    )
    print(f"best checkpoint: {summary.best_path}")


def _halo(depth: int) -> int:
    from tilesegment.model.unet import UNet, UNetConfig

    return UNet(UNetConfig(depth=depth, base_channels=1, in_channels=1)).halo


def _validation_names(summary) -> list[str]:
    from tilesegment.model.checkpoint import load_spec

    return load_spec(summary.last_path).training["data"]["validation"]


if __name__ == "__main__":
    main()
