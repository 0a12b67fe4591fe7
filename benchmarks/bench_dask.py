"""Benchmark of the dask executor (issue 6): the local worker pool against a local dask
cluster, each with 1 and 2 CPU workers, on one synthetic slide with the shipped model.

    python benchmarks/bench_dask.py --size 5000 --repeats 3
    python benchmarks/bench_dask.py --size 2000 --repeats 1        # a quick check

Every run is ``run_slide`` in a fresh child process; the four modes alternate within each
repeat (the machine is shared, so neighbours' load hits all modes alike) and medians are
reported:

pool-1, pool-2  ``RunOptions(workers=N, in_process=False)``: N spawned worker processes that
                split the cores (torch threads = cores // N).
dask-1, dask-2  ``RunOptions(dask_workers=N)``: a ``distributed.LocalCluster`` of N worker
                processes of one dask thread each (torch threads = cores // N), started by the
                run and stopped after it.

Throughput is output megapixels (the whole image; ``--tissue none`` computes every tile) per
second of the run's stream phase (``RunSummary.seconds``: for the pool it includes spawning
the workers and loading the model; for dask it starts once the cluster is up, and includes
loading the model in the workers), and, end to end, per second of the whole ``run_slide`` call
(tissue detection, cluster start-up, pyramids, report). The script prints a markdown table
and the 2-worker / 1-worker ratios of both executors; ``--json`` adds the raw runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_pool import WORK as POOL_WORK  # the same machine line and synthetic slides
from bench_pool import _machine, _slide

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "dask"

#: mode -> RunOptions fields
MODES = {
    "pool-1": {"workers": 1, "in_process": False},
    "pool-2": {"workers": 2, "in_process": False},
    "dask-1": {"dask_workers": 1},
    "dask-2": {"dask_workers": 2},
}


# ------------------------------------------------------------------------------------ child


def child_run(slide: str, model: str, out: str, mode: str, tissue: str, precision: str) -> dict:
    """One ``run_slide`` in this (fresh) process; what it did and how long it took."""
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide

    opts = RunOptions(
        tissue=tissue,
        precision=precision,
        preview=False,
        progress=False,
        overwrite=True,
        **MODES[mode],
    )
    t0 = time.perf_counter()
    summary = run_slide(slide, out, model, opts)
    wall = time.perf_counter() - t0
    x = summary.extra
    return {
        "mode": mode,
        "image_mpx": round(summary.megapixels, 3),
        "tiles_processed": x["tiles_processed"],
        "stream_s": round(summary.seconds, 3),
        "wall_s": round(wall, 3),
        "devices": [
            {k: d.get(k) for k in ("worker", "threads", "precision", "tiles", "mpx_per_s")}
            for d in x["devices"]
        ],
    }


def _child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "child", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ parent


def _table(results: dict[str, list[dict]]) -> tuple[str, dict[str, float]]:
    """The markdown table of medians, and the stream Mpx/s median of each mode."""
    lines = [
        "| mode | workers | stream Mpx/s (median) | stream s | end-to-end Mpx/s | wall s | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    rates = {}
    for mode, runs in results.items():
        rate = statistics.median(r["image_mpx"] / r["stream_s"] for r in runs)
        wall_rate = statistics.median(r["image_mpx"] / r["wall_s"] for r in runs)
        rates[mode] = rate
        stream = statistics.median(r["stream_s"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        n = len(runs[0]["devices"])
        lines.append(
            f"| {mode} | {n} | {rate:.3f} | {stream:.1f} | {wall_rate:.3f} | {wall:.1f} "
            f"| {len(runs)} |"
        )
    return "\n".join(lines), rates


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child_run(*sys.argv[2:])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=5000, help="slide edge in px (square)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode (alternating)")
    ap.add_argument("--model", default="nuclei-he", help="shipped model name or checkpoint path")
    ap.add_argument("--tissue", default="none", help="none (every tile) or auto")
    ap.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--json", action="store_true", help="also print every run as JSON")
    args = ap.parse_args()

    from tilesegment.model.registry import resolve_model

    WORK.mkdir(parents=True, exist_ok=True)
    POOL_WORK.mkdir(parents=True, exist_ok=True)  # where _slide writes
    slide, model = _slide(args.size, 0.5), resolve_model(args.model)
    machine = _machine()
    results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for i in range(args.repeats):
        for mode in args.modes:
            out = str(WORK / "bench.zarr")
            r = _child(str(slide), str(model), out, mode, args.tissue, args.precision)
            print(f"repeat {i + 1}, {mode}: {json.dumps(r)}", file=sys.stderr)
            results[mode].append(r)
    table, rates = _table(results)
    precisions = sorted({d["precision"] for rs in results.values() for d in rs[0]["devices"]})
    print(
        f"slide {args.size} x {args.size} px (synthetic, 0.25 um/px, tissue 0.5, "
        f"--tissue {args.tissue}); model {args.model}, {', '.join(precisions)}; "
        f"{args.repeats} repeats\n{machine}\n"
    )
    print(table + "\n")
    for executor in ("pool", "dask"):
        one, two = rates.get(f"{executor}-1"), rates.get(f"{executor}-2")
        if one and two:
            print(f"{executor}: 2 workers / 1 worker = {two / one:.2f}x (stream Mpx/s)")
    if args.json:
        print(json.dumps({"machine": machine, "size": args.size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
