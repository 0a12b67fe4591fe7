"""Benchmark: fast (windowed) vs brute-force border weight maps on the real label images.

For each of the 24 MoNuSeg label tiles (1000 x 1000, nuclei separated with
``separate_touching`` as the training data set does) and one ISBI 2012 slice (cells =
4-connected components of the 255 class), both implementations are timed ``--repeats`` times
(median reported) with the paper's parameters (w0 = 10, sigma = 5, balanced class weights),
and the largest absolute difference between their maps is checked against ``1e-6 * w0``.
Prints a Markdown table and saves ``weight_map_example.png`` beside this script.

Usage::

    python benchmarks/bench_weights.py [--repeats 5] [--data ../shared/data] [--limit N]

The brute force costs about 35 ms per object, so the full run takes ~40 minutes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tilesegment.train.labels import instances_from_binary, separate_touching  # noqa: E402
from tilesegment.train.weights import (  # noqa: E402
    BORDER_RTOL,
    border_weight_map,
    border_weight_map_bruteforce,
)

logger = logging.getLogger("bench_weights")

W0 = 10.0
SIGMA = 5.0


def median_seconds(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Median wall time of ``repeats`` calls and the last result."""
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def load_cases(data: Path, limit: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, instances) for the MoNuSeg tiles and ISBI slice 0."""
    cases = []
    for path in sorted((data / "monuseg" / "labels").glob("*.tif")):
        labels = separate_touching(tifffile.imread(path))
        image = np.asarray(Image.open(data / "monuseg" / "images" / f"{path.stem}.png"))
        cases.append((path.stem, image, labels))
    if limit is not None:
        cases = cases[:limit]
    volume = tifffile.imread(data / "isbi2012" / "train-volume.tif")
    labels = tifffile.imread(data / "isbi2012" / "train-labels.tif")
    cases.append(("isbi2012 slice 0", volume[0], instances_from_binary(labels[0] == 255)))
    return cases


def save_figure(cases: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """Image | instances | weight map for a MoNuSeg crop and an ISBI crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [cases[0], cases[-1]]
    fig, axes = plt.subplots(len(picks), 3, figsize=(13, 4.3 * len(picks)), squeeze=False)
    for row, (name, image, labels) in zip(axes, picks, strict=True):
        crop = (slice(0, 300), slice(0, 300))
        weights = border_weight_map(labels, w0=W0, sigma=SIGMA)[crop]
        shown = labels[crop]
        colours = np.random.default_rng(0).random((int(shown.max()) + 1, 3))
        colours[0] = 0
        row[0].imshow(image[crop], cmap="gray")
        row[0].set_title(f"{name}: image")
        row[1].imshow(colours[shown], interpolation="nearest")
        row[1].set_title(f"instances ({len(np.unique(shown)) - 1} in crop)")
        im = row[2].imshow(weights, cmap="magma", interpolation="nearest")
        row[2].set_title(f"weight map (w0={W0:g}, sigma={SIGMA:g}, balanced)")
        fig.colorbar(im, ax=row[2], fraction=0.046)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per method (median)")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("TILESEGMENT_DATA", ROOT.parent / "shared" / "data")),
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N MoNuSeg tiles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    cases = load_cases(args.data, args.limit)
    rows = []
    for name, _, labels in cases:
        n_objects = len(np.unique(labels)) - 1
        fast_s, fast = median_seconds(
            lambda labels=labels: border_weight_map(labels, w0=W0, sigma=SIGMA), args.repeats
        )
        brute_s, brute = median_seconds(
            lambda labels=labels: border_weight_map_bruteforce(labels, w0=W0, sigma=SIGMA),
            args.repeats,
        )
        diff = float(np.abs(fast.astype(np.float64) - brute).max())
        rows.append((name, labels.shape, n_objects, fast_s, brute_s, diff))
        logger.info(
            "%s: %d objects, fast %.3f s, brute %.2f s, max |diff| %.2e",
            name,
            n_objects,
            fast_s,
            brute_s,
            diff,
        )

    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__};"
        f" {os.cpu_count()} logical CPUs ({platform.processor() or platform.machine()});"
        f" median of {args.repeats} runs each; w0={W0:g}, sigma={SIGMA:g}, balanced w_c."
    )
    print()
    print("| label | shape | objects | fast (s) | brute force (s) | speed-up | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, shape, n_objects, fast_s, brute_s, diff in rows:
        print(
            f"| {name} | {shape[0]}x{shape[1]} | {n_objects} | {fast_s:.3f} | {brute_s:.2f}"
            f" | {brute_s / fast_s:.0f}x | {diff:.1e} |"
        )
    monuseg = [r for r in rows if not r[0].startswith("isbi")]
    if monuseg:
        fast_all = [r[3] for r in monuseg]
        brute_all = [r[4] for r in monuseg]
        ratios = [b / f for f, b in zip(fast_all, brute_all, strict=True)]
        print(
            f"| **MoNuSeg, {len(monuseg)} tiles** | | {sum(r[2] for r in monuseg)} total"
            f" | median {statistics.median(fast_all):.3f}, max {max(fast_all):.3f}"
            f" | median {statistics.median(brute_all):.2f}"
            f" | median {statistics.median(ratios):.0f}x"
            f" | {max(r[5] for r in monuseg):.1e} |"
        )
    worst = max(r[5] for r in rows)
    print()
    print(
        f"Largest difference {worst:.2e} (bound: BORDER_RTOL * w0 = {BORDER_RTOL * W0:.0e}"
        " plus float32 rounding)."
    )

    figure = Path(__file__).with_name("weight_map_example.png")
    save_figure(cases, figure)
    logger.info("saved %s", figure)
    return 0 if worst <= BORDER_RTOL * W0 * 1.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
