"""The default ``tilesegment run`` (no flags) against the fastest bare forward pass this CPU
offers, small images end to end against an older commit, peak RSS of the default by slide
size, and the worker start-up behind ``--workers auto`` (issue 13, item 1).

    python benchmarks/bench_defaults.py                          # all parts, full sizes
    python benchmarks/bench_defaults.py --size 4000 --rss-sizes 4000 8000 --repeats 1 \\
        --small-repeats 2 --crossover-sizes 1000 2000            # a smoke test
    python benchmarks/bench_defaults.py --only small --old 8a6b24c

(a) default  A synthetic SIZE² all-tissue pyramidal JPEG TIFF (0.25 µm/px, the shipped model's
             resolution): ``python -m tilesegment run SLIDE -o OUT --no-progress`` in a fresh
             child, alternating with the bare forward pass of the shipped model (the network
             alone on normalised channels-last tiles of the default size, batch 1, precision
             auto) in four configurations: one process with a thread per usable core, and one
             single-thread process per core (run at once, rates summed), each eager and
             compiled (compile time excluded); and the compiled single-thread processes on 572
             and 1084 px tiles, since the tile size is part of the configuration. Medians over
             ``--repeats``; the ratio is the default's rate (computed Mpx / stream s, and / the
             whole process's wall time) over the fastest bare configuration's.
(b) small    256² and 1000² PNG crops of a MoNuSeg image, end to end (process wall time) with
             this checkout and with ``--old`` (``git archive`` into benchmarks/_work),
             alternating, medians over ``--small-repeats``; the new runs' report gives where the
             time goes (setup, stream, finalize, preview).
(c) rss      The default on slides of ``--rss-sizes`` with the same tissue: an all-tissue
             square of ``--size`` px in glass (the SIZE² slide itself is all tissue). Peak RSS
             of the run's main process and of each worker (the report), and of the process
             tree's largest (``ru_maxrss`` from ``wait4``).
(d) crossover  In-process (``--workers 1``) and pool (``--workers N``, N usable cores) runs of
             all-tissue slides of ``--crossover-sizes``, alternating, medians: stream seconds
             against computed Mpx fit ``a + Mpx / rate`` for each; the break-even is where the
             lines cross. ``AUTO_MIN_MPX_PER_WORKER`` in ``tilesegment/infer/capacity.py``
             comes from it.
(e) tiles    The tile size behind ``DEFAULT_TILE_SIZE``: one single-thread child per
             precision (fp32, and bf16 where the CPU has it) and mode (eager, compiled) runs
             the predictor a worker runs (uint8 tiles in, probabilities out) on each of
             ``--tile-sizes`` in turn, ``--repeats`` rounds; output Mpx per CPU-second of the
             thread (``time.thread_time``, so other jobs on the machine matter less than to
             wall time), medians. Peak RSS of a fresh eager child per size and precision.

Slides are written once into benchmarks/_work/defaults from a few pre-compressed rendered
tissue tiles (``tilesegment.testing.synthetic``), so an 80000² slide takes seconds to write.
Prints JSON lines as it goes, then Markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "defaults"
MONUSEG = REPO.parent / "shared" / "data" / "monuseg" / "images" / "TCGA-18-5592-01Z-00-DX1.png"
TILE = 512  # slide tile edge
PARTS = ("default", "small", "rss", "crossover", "tiles")
#: The rows of (b): imports, the steps of :data:`STEPS` and the interpreter's start and exit.
SMALL_ROWS = (
    "import_cli",
    "import_torch",
    "import_rest",
    "load_model",
    "open_source",
    "tissue",
    "fingerprint",
    "open_output",
    "stream",
    "finalize",
    "preview",
    "report",
    "exit",
)


# ---------------------------------------------------------------------------------- slides


def _tissue_pixels(n: int = 16) -> list:
    """``n`` different all-tissue 512 px RGB tiles (uint8 arrays)."""
    import numpy as np

    from tilesegment.testing.synthetic import GLASS, render

    size = (8192, 8192)  # one ellipse of tissue around (4385, 4385) px: pick tiles near it
    tiles = []
    for k in range(n):
        y, x = 3000 + (k // 4) * TILE, 3000 + (k % 4) * TILE
        pixels = render(y, x, TILE, TILE, size=size, tissue_fraction=0.9, patches=1, seed=1)
        assert (pixels != GLASS.astype(np.uint8)).any(axis=-1).all(), "a tile with glass"
        tiles.append(pixels)
    return tiles


def write_tissue_slide(path: Path, size: int, tissue: int) -> Path:
    """A pyramidal tiled JPEG TIFF of ``size``² px at 0.25 µm/px: glass with an all-tissue
    square of ``tissue`` px in its centre (all tissue when ``tissue >= size``).

    Every level shows the square where it is (a tile that straddles its edge is tissue inside
    and glass outside, in that level's pixels), so a thumbnail from any level finds the same
    tissue. Tiles inside are a few rendered tissue tiles, compressed once and repeated.
    """
    import numpy as np
    import tifffile

    from tilesegment.testing.synthetic import GLASS, jpeg_tile

    glass_px = GLASS.astype(np.uint8)
    glass = jpeg_tile(np.broadcast_to(glass_px, (TILE, TILE, 3)).copy())
    pixels = _tissue_pixels()
    cells = [jpeg_tile(p) for p in pixels]
    lo, hi = (size - tissue) // 2, (size - tissue) // 2 + tissue
    levels = 1
    while size / 2 ** (levels - 1) > 2048:
        levels += 1

    def tile(ds: int, ty: int, tx: int) -> bytes:
        """The tile at (ty, tx) of the level ``ds``; its box in level-0 px, clipped."""
        k = (ty // TILE * 7 + tx // TILE) % len(cells)
        (y0, y1), (x0, x1) = ((t * ds, min((t + TILE) * ds, size)) for t in (ty, tx))
        iy0, iy1, ix0, ix1 = max(y0, lo), min(y1, hi), max(x0, lo), min(x1, hi)
        if iy0 >= iy1 or ix0 >= ix1:
            return glass
        if (iy0, iy1, ix0, ix1) == (y0, y1, x0, x1):
            return cells[k]
        mixed = np.broadcast_to(glass_px, (TILE, TILE, 3)).copy()
        ys = slice(-(-(iy0 - y0) // ds), -(-(iy1 - y0) // ds))
        xs = slice(-(-(ix0 - x0) // ds), -(-(ix1 - x0) // ds))
        mixed[ys, xs] = pixels[k][ys, xs]
        return jpeg_tile(mixed)

    def tiles(ds: int, n: int):
        for ty in range(0, n, TILE):
            for tx in range(0, n, TILE):
                yield tile(ds, ty, tx)

    res = 1e4 / 0.25
    with tifffile.TiffWriter(path, bigtiff=size * size * 3 > 2**31) as tif:
        for level in range(levels):
            ds = 2**level
            n = -(-size // ds)
            tif.write(
                tiles(ds, n),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                subifds=levels - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                resolution=(res / ds, res / ds),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


def slide(size: int, tissue: int | None = None) -> Path:
    tissue = size if tissue is None else min(tissue, size)
    path = WORK / f"tissue-{size}-{tissue}-v2.tif"  # v2: edge tiles of every level right
    if not path.exists():
        t0 = time.perf_counter()
        write_tissue_slide(path, size, tissue)
        print(f"wrote {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


# ------------------------------------------------------------------------------ processes


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}


def run_default(src: Path, image: Path, out: Path, *extra: str, phases: bool = False) -> dict:
    """``python -m tilesegment run IMAGE -o OUT --no-progress`` with the tree ``src`` in a
    fresh child: wall seconds, the tree's peak RSS (``wait4``) and the run report; with
    ``phases``, run through :func:`child_phases` and add its seconds per step."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_suffix(".tilesegment"), ignore_errors=True)
    for suffix in (".report.json", ".preview.png"):
        out.with_suffix(suffix).unlink(missing_ok=True)
    driver = [__file__, "child-phases"] if phases else ["-m", "tilesegment"]
    cmd = [sys.executable, *driver, "run", str(image), "-o", str(out), "--no-progress", *extra]
    log = out.with_suffix(".stderr.txt")
    t0 = time.perf_counter()
    with log.open("w") as err:
        # cwd: not a checkout (``python -m`` puts the working directory first on sys.path)
        proc = subprocess.Popen(cmd, stderr=err, env=_env(src), cwd=WORK)
        _, status, usage = os.wait4(proc.pid, 0)
    row = {
        "wall_s": time.perf_counter() - t0,
        "exit": os.waitstatus_to_exitcode(status),
        "tree_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "tree_cpu_s": usage.ru_utime + usage.ru_stime,
    }
    report = out.with_suffix(".report.json")
    if row["exit"] != 0 or not report.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed: {log.read_text()[-2000:]}")
    if phases:
        line = next(x for x in log.read_text().splitlines() if x.startswith("PHASES "))
        row["phases"] = json.loads(line.removeprefix("PHASES "))
        row["phases"]["exit"] = row["wall_s"] - row["phases"].pop("until_exit")
    doc = json.loads(report.read_text())
    row.update(
        seconds=doc["seconds"],
        computed_mpx=doc["megapixels"]["processed"],
        workers=doc.get("workers"),
        compiled=doc["compiled"],
        peak_rss_mb=doc["peak_rss_mb"],
        devices=len(doc["devices"]),
    )
    keys = ("startup_seconds", "first_batch_seconds", "forward_seconds", "cpu_seconds")
    accounts = [{k: d[k] for k in keys if k in d} for d in doc["devices"]]
    row["accounts"] = accounts
    if accounts and all("cpu_seconds" in a for a in accounts):  # the network's share of CPU
        forward = sum(a["forward_seconds"] for a in accounts)
        row["forward_share"] = forward / sum(a["cpu_seconds"] for a in accounts)
    return row


#: Steps of a run timed by :func:`child_phases`: (module, attribute, name). Private names of
#: ``infer/run.py`` included: this measures the inside of one run, in old and new trees alike.
STEPS = (
    ("tilesegment.infer.run", "load_checkpoint", "load_model"),
    ("tilesegment.infer.run", "open_source", "open_source"),
    ("tilesegment.infer.run", "tissue_map", "tissue"),
    ("tilesegment.infer.run", "_identify", "fingerprint"),
    ("tilesegment.infer.run", "_open_output", "open_output"),
    ("tilesegment.infer.run", "_execute", "stream"),
    ("tilesegment.store.output", "OutputStore.finalize", "finalize"),
    ("tilesegment.infer.preview", "write_preview", "preview"),
    ("tilesegment.infer.run", "write_report", "report"),
)


def child_phases(argv: list[str]) -> None:
    """In a child: the command line ``tilesegment ARGV`` with its imports and the
    :data:`STEPS` of the run timed; prints ``PHASES {json}`` on stderr at exit (``until_exit``:
    from the start of this function to the exit handlers)."""
    import atexit
    import functools
    import importlib

    t0 = time.perf_counter()
    spent: dict[str, float] = {}

    def timed(f, name):
        @functools.wraps(f)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    from tilesegment.cli import main as cli

    spent["import_cli"] = time.perf_counter() - t0
    import torch  # noqa: F401  (the command would import it while parsing --model)

    spent["import_torch"] = time.perf_counter() - t0 - spent["import_cli"]
    t = time.perf_counter()
    for module, attr, name in STEPS:
        owner = importlib.import_module(module)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        if hasattr(owner, last):
            setattr(owner, last, timed(getattr(owner, last), name))
    spent["import_rest"] = time.perf_counter() - t

    def report() -> None:
        spent["until_exit"] = time.perf_counter() - t0
        print("PHASES " + json.dumps({k: round(v, 4) for k, v in spent.items()}), file=sys.stderr)

    atexit.register(report)
    cli(argv, prog_name="tilesegment")


def child_bare(threads: int, compile: bool, tiles: int, size: int) -> None:
    """In a child: the network alone on ``tiles`` tiles of ``size`` px after warming up; waits
    for ``go`` on stdin after printing ``ready`` so that parallel children overlap."""
    import torch

    from tilesegment.infer.devices import resolve_precision
    from tilesegment.infer.predict import make_predictor
    from tilesegment.model import load_checkpoint
    from tilesegment.model.registry import resolve_model

    torch.set_num_threads(threads)
    net, spec = load_checkpoint(resolve_model("nuclei-he"))
    precision = resolve_precision("auto", "cpu")
    model = make_predictor(net, spec, "cpu", precision, compile=compile).model
    x = torch.rand(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), cast:
        for _ in range(3):
            model(x)
        print("ready", flush=True)
        sys.stdin.readline()
        t0 = time.perf_counter()
        for _ in range(tiles):
            model(x)
        seconds = time.perf_counter() - t0
    out = net.output_size(size)
    print(json.dumps({"mpx_per_s": tiles * out * out / 1e6 / seconds, "precision": precision}))


def child_tiles(precision: str, compile: bool, sizes: list[int], rounds: int) -> None:
    """In a child: output Mpx per CPU-second of the worker's predictor on each tile size."""
    import numpy as np
    import torch

    from tilesegment.infer.predict import make_predictor
    from tilesegment.model import load_checkpoint
    from tilesegment.model.registry import resolve_model

    torch.set_num_threads(1)
    net, spec = load_checkpoint(resolve_model("nuclei-he"))
    predictor = make_predictor(net, spec, "cpu", precision, compile=compile)
    rng = np.random.default_rng(0)
    tiles = {n: rng.integers(0, 256, (1, n, n, 3), dtype=np.uint8) for n in sizes}
    for x in tiles.values():  # warm up (and compile every shape)
        predictor(x)
        predictor(x)
    rates: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n, x in tiles.items():
            out = net.output_size(n)
            k = max(1, round(2.5e6 / out**2))  # ~2.5 Mpx of output per measurement
            t0 = time.thread_time()
            for _ in range(k):
                predictor(x)
            rates[n].append(k * out * out / 1e6 / (time.thread_time() - t0))
    print(json.dumps({str(n): statistics.median(v) for n, v in rates.items()}))


def child_tile_rss(precision: str, size: int) -> None:
    """In a child: peak RSS (MB) after three eager passes of the predictor on one tile size."""
    import resource

    import numpy as np
    import torch

    from tilesegment.infer.predict import make_predictor
    from tilesegment.model import load_checkpoint
    from tilesegment.model.registry import resolve_model

    torch.set_num_threads(1)
    net, spec = load_checkpoint(resolve_model("nuclei-he"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    predictor = make_predictor(net, spec, "cpu", precision)
    x = np.zeros((1, size, size, 3), np.uint8)
    for _ in range(3):
        predictor(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


def bare(processes: int, threads: int, compile: bool, size: int, tiles: int) -> float:
    """Output Mpx/s of ``processes`` children of ``threads`` threads each on ``size`` px tiles,
    run at once; ``tiles`` 572 px tiles' worth of output each (fewer larger tiles)."""
    from tilesegment.geometry import UNetGeometry

    geometry = UNetGeometry.of(depth=4)
    tiles = max(1, round(tiles * (geometry.output_size(572) / geometry.output_size(size)) ** 2))
    cmd = [sys.executable, __file__, "child-bare", str(threads), str(int(compile)), str(tiles)]
    cmd.append(str(size))
    kids = [
        subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(REPO)
        )
        for _ in range(processes)
    ]
    for k in kids:
        if k.stdout.readline().strip() != "ready":
            raise RuntimeError("a bare-forward child failed to start")
    for k in kids:
        k.stdin.write("go\n")
        k.stdin.flush()
    rates = [json.loads(k.communicate()[0])["mpx_per_s"] for k in kids]
    return sum(rates)


def _child(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, env=_env(REPO)
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_of(part: dict, kind: str) -> str:
    return f"{_median(part['default_runs'], f'{kind}_mpx_per_s'):.2f}"


def _median(rows: list[dict], *keys: str) -> float:
    values = []
    for r in rows:
        v = r
        for k in keys:
            v = v[k]
        values.append(v)
    return statistics.median(values)


# ---------------------------------------------------------------------------------- parts


def part_default(args, cores: int) -> dict:
    image = slide(args.size)
    from tilesegment.infer.options import DEFAULT_TILE_SIZE as tile

    configs = {
        f"1 process x {cores} threads, eager, {tile} px": (1, cores, False, tile),
        f"1 process x {cores} threads, compiled, {tile} px": (1, cores, True, tile),
        f"{cores} processes x 1 thread, eager, {tile} px": (cores, 1, False, tile),
        f"{cores} processes x 1 thread, compiled, {tile} px": (cores, 1, True, tile),
    }
    for other in sorted({572, 1084} - {tile}):  # the tile size is part of the configuration
        configs[f"{cores} processes x 1 thread, compiled, {other} px"] = (cores, 1, True, other)
    bare_rates: dict[str, list[float]] = {name: [] for name in configs}
    runs = []
    # The VM's speed drifts by tens of percent within minutes: the order of the configurations
    # turns with each repeat (none is always the one measured just before the default run), and
    # the bare pool on the default's own tiles is measured right before and right after it.
    own = f"{cores} processes x 1 thread, compiled, {tile} px"
    others = [name for name in configs if name != own]
    for r in range(args.repeats):
        k = r % len(others)
        for name in [*others[k:], *others[:k], own]:
            bare_rates[name].append(bare(*configs[name], args.bare_tiles))
            print(json.dumps({"bare": name, "mpx_per_s": bare_rates[name][-1]}), file=sys.stderr)
        row = run_default(REPO, image, WORK / f"default-{args.size}.zarr")
        after = bare(*configs[own], args.bare_tiles)
        print(json.dumps({"bare after": own, "mpx_per_s": after}), file=sys.stderr)
        row["adjacent_bare_mpx_per_s"] = (bare_rates[own][-1] + after) / 2
        row["stream_mpx_per_s"] = row["computed_mpx"] / row["seconds"]["stream"]
        row["wall_mpx_per_s"] = row["computed_mpx"] / row["wall_s"]
        # Per CPU-second of the whole process tree, times the cores: what the run would make
        # with every core busy; against the bare rate (every core busy) it discounts the
        # moments the run leaves a core idle and is less moved by the VM's speed.
        row["cpu_mpx_per_s"] = row["computed_mpx"] / row["tree_cpu_s"] * cores
        print(json.dumps({"default": row}), file=sys.stderr)
        runs.append(row)
    medians = {name: statistics.median(r) for name, r in bare_rates.items()}
    best = max(medians, key=medians.get)
    stream, wall = _median(runs, "stream_mpx_per_s"), _median(runs, "wall_mpx_per_s")
    cpu = _median(runs, "cpu_mpx_per_s")
    return {
        "slide_px": args.size,
        "bare_mpx_per_s": medians,
        "fastest_bare": best,
        "default_runs": runs,
        "default_stream_mpx_per_s": stream,
        "default_wall_mpx_per_s": wall,
        "ratio_stream": stream / medians[best],
        "ratio_wall": wall / medians[best],
        "ratio_cpu": cpu / medians[best],
        "ratio_adjacent": statistics.median(
            r["wall_mpx_per_s"] / r["adjacent_bare_mpx_per_s"] for r in runs
        ),
    }


def part_tiles(args) -> dict:
    from tilesegment.infer.devices import cpu_has_native_bf16

    precisions = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    sizes = [str(n) for n in args.tile_sizes]
    rates, rss = {}, {}
    for precision in precisions:
        for compile in (False, True):
            key = f"{precision} {'compiled' if compile else 'eager'}"
            rounds = str(args.repeats)
            rates[key] = _child("child-tiles", precision, str(int(compile)), rounds, *sizes)
            print(json.dumps({"tiles": key, "mpx_per_cpu_s": rates[key]}), file=sys.stderr)
        for n in sizes:
            rss[f"{precision} {n}"] = _child("child-tile-rss", precision, n)
            print(json.dumps({"tile_rss": f"{precision} {n}", **rss[f"{precision} {n}"]}),
                  file=sys.stderr)  # fmt: skip
    return {"sizes": args.tile_sizes, "mpx_per_cpu_s": rates, "rss": rss}


def part_small(args) -> dict:
    from check_identity import old_source  # benchmarks/, the script's folder
    from PIL import Image

    old = old_source(args.old, WORK)
    images = {}
    with Image.open(MONUSEG) as im:
        for n in (256, 1000):
            images[n] = WORK / f"monuseg-{n}.png"
            im.convert("RGB").crop((0, 0, n, n)).save(images[n])
    rows: dict[str, list[dict]] = {}
    for _ in range(args.small_repeats):
        for n, image in images.items():
            for name, src in (("new", REPO), (args.old, old)):
                out = WORK / f"small-{name}-{n}.zarr"
                row = run_default(src, image, out, phases=True)
                rows.setdefault(f"{name} {n}", []).append(row)
                print(json.dumps({"small": f"{name} {n}", **row}), file=sys.stderr)
    out = {}
    for key, rs in rows.items():
        names = {k for r in rs for k in r["phases"]}
        phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in rs) for k in names}
        ratio = None
        if key.startswith("new "):
            olds = rows[key.replace("new", args.old, 1)]
            ratio = statistics.median(
                a["wall_s"] / b["wall_s"] for a, b in zip(rs, olds, strict=True)
            )
        out[key] = {"wall_s": _median(rs, "wall_s"), "phases": phases, "n": len(rs)}
        out[key]["paired_ratio_to_old"] = ratio
    return {"old": args.old, "results": out}


def part_rss(args) -> dict:
    rows = []
    for size in args.rss_sizes:
        row = run_default(REPO, slide(size, args.size), WORK / f"rss-{size}.zarr")
        row["slide_px"] = size
        print(json.dumps({"rss": row}), file=sys.stderr)
        rows.append(row)
    return {"tissue_px": args.size, "results": rows}


def part_crossover(args, cores: int) -> dict:
    rows: dict[str, list[tuple[float, float]]] = {"in-process": [], "pool": []}
    runs = []
    for size in args.crossover_sizes:
        for _ in range(args.repeats):
            for mode, flag in (("in-process", "1"), ("pool", str(cores))):
                row = run_default(REPO, slide(size), WORK / f"cross-{mode}.zarr", "--workers", flag)
                rows[mode].append((row["computed_mpx"], row["seconds"]["stream"]))
                runs.append({"size": size, "mode": mode, **row})
                print(json.dumps(runs[-1]), file=sys.stderr)
    fits = {}
    for mode, points in rows.items():
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        slope, intercept = statistics.linear_regression(xs, ys)
        fits[mode] = {"start_s": intercept, "mpx_per_s": 1 / slope}
    a_in, a_pool = fits["in-process"]["start_s"], fits["pool"]["start_s"]
    gain = 1 / fits["in-process"]["mpx_per_s"] - 1 / fits["pool"]["mpx_per_s"]
    ready = [r["seconds"].get("workers_ready") for r in runs if r["mode"] == "pool"]
    return {
        "fits": fits,
        "break_even_mpx": (a_pool - a_in) / gain if gain > 0 else None,
        "workers_ready_s_median": statistics.median(r for r in ready if r is not None),
        "runs": runs,
    }


# ------------------------------------------------------------------------------- tables


def _workers(w: dict) -> str:
    n = w["processes"]
    return f"{w['rule']}: " + ("in-process" if n == 0 else f"{n} workers")


def markdown(results: dict, machine: str) -> str:
    lines = [f"Machine: {machine}.", ""]
    if "default" in results:
        d = results["default"]
        lines += [
            f"(a) {d['slide_px']}² all-tissue slide: default run vs bare forward (output Mpx/s)",
            "",
            "| configuration | Mpx/s (median) |",
            "|---|---|",
        ]
        lines += [f"| bare: {k} | {v:.2f} |" for k, v in d["bare_mpx_per_s"].items()]
        w = d["default_runs"][0]["workers"]
        lines += [
            f"| `tilesegment run` default, stream ({_workers(w)}) "
            f"| {d['default_stream_mpx_per_s']:.2f} |",
            f"| `tilesegment run` default, whole process | {d['default_wall_mpx_per_s']:.2f} |",
            f"| `tilesegment run` default, per CPU-second x cores | {_median_of(d, 'cpu')} |",
            "",
            f"Ratio to the fastest bare configuration ({d['fastest_bare']}): stream "
            f"**{d['ratio_stream']:.2f}**, whole process {d['ratio_wall']:.2f}, per CPU-second "
            f"{d['ratio_cpu']:.2f}. Whole process against the bare pool on the default's own "
            f"tiles measured just before and after each run: {d['ratio_adjacent']:.2f} "
            "(median). The network's share of the workers' CPU: "
            + ", ".join(f"{r.get('forward_share', 0):.2f}" for r in d["default_runs"])
            + ".",
            "",
        ]
    if "tiles" in results:
        t = results["tiles"]
        sizes = [str(n) for n in t["sizes"]]
        lines += [
            "(e) output Mpx per CPU-second of one thread, by input tile size (medians)",
            "",
            "| precision, mode | " + " | ".join(f"{n} px" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for key, row in t["mpx_per_cpu_s"].items():
            lines.append(f"| {key} | " + " | ".join(f"{row[n]:.2f}" for n in sizes) + " |")
        for precision in dict.fromkeys(k.split()[0] for k in t["rss"]):
            lines.append(
                f"| peak RSS MB, {precision} eager | "
                + " | ".join(f"{t['rss'][f'{precision} {n}']['peak_mb']:.0f}" for n in sizes)
                + " |"
            )
        lines.append("")
    if "small" in results:
        s = results["small"]
        res, old = s["results"], s["old"]
        n = next(iter(res.values()))["n"]
        cols = [f"{old} {k}" for k in (256, 1000)] + [f"new {k}" for k in (256, 1000)]
        cols = [cols[0], cols[2], cols[1], cols[3]]
        lines += [
            f"(b) small images end to end, seconds (medians of {n}, alternating): {old} "
            "(before) and this tree (after)",
            "",
            "| step | "
            + " | ".join(c.replace("new", "after").replace(old, "before") + "²" for c in cols)
            + " |",
            "|---|" + "---|" * len(cols),
            "| **process wall** | "
            + " | ".join(f"**{res[c]['wall_s']:.2f}**" for c in cols)
            + " |",
        ]
        for step in SMALL_ROWS:
            lines.append(
                f"| {step} | "
                + " | ".join(f"{res[c]['phases'].get(step, 0):.2f}" for c in cols)
                + " |"
            )
        ratios = ", ".join(
            f"{k}²: {res[f'new {k}']['paired_ratio_to_old']:.2f}" for k in (256, 1000)
        )
        lines += ["", f"After / before, process wall (median of paired runs): {ratios}.", ""]
    if "rss" in results:
        r = results["rss"]
        lines += [
            f"(c) peak RSS of the default, {r['tissue_px']}² of tissue in each slide",
            "",
            "| slide | workers | computed Mpx | main MB | per worker MB | tree max MB |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["results"]:
            w = row["workers"]
            lines.append(
                f"| {row['slide_px']}² | {_workers(w)} | {row['computed_mpx']:.0f} "
                f"| {row['peak_rss_mb']['main']:.0f} | {row['peak_rss_mb']['workers']:.0f} "
                f"| {row['tree_peak_rss_mb']:.0f} |"
            )
        lines.append("")
    if "crossover" in results:
        c = results["crossover"]
        f = c["fits"]
        even = "none (the pool was not faster)"
        if c["break_even_mpx"] is not None:
            even = f"{c['break_even_mpx']:.1f} Mpx of tissue"
        lines += [
            "(d) stream seconds = start + Mpx / rate, fitted over the crossover sizes",
            "",
            "| mode | start s | Mpx/s |",
            "|---|---|---|",
            *(f"| {m} | {v['start_s']:.2f} | {v['mpx_per_s']:.2f} |" for m, v in f.items()),
            "",
            f"Break-even: {even}; workers ready after "
            f"{c['workers_ready_s_median']:.2f} s (median).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child-bare":
        child_bare(int(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4]), int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "child-tiles":
        sizes = [int(n) for n in sys.argv[5:]]
        child_tiles(sys.argv[2], bool(int(sys.argv[3])), sizes, int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "child-tile-rss":
        child_tile_rss(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "child-phases":
        child_phases(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=PARTS, help="parts to run (default all)")
    ap.add_argument("--size", type=int, default=20000, help="(a) slide edge; (c) tissue edge")
    ap.add_argument("--repeats", type=int, default=3, help="(a), (d), (e) repeats")
    ap.add_argument("--bare-tiles", type=int, default=40, help="(a) tiles per bare measurement")
    ap.add_argument("--small-repeats", type=int, default=5)
    ap.add_argument("--old", default="8a6b24c", help="(b) the commit to compare with")
    ap.add_argument("--rss-sizes", type=int, nargs="+", default=[20000, 80000])
    ap.add_argument("--tile-sizes", type=int, nargs="+", default=[572, 828, 1084, 1340])
    ap.add_argument("--crossover-sizes", type=int, nargs="+", default=[3000, 6000, 9000, 12000])
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    from tilesegment.machine import usable_cores

    cores = usable_cores()
    parts = args.only or [p for p in PARTS if p not in ("crossover", "tiles")]
    results: dict = {}
    if "default" in parts:
        results["default"] = part_default(args, cores)
    if "small" in parts:
        results["small"] = part_small(args)
    if "rss" in parts:
        results["rss"] = part_rss(args)
    if "crossover" in parts:
        results["crossover"] = part_crossover(args, cores)
    if "tiles" in parts:
        results["tiles"] = part_tiles(args)
    machine = (
        f"{platform.processor() or platform.machine()}, {cores} usable cores, "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    (WORK / "results.json").write_text(json.dumps({"machine": machine, **results}, indent=2))
    print(markdown(results, machine))


if __name__ == "__main__":
    main()
