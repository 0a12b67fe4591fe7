"""Benchmarks of the production run (issue 5): pipeline efficiency, peak RSS against slide
size, and 1 vs 2 CPU workers. Every measurement runs in a fresh child process.

    python benchmarks/bench_pool.py efficiency --size 7680 --repeats 3
    python benchmarks/bench_pool.py rss --sizes 20000 40000 80000
    python benchmarks/bench_pool.py workers --size 7680 --repeats 3
    python benchmarks/bench_pool.py compile --size 12000 --repeats 2
    python benchmarks/bench_pool.py profile --size 3840

efficiency  In one child: bare forward on identical tiles (real tiles of the slide, read once,
            batch 1, the same predictor and threads as the run; and the network alone on the
            same tiles already as normalised tensors), then ``run_slide`` end to end
            (``--tissue none``: every tile), then both bare forwards again. Efficiency = output
            Mpx/s of the run (image px / stream seconds; and / whole wall time including
            tissue detection, pyramid and report) ÷ output Mpx/s of the bare forward (its
            388² output per 572 tile); ``efficiency_vs_model`` divides by the network alone.
            Medians over ``--repeats`` children, for fp32 and bf16.
rss         Peak RSS of ``run_slide`` on mostly-glass synthetic slides of growing size
            (tissue fraction ~0.05, ``--tissue auto``).
workers     The same slide in-process (2 torch threads), with 1 worker process (2 threads)
            and with 2 worker processes (1 thread each), alternating, medians.
compile     In-process runs without ``torch.compile``, compiling cold (empty inductor cache)
            and warm (inductor's on-disk cache filled by an earlier run), alternating.
profile     CPU milliseconds per tile of each thread group of one in-process run: where the
            time that is not the forward pass goes (Linux /proc sampling).

The machine is shared: ratios are taken inside one child (efficiency) or from alternating
children (workers), and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "pool"


# ------------------------------------------------------------------------------------ children


def _bare_forward(predictor, tiles, out_px: int, repeats: int) -> tuple[float, float]:
    """Output Mpx/s of the predictor alone on ``tiles`` (batch 1, median per-tile wall time)
    and its CPU seconds per tile (all threads)."""
    import numpy as np

    for t in tiles[:2]:
        predictor(t[None])
    times = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        for t in tiles:
            t0 = time.perf_counter()
            predictor(t[None])
            times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / len(times)
    return out_px * out_px / float(np.median(times)) / 1e6, cpu


def _bare_model(predictor, tiles, out_px: int, repeats: int) -> float:
    """Output Mpx/s of the network alone: ``model(x)`` under the predictor's autocast on the
    tiles already normalised, channels-last tensors (no uint8 conversion, no softmax, no copy
    back): the fastest forward this CPU offers for the model, the strict reference."""
    import numpy as np
    import torch

    xs = []
    for t in tiles:
        x = torch.from_numpy(np.ascontiguousarray(t[None])).permute(0, 3, 1, 2).float() / 255
        x = (x - predictor._mean) * predictor._inv_std
        xs.append(x.contiguous(memory_format=torch.channels_last))
    times = []
    with torch.inference_mode(), predictor.forward.autocast():
        for x in xs[:2]:
            predictor.model(x)
        for _ in range(repeats):
            for x in xs:
                t0 = time.perf_counter()
                predictor.model(x)
                times.append(time.perf_counter() - t0)
    return out_px * out_px / float(np.median(times)) / 1e6


def child_efficiency(slide: str, model: str, tile: int, precision: str, out: str) -> dict:
    import numpy as np
    import torch

    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.plan import plan_grid
    from tilesegment.infer.predict import make_predictor
    from tilesegment.infer.run import run_slide
    from tilesegment.infer.stream import read_tile
    from tilesegment.io import open_slide
    from tilesegment.model import load_checkpoint

    net, spec = load_checkpoint(model)
    predictor = make_predictor(net, spec, "cpu", precision)
    with open_slide(slide) as reader:
        grid = plan_grid(reader.info.shape, net, tile)
        gy, gx = grid.grid_shape
        picks = [grid.tile(gy // 2, j) for j in range(gx // 2 - 4, gx // 2 + 4)]
        tiles = [read_tile(reader, 0, t, grid.image_shape, 3) for t in picks]
    out_px = net.output_size(tile)
    before, cpu_before = _bare_forward(predictor, tiles, out_px, 2)
    model_before = _bare_model(predictor, tiles, out_px, 2)
    del predictor
    opts = RunOptions(
        tile_size=tile,
        precision=precision,
        tissue="none",
        preview=False,
        progress=False,
        overwrite=True,
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    summary = run_slide(slide, out, model, opts)
    wall, run_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    predictor = make_predictor(net, spec, "cpu", precision)
    after, cpu_after = _bare_forward(predictor, tiles, out_px, 2)
    model_after = _bare_model(predictor, tiles, out_px, 2)
    bare = float(np.median([before, after]))
    bare_model = float(np.median([model_before, model_after]))
    tile_cpu = float(np.median([cpu_before, cpu_after]))
    run_rate = summary.megapixels / summary.seconds
    return {
        "precision": precision,
        "threads": torch.get_num_threads(),
        "tiles": summary.tiles,
        "image_mpx": summary.megapixels,
        "bare_mpx_per_s": [round(before, 3), round(after, 3)],
        "run_stream_s": round(summary.seconds, 2),
        "run_wall_s": round(wall, 2),
        "run_mpx_per_s": round(run_rate, 3),
        "efficiency": round(run_rate / bare, 3),
        "bare_model_mpx_per_s": [round(model_before, 3), round(model_after, 3)],
        "efficiency_vs_model": round(run_rate / bare_model, 3),
        "efficiency_wall": round(summary.megapixels / wall / bare, 3),
        # Contention-robust diagnostic: CPU seconds the bare forward needs for the run's tiles
        # over the CPU seconds the whole run used (reading, writing, pyramid included).
        "bare_cpu_s_per_tile": round(tile_cpu, 4),
        "run_cpu_s": round(run_cpu, 2),
        "cpu_efficiency": round(summary.tiles * tile_cpu / run_cpu, 3),
    }


#: Executors compared by ``workers``: (CPU workers, in-process).
MODES = {"in-process": (1, True), "1 worker process": (1, False), "2 worker processes": (2, False)}


def child_run(
    slide: str, model: str, tile: int, out: str, mode: str, tissue: str, compile: str = "auto"
) -> dict:
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide

    workers, in_process = MODES[mode]
    opts = RunOptions(
        tile_size=tile,
        workers=workers,
        in_process=in_process,
        tissue=tissue,
        preview=False,
        progress=False,
        overwrite=True,
        compile={"auto": None, "on": True, "off": False}[compile],
    )
    t0 = time.perf_counter()
    summary = run_slide(slide, out, model, opts)
    wall = time.perf_counter() - t0
    x = summary.extra
    return {
        "mode": mode,
        "tiles": summary.tiles,
        "tiles_processed": x["tiles_processed"],
        "image_mpx": summary.megapixels,
        "stream_s": round(summary.seconds, 2),
        "wall_s": round(wall, 2),
        "processed_mpx_per_s": round(x["processed_mpx_per_s"], 3),
        "devices": [
            {k: d[k] for k in ("worker", "threads", "tiles", "mpx_per_s")} for d in x["devices"]
        ],
        "peak_rss_workers_mb": x["peak_rss_mb"]["workers"],
        "compiled": x["compiled"],
    }


def child_profile(slide: str, model: str, tile: int, precision: str, out: str) -> dict:
    """CPU seconds per thread group of one in-process run (sampled from /proc every 0.2 s)."""
    import collections
    import threading

    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide

    last: dict[str, tuple[str, float]] = {}
    stop = threading.Event()
    tick = os.sysconf("SC_CLK_TCK")

    def sample() -> None:
        while not stop.is_set():
            names = {str(t.native_id): t.name for t in threading.enumerate()}
            for tid in os.listdir("/proc/self/task"):
                try:
                    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rfind(")") + 2 :].split()
                name = names.get(tid, "native (OpenMP, blosc, ...)")
                if name.startswith(("ts-", "asyncio_", "ThreadPoolExecutor")):
                    name = name.rsplit("_", 1)[0]
                last[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True, name="sampler").start()
    opts = RunOptions(
        tile_size=tile,
        precision=precision,
        tissue="none",
        preview=False,
        progress=False,
        overwrite=True,
    )
    summary = run_slide(slide, out, model, opts)
    time.sleep(0.5)
    stop.set()
    groups: collections.Counter[str] = collections.Counter()
    for name, seconds in last.values():
        groups[name] += seconds
    groups.pop("sampler", None)
    return {
        "precision": precision,
        "tiles": summary.tiles,
        "stream_s": round(summary.seconds, 2),
        "cpu_ms_per_tile": {k: round(v / summary.tiles * 1000, 1) for k, v in groups.most_common()},
    }


def _child(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "child", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ parent


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )


def _model(args) -> Path:
    """The shipped model named by ``--model`` (real outputs, so the output store compresses as
    it does in production), or ``random``: an untrained depth-4 U-Net of ``--base-channels``."""
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint
    from tilesegment.model.registry import resolve_model

    if args.model != "random":
        return resolve_model(args.model)
    base = args.base_channels
    path = WORK / f"unet-b{base}"
    if not path.with_suffix(".json").exists():
        spec = ModelSpec.default(UNetConfig(base_channels=base), name=path.name)
        save_checkpoint(new_model(spec, seed=0), spec, path)
    return path


def _model_name(args) -> str:
    return args.model if args.model != "random" else f"untrained depth 4, base {args.base_channels}"


def _slide(size: int, tissue_fraction: float, patches: int = 6) -> Path:
    from tilesegment.testing.synthetic import write_slide

    # 0.25 µm/px: the shipped models' resolution, so level 0 is read as is (no resampling).
    path = WORK / f"synthetic-{size}-t{tissue_fraction:g}-p{patches}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        write_slide(
            path,
            (size, size),
            mpp=0.25,
            tissue_fraction=tissue_fraction,
            patches=patches,
            seed=1,
        )
        print(f"wrote {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def efficiency(args) -> dict:
    slide = _slide(args.size, 0.5)
    model = _model(args)
    rows = {p: [] for p in args.precisions}
    for _ in range(args.repeats):
        for p in args.precisions:
            out = WORK / f"eff-{p}.zarr"
            r = _child("efficiency", str(slide), str(model), str(args.tile_size), p, str(out))
            print(json.dumps(r), file=sys.stderr)
            rows[p].append(r)
    summary = {}
    for p, rs in rows.items():
        summary[p] = {
            "efficiency_median": statistics.median(r["efficiency"] for r in rs),
            "efficiency_vs_model_median": statistics.median(r["efficiency_vs_model"] for r in rs),
            "bare_model_mpx_per_s_median": statistics.median(
                statistics.median(r["bare_model_mpx_per_s"]) for r in rs
            ),
            "efficiency_wall_median": statistics.median(r["efficiency_wall"] for r in rs),
            "cpu_efficiency_median": statistics.median(r["cpu_efficiency"] for r in rs),
            "run_mpx_per_s_median": statistics.median(r["run_mpx_per_s"] for r in rs),
            "bare_mpx_per_s_median": statistics.median(
                statistics.median(r["bare_mpx_per_s"]) for r in rs
            ),
            "runs": rs,
        }
    if {"fp32", "bf16"} <= set(args.precisions):
        summary["bf16_vs_fp32"] = _compare(WORK / "eff-fp32.zarr", WORK / "eff-bf16.zarr")
    return {
        "benchmark": "efficiency",
        "machine": _machine(),
        "slide_px": args.size,
        "model": _model_name(args) + ", channels-last",
        "tile_size": args.tile_size,
        "results": summary,
    }


def _compare(a: Path, b: Path) -> dict:
    """How far two stored outputs of the same slide are apart (uint8 probabilities, mask)."""
    import numpy as np

    from tilesegment.store import OutputStore

    sa, sb = OutputStore.open(a), OutputStore.open(b)
    pa, pb = sa.probabilities[:].astype(np.int16), sb.probabilities[:].astype(np.int16)
    diff = np.abs(pa - pb)
    return {
        "max_abs_diff_of_255": int(diff.max()),
        "mean_abs_diff_of_255": float(f"{diff.mean():.4g}"),
        "share_of_values_off_by_more_than_1": float(f"{(diff > 1).mean():.4g}"),
        "mask_agreement": float(f"{(sa.mask[:] == sb.mask[:]).mean():.6f}"),
    }


def _per_size(args, benchmark: str, measure: Callable[[Path, Path], dict]) -> dict:
    """Run ``measure(slide, model)`` (one fresh child process) on a mostly-glass synthetic
    slide of each ``--sizes``, smallest first as given; one row per size."""
    model = _model(args)
    rows = []
    for size in args.sizes:
        slide = _slide(size, 0.05, patches=args.patches)
        r = {"slide_px": size, **measure(slide, model)}
        print(json.dumps(r), file=sys.stderr)
        rows.append(r)
    return {
        "benchmark": benchmark,
        "machine": _machine(),
        "model": _model_name(args),
        "tile_size": args.tile_size,
        "results": rows,
    }


def rss(args) -> dict:
    """Peak RSS of ``run_slide`` (in-process, ``--tissue auto``) in a fresh child per size."""

    def measure(slide: Path, model: Path) -> dict:
        out = WORK / "rss.zarr"
        tile = str(args.tile_size)
        return _child(
            "run", str(slide), str(model), tile, str(out), "in-process", "auto", args.compile
        )

    return _per_size(args, "rss", measure)


def rss_geojson(args) -> dict:
    """Peak RSS of the whole CLI job ``tilesegment run SLIDE -o OUT --geojson G`` (run, seeded
    or component instances, GeoJSON and table export) in a fresh process per slide size."""

    def measure(slide: Path, model: Path) -> dict:
        out, geojson = WORK / "rss-geojson.zarr", WORK / "rss.geojson"
        cmd = [
            sys.executable, "-c", "import sys; from tilesegment.cli import main; "
            "sys.exit(main(sys.argv[1:]))", "run", str(slide), "-o", str(out),
            "--geojson", str(geojson), "--model", str(model), "--tile-size",
            str(args.tile_size), "--no-preview", "--no-progress", "--overwrite",
        ]  # fmt: skip
        cmd += {"auto": [], "on": ["--compile"], "off": ["--no-compile"]}[args.compile]
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(geojson) as fh:
            nuclei = sum(1 for _ in json.load(fh)["features"])
        return {
            "wall_s": round(wall, 1),
            "nuclei": nuclei,
            "geojson_mb": round(geojson.stat().st_size / 1e6, 1),
            # ru_maxrss of children: the largest single process so far (the run or one of its
            # workers); sizes run smallest first.
            "peak_rss_mb": round(max(peak, before) / 1024, 1),
        }

    return _per_size(args, "rss-geojson", measure)


def workers(args) -> dict:
    slide = _slide(args.size, 0.5)
    model = _model(args)
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            out = str(WORK / "workers.zarr")
            r = _child(
                "run", str(slide), str(model), str(args.tile_size), out, mode, "none", args.compile
            )
            print(json.dumps(r), file=sys.stderr)
            rows[mode].append(r)
    return {
        "benchmark": "workers",
        "machine": _machine(),
        "slide_px": args.size,
        "model": _model_name(args) + ", precision auto",
        "results": {
            mode: {
                # Stream time includes starting the worker processes.
                "stream_mpx_per_s_median": round(
                    statistics.median(r["image_mpx"] / r["stream_s"] for r in rs), 3
                ),
                "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                "runs": rs,
            }
            for mode, rs in rows.items()
        },
    }


def compile_(args) -> dict:
    """In-process runs without ``torch.compile`` ("off"), compiling from an empty inductor
    cache ("cold": a new machine's first run) and from a warm one ("warm": later runs on the
    same machine reuse inductor's on-disk cache), alternating."""
    import tempfile

    slide = _slide(args.size, 0.5)
    model = _model(args)

    def child(flag: str, cache: str) -> dict:
        return _child(
            "run",
            str(slide),
            str(model),
            str(args.tile_size),
            str(WORK / "compile.zarr"),
            "in-process",
            "none",
            flag,
            env={"TORCHINDUCTOR_CACHE_DIR": cache},
        )

    rows: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as warm:
        child("on", warm)  # fills the warm cache
        for _ in range(args.repeats):
            for mode in rows:
                with tempfile.TemporaryDirectory() as cold:
                    r = child("off" if mode == "off" else "on", warm if mode == "warm" else cold)
                r["compile"] = mode
                print(json.dumps(r), file=sys.stderr)
                rows[mode].append(r)
    med = {
        k: statistics.median(r["image_mpx"] / r["stream_s"] for r in rs) for k, rs in rows.items()
    }
    return {
        "benchmark": "compile",
        "machine": _machine(),
        "slide_px": args.size,
        "model": _model_name(args) + ", precision auto",
        "stream_mpx_per_s_median": {k: round(v, 3) for k, v in med.items()},
        "cold_over_off": round(med["cold"] / med["off"], 3),
        "warm_over_off": round(med["warm"] / med["off"], 3),
        "runs": rows,
    }


def profile(args) -> dict:
    slide = _slide(args.size, 0.5)
    model = _model(args)
    rows = []
    for p in args.precisions:
        r = _child(
            "profile", str(slide), str(model), str(args.tile_size), p, str(WORK / "profile.zarr")
        )
        print(json.dumps(r), file=sys.stderr)
        rows.append(r)
    return {"benchmark": "profile", "machine": _machine(), "slide_px": args.size, "results": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        kind, *rest = sys.argv[2:]
        if kind == "efficiency":
            res = child_efficiency(rest[0], rest[1], int(rest[2]), rest[3], rest[4])
        elif kind == "profile":
            res = child_profile(rest[0], rest[1], int(rest[2]), rest[3], rest[4])
        else:
            res = child_run(rest[0], rest[1], int(rest[2]), *rest[3:])
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("efficiency", "rss", "rss-geojson", "workers", "compile", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="nuclei-he", help="shipped model, path, or random")
        p.add_argument("--base-channels", type=int, default=16, help="for --model random")
        p.add_argument("--tile-size", type=int, default=572)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--size", type=int, default=7680)
    for name in ("efficiency", "profile"):
        sub.choices[name].add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    for name in ("rss", "rss-geojson"):
        sub.choices[name].add_argument(
            "--sizes", type=int, nargs="+", default=[20000, 40000, 80000]
        )
        sub.choices[name].add_argument("--patches", type=int, default=6)
    for name in ("rss", "rss-geojson", "workers"):
        sub.choices[name].add_argument(
            "--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile"
        )
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    run = {
        "efficiency": efficiency,
        "rss": rss,
        "rss-geojson": rss_geojson,
        "workers": workers,
        "compile": compile_,
        "profile": profile,
    }
    result = run[args.what](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
