"""GPU readiness in one short run (issue 13, item 2): correctness, speed, and the bottleneck.

    python benchmarks/gpu_check.py                 # a CUDA machine: cuda:0 (+ all GPUs), ~8 min
    python benchmarks/gpu_check.py --dry-run       # the same code paths on the CPU, small sizes

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (``--out``, default
``benchmarks/_work/gpu_check``) and exits 1 when a correctness check failed. No network.

(a) Correctness, on CMU-1-Small-Region (``../shared/data/slides``; the dry run uses a crop),
    every run through ``run_slide`` in-process with float32 probabilities and ``--tissue none``:
    the device in fp32 against the CPU in fp32; two tile sizes on the device; bf16 and fp16
    autocast against fp32; the out-of-memory halving of ``infer.stream.BatchSize`` with a batch
    sized from ``torch.cuda.mem_get_info`` so that it really runs out of device memory (on the
    CPU of the dry run the out-of-memory error is simulated above two tiles, and said so).
(b) Speed: the bare network (``model(x)`` on device tensors; batch, tile, channels-last,
    compiled), each stage of the pipeline alone (JPEG decode with 1 and N reader threads,
    host-to-device copies from pinned and pageable memory, chunk writes into a real Zarr
    store) and ``tilesegment run`` end to end on a synthetic JPEG slide with ``--devices
    cuda:0`` (and every GPU when there are more). The slowest stage is named the bottleneck.
(c) One JSON document and one Markdown table.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("TILESEGMENT_DATA", HERE.parent.parent / "shared" / "data"))
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
MODEL = "nuclei-he"

#: Largest |p_a - p_b| allowed between two fp32 runs: exact maths up to float rounding on a CPU;
#: on CUDA cuDNN convolutions use TF32 by default (10-bit mantissa), hence the wider bound.
FP32_TOL = 1e-3
TF32_TOL = 0.02
#: Autocast against fp32 (bf16 keeps 8 bits of mantissa): probabilities within 0.1, the mask
#: (argmax) equal on 99 % of the pixels.
AUTOCAST_TOL = 0.1
AUTOCAST_AGREE = 0.99
FP32_AGREE = 0.999


@dataclass(frozen=True)
class Sizes:
    """What one mode measures."""

    device: str
    tiles: tuple[int, ...]
    """Tile sizes of the bare forward."""
    batches: tuple[int, ...]
    invariance_tiles: tuple[int, int]
    cmu_crop: int | None
    """Edge of the CMU-1-Small-Region crop; None: the whole slide."""
    slide_px: int
    """Edge of the synthetic slide run end to end."""
    run_tile: int
    run_batch: int
    read_threads: int
    repeats: int
    compile: bool
    budget_s: float
    """Time the eager and, again, the compiled bare-forward grid may take; configurations after
    it are skipped (and said so). Compiled: batch 1 and the run's batch only (a compilation
    per shape)."""


REAL = Sizes(
    device="cuda:0",
    tiles=(572, 1084, 2108),
    batches=(1, 2, 4, 8, 16),
    invariance_tiles=(572, 1084),
    cmu_crop=None,
    slide_px=20000,
    run_tile=1084,
    run_batch=8,
    read_threads=8,  # capped to the usable cores at start
    repeats=5,
    compile=True,
    budget_s=100.0,
)
DRY = Sizes(
    device="cpu",
    tiles=(252, 316),
    batches=(1, 2),
    invariance_tiles=(252, 316),
    cmu_crop=512,
    slide_px=1536,
    run_tile=252,
    run_batch=2,
    read_threads=2,
    repeats=2,
    compile=False,
    budget_s=60.0,  # never reached on an idle 2-core CPU (~2 s); a margin for a busy one
)


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ (a) correctness


def _cmu_input(work: Path, crop: int | None) -> Path:
    """CMU-1-Small-Region itself, or a tiled TIFF of its top-left ``crop``² px (same µm/px)."""
    if crop is None:
        return CMU
    import tifffile

    from tilesegment.io import open_slide

    path = work / f"cmu-crop-{crop}.tif"
    if not path.exists():
        with open_slide(CMU) as reader:
            pixels = reader.read_region(0, 600, 600, crop, crop)
            mpp = reader.info.mpp or (0.499, 0.499)
        res = 1e4 / mpp[0]
        tifffile.imwrite(
            path,
            pixels,
            tile=(256, 256),
            photometric="rgb",
            metadata=None,
            resolution=(res, res),
            resolutionunit="CENTIMETER",
        )
    return path


def _segment(slide: Path, out: Path, device: str, precision: str, tile: int) -> dict[str, Any]:
    """Probabilities (float32) and mask of an in-process ``run_slide``."""
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide
    from tilesegment.model.registry import resolve_model
    from tilesegment.store import OutputStore

    opts = RunOptions(
        tile_size=tile,
        tissue="none",
        preview=False,
        overwrite=True,
        dtype="float32",
        device=device,
        precision=precision,
        compile=False,
        in_process=True,
        progress=False,
    )
    t0 = time.perf_counter()
    run_slide(slide, out, resolve_model(MODEL), opts)
    store = OutputStore.open(out)
    return {
        "probs": store.probabilities[:],
        "mask": store.mask[:],
        "seconds": time.perf_counter() - t0,
    }


def _compare(name: str, a: dict, b: dict, tol: float, agree: float, **info: Any) -> dict:
    diff = float(np.abs(a["probs"] - b["probs"]).max())
    agreement = float((a["mask"] == b["mask"]).mean())
    ok = diff <= tol and agreement >= agree
    _log(f"{name}: max |dp| {diff:.2e} (<= {tol}), mask agreement {agreement:.6f} (>= {agree})")
    return {
        "status": "passed" if ok else "failed",
        "max_abs_diff": diff,
        "tolerance": tol,
        "mask_agreement": agreement,
        "min_agreement": agree,
        **info,
    }


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def check_correctness(sizes: Sizes, work: Path, cuda: bool) -> dict[str, dict]:
    import torch

    slide = _cmu_input(work, sizes.cmu_crop)
    dev, (t0, t1) = sizes.device, sizes.invariance_tiles
    tf32 = cuda and torch.backends.cudnn.allow_tf32
    tol = TF32_TOL if tf32 else FP32_TOL
    info = {"slide": slide.name, "device": dev, "cudnn_tf32": bool(tf32)}
    fp32 = _segment(slide, work / "dev-fp32.zarr", dev, "fp32", t0)
    checks: dict[str, dict] = {}
    if cuda:
        cpu = _segment(slide, work / "cpu-fp32.zarr", "cpu", "fp32", t0)
        checks["device_vs_cpu_fp32"] = _compare(
            "device vs cpu", fp32, cpu, tol, FP32_AGREE, tile=t0, **info
        )
    else:
        checks["device_vs_cpu_fp32"] = _skipped("no CUDA device: the device is the CPU itself")
    other = _segment(slide, work / "dev-fp32-t1.zarr", dev, "fp32", t1)
    checks["tile_invariance_fp32"] = _compare(
        "tiles", fp32, other, tol, FP32_AGREE, tiles=[t0, t1], **info
    )
    for precision in ("bf16", "fp16"):
        if precision == "fp16" and not cuda:
            checks["autocast_fp16"] = _skipped("fp16 autocast needs a CUDA device")
            continue
        if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            checks["autocast_bf16"] = _skipped("this GPU does not support bf16")
            continue
        low = _segment(slide, work / f"dev-{precision}.zarr", dev, precision, t0)
        checks[f"autocast_{precision}"] = _compare(
            precision, low, fp32, AUTOCAST_TOL, AUTOCAST_AGREE, tile=t0, **info
        )
    checks["oom_halving"] = check_oom_halving(sizes, slide, cuda)
    return checks


def check_oom_halving(sizes: Sizes, slide: Path, cuda: bool) -> dict:
    """``BatchSize.predict`` with a batch that does not fit: the batch size must halve and the
    outputs must equal those of a single-tile batch. fp32, so that the comparison is tight
    (cuDNN may pick other algorithms for other batch sizes; with TF32 the bound is TF32_TOL)."""
    import torch

    from tilesegment.infer.predict import make_predictor
    from tilesegment.infer.stream import BatchSize
    from tilesegment.io import open_slide
    from tilesegment.model.checkpoint import load_checkpoint
    from tilesegment.model.registry import resolve_model

    net, spec = load_checkpoint(resolve_model(MODEL))
    precision = "fp32"
    tol = TF32_TOL if cuda and torch.backends.cudnn.allow_tf32 else FP32_TOL
    predictor = make_predictor(net, spec, sizes.device, precision)
    tile_px = sizes.invariance_tiles[0]
    with open_slide(slide) as reader:
        tile = reader.read_region(0, 0, 0, tile_px, tile_px)
    ref = predictor(tile[None])[0]
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        predictor(tile[None])
        per_tile = max(1, torch.cuda.max_memory_allocated() - before)
        free, _total = torch.cuda.mem_get_info()
        n = max(2, 2 * free // per_tile + 1)
        how = f"real: {n} tiles x {per_tile / 2**20:.0f} MiB > {free / 2**30:.1f} GiB free"
        call = predictor
    else:
        n, limit = 5, 2

        def call(batch: np.ndarray) -> np.ndarray:
            if len(batch) > limit:
                raise torch.OutOfMemoryError(f"simulated: {len(batch)} tiles > {limit}")
            return predictor(batch)

        how = f"simulated on the CPU: torch.OutOfMemoryError above {limit} tiles per batch"
    sizer = BatchSize(int(n))
    t0 = time.perf_counter()
    try:
        out = sizer.predict(call, np.repeat(tile[None], int(n), axis=0))
    except Exception as exc:  # reported, not hidden: the check fails with the error
        return {"status": "failed", "how": how, "error": f"{type(exc).__name__}: {exc}"[:500]}
    diff = float(max(np.abs(out[0] - ref).max(), np.abs(out[-1] - ref).max()))
    ok = sizer.size < n and len(out) == n and diff <= tol
    _log(f"oom halving ({how}): batch {n} -> {sizer.size}, max |dp| {diff:.2e}")
    return {
        "status": "passed" if ok else "failed",
        "how": how,
        "batch": int(n),
        "halved_to": sizer.size,
        "max_abs_diff": diff,
        "tolerance": tol,
        "precision": precision,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ------------------------------------------------------------------------------------ (b) speed


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_forward(sizes: Sizes, precision: str) -> list[dict]:
    """Output Mpx/s of ``model(x)`` on normalised device tensors, for every configuration."""
    import torch

    from tilesegment.infer.predict import CompiledOrEager, Predictor
    from tilesegment.model.checkpoint import load_checkpoint
    from tilesegment.model.registry import resolve_model

    configs = [
        (c, cl)
        for c in ((False, True) if sizes.compile else (False,))
        for cl in (True, False)
        if cl or not c
    ]
    rows, start, last = [], time.perf_counter(), False
    if not sizes.compile:
        rows.append(
            {
                "tile": sizes.run_tile,
                "batch": sizes.run_batch,
                "channels_last": True,
                "compiled": True,
                "precision": precision,
                "skipped": "not in the dry run: compiling takes 20-40 s on a 2-core CPU",
            }
        )
    for compiled, channels_last in configs:
        if compiled != last:
            start, last = time.perf_counter(), compiled
        net, spec = load_checkpoint(resolve_model(MODEL))
        p = Predictor(
            net, spec, device=sizes.device, precision=precision, channels_last=channels_last
        )
        model = CompiledOrEager(p.model) if compiled else p.model
        for tile in sizes.tiles:
            out_px = net.output_size(tile)
            for batch in sorted({1, sizes.run_batch}) if compiled else sizes.batches:
                row = {
                    "tile": tile,
                    "batch": batch,
                    "channels_last": channels_last,
                    "compiled": compiled,
                    "precision": precision,
                }
                rows.append(row)
                if time.perf_counter() - start > sizes.budget_s:
                    row["skipped"] = f"time budget of {sizes.budget_s:.0f} s spent"
                    continue
                try:
                    x = torch.rand(batch, 3, tile, tile, device=sizes.device)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)

                    @torch.inference_mode()
                    def forward(x=x, p=p, model=model) -> None:
                        with p.forward.autocast():
                            model(x)

                    s = _time(forward, sizes.device, sizes.repeats)
                    row["mpx_per_s"] = round(batch * out_px * out_px / s / 1e6, 3)
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of device memory"
                    torch.cuda.empty_cache()
                if compiled and model.failed:
                    row["skipped"] = f"compile failed, eager: {model.failed}"
        del p, model
        if sizes.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def bench_h2d(sizes: Sizes) -> dict:
    """Host-to-device copies of one uint8 batch of the run's tiles: pinned and pageable."""
    import torch

    if not sizes.device.startswith("cuda"):
        return _skipped("no CUDA device: nothing to copy to")
    shape = (sizes.run_batch, sizes.run_tile, sizes.run_tile, 3)
    out = {}
    for kind in ("pinned", "pageable"):
        host = torch.zeros(shape, dtype=torch.uint8)
        host = host.pin_memory() if kind == "pinned" else host
        s = _time(lambda h=host: h.to(sizes.device, non_blocking=True), sizes.device, 10)
        out[f"{kind}_gb_per_s"] = round(host.numel() / s / 1e9, 2)
        out[f"{kind}_input_mpx_per_s"] = round(host.numel() / 3 / s / 1e6, 1)
    return out


def bench_decode(slide: Path, threads: int, seconds: float = 6.0) -> dict:
    """Slide Mpx/s of ``read_region`` (JPEG decode) of 1024² blocks, 1 thread and ``threads``."""
    from tilesegment.io import open_slide

    block = 1024
    out = {}
    with open_slide(slide) as reader:
        h, w = reader.info.level_shapes[0]
        boxes = [
            (y, x) for y in range(0, h - block + 1, block) for x in range(0, w - block + 1, block)
        ]
        for n in sorted({1, threads}):
            t0, px, i = time.perf_counter(), 0, 0
            with ThreadPoolExecutor(n) as pool:
                while time.perf_counter() - t0 < seconds / 2 and i < len(boxes):
                    batch = boxes[i : i + n]
                    i += n
                    list(pool.map(lambda b: reader.read_region(0, b[0], b[1], block, block), batch))
                    px += len(batch) * block * block
            out[f"mpx_per_s_{n}_threads"] = round(px / (time.perf_counter() - t0) / 1e6, 2)
    return out


def bench_write(output: Path, work: Path, chunks: int = 24) -> dict:
    """Output Mpx/s of ``OutputStore.write_chunk`` in one thread (as the run's writer), with
    probabilities read back from the end-to-end output."""
    from tilesegment.geometry import Box
    from tilesegment.model.checkpoint import load_spec
    from tilesegment.model.registry import resolve_model
    from tilesegment.store import OutputStore
    from tilesegment.store.ngff import ClassSpec

    spec = load_spec(resolve_model(MODEL))
    src = OutputStore.open(output).probabilities
    cy, cx = src.chunks[1:]
    n = min(chunks, src.shape[1] // cy)
    probs = [
        np.asarray(src[:, i * cy : (i + 1) * cy, :cx], dtype=np.float32) / 255 for i in range(n)
    ]
    store = OutputStore.create(
        work / "write-bench.zarr",
        image_shape=(n * cy, cx),
        classes=ClassSpec(spec.class_names, spec.class_colours),
        chunk_shape=(cy, cx),
        mpp=None,
        overwrite=True,
    )
    t0 = time.perf_counter()
    for i, p in enumerate(probs):
        store.write_chunk(Box(i * cy, 0, cy, cx), p)
    s = time.perf_counter() - t0
    return {"chunk": [cy, cx], "chunks": n, "mpx_per_s": round(n * cy * cx / s / 1e6, 2)}


def run_end_to_end(slide: Path, out: Path, devices: str, sizes: Sizes) -> dict:
    """``tilesegment run`` in a child process; the figures of its report."""
    from tilesegment.store.layout import report_path

    cmd = [
        sys.executable,
        "-m",
        "tilesegment",
        "run",
        str(slide),
        "-o",
        str(out),
        "--devices",
        devices,
        "--tile-size",
        str(sizes.run_tile),
        "--batch-size",
        str(sizes.run_batch),
        "--read-threads",
        str(sizes.read_threads),
        "--tissue",
        "none",
        "--no-preview",
        "--overwrite",
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"devices": devices, "status": "failed", "error": proc.stderr[-800:]}
    report = json.loads(report_path(out).read_text())
    return {
        "devices": devices,
        "status": "ok",
        "wall_s": round(wall, 1),
        "stream_s": report["seconds"]["stream"],
        "finalize_s": report["seconds"]["finalize"],
        "mpx": report["megapixels"]["processed"],
        "mpx_per_s": report["mpx_per_s"],
        "precision": sorted({d["precision"] for d in report["devices"]}),
        "compiled": report["compiled"],
        "workers": report["devices"],
    }


def measure_speed(sizes: Sizes, work: Path, cuda: bool) -> dict:
    from tilesegment.infer.devices import resolve_precision
    from tilesegment.testing.synthetic import write_slide

    precision = resolve_precision("auto", sizes.device)
    _log(f"bare forward ({precision})")
    forward = bench_forward(sizes, precision)
    slide = work / f"synthetic-{sizes.slide_px}.tif"
    if not slide.exists():
        _log(f"writing {slide.name}")
        write_slide(
            slide.with_suffix(".part.tif"),
            (sizes.slide_px, sizes.slide_px),
            tissue_fraction=0.5,
            mpp=0.25,
        )
        slide.with_suffix(".part.tif").rename(slide)
    runs = [run_end_to_end(slide, work / "run-dev0.zarr", sizes.device, sizes)]
    if cuda:
        import torch

        if torch.cuda.device_count() > 1:
            every = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
            runs.append(run_end_to_end(slide, work / "run-all.zarr", every, sizes))
    _log(f"end to end: {runs}")
    stages = {"decode": bench_decode(slide, sizes.read_threads), "host_to_device": bench_h2d(sizes)}
    if runs[0]["status"] == "ok":
        stages["write"] = bench_write(work / "run-dev0.zarr", work)
    match = [
        r
        for r in forward
        if (r["tile"], r["batch"]) == (sizes.run_tile, sizes.run_batch)
        and r["channels_last"]
        and not r["compiled"]
        and "mpx_per_s" in r
    ]
    if match:
        stages["forward"] = {
            "mpx_per_s": match[0]["mpx_per_s"],
            "tile": sizes.run_tile,
            "batch": sizes.run_batch,
        }
    return {
        "precision": precision,
        "forward": forward,
        "stages": stages,
        "end_to_end": runs,
        "bottleneck": bottleneck(stages, sizes.read_threads),
    }


def bottleneck(stages: dict, threads: int) -> dict:
    """The slowest stage, all in Mpx/s of output (decoded slide px ~ output px: units are read as
    blocks, so each slide pixel is decoded about once)."""
    rates = {}
    if f"mpx_per_s_{threads}_threads" in stages.get("decode", {}):
        rates[f"decode ({threads} threads)"] = stages["decode"][f"mpx_per_s_{threads}_threads"]
    if "pinned_input_mpx_per_s" in stages.get("host_to_device", {}):
        rates["host_to_device (pinned)"] = stages["host_to_device"]["pinned_input_mpx_per_s"]
    for name in ("forward", "write"):
        if "mpx_per_s" in stages.get(name, {}):
            rates[name] = stages[name]["mpx_per_s"]
    if not rates:
        return {"stage": None, "rates": rates}
    return {"stage": min(rates, key=rates.get), "rates": rates}


# ---------------------------------------------------------------------------------- (c) reports


def machine() -> dict:
    import torch

    from tilesegment.machine import usable_cores

    gpus = [
        f"{torch.cuda.get_device_name(i)} "
        f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
        for i in range(torch.cuda.device_count())
    ]
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "cpu_cores": usable_cores(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}" if 0.99 < v < 1 else f"{v:.3g}"  # agreements: 0.999894, not 1
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def markdown(doc: dict) -> str:
    """The JSON document as Markdown tables."""
    speed, b = doc["speed"], doc["speed"]["bottleneck"]
    checks = [
        [
            name,
            c["status"],
            c.get("max_abs_diff"),
            c.get("tolerance"),
            c.get("mask_agreement"),
            c.get("reason") or c.get("how") or c.get("error"),
        ]
        for name, c in doc["checks"].items()
    ]
    forward = [
        [
            r["tile"],
            r["batch"],
            r["channels_last"],
            r["compiled"],
            r.get("mpx_per_s", r.get("skipped")),
        ]
        for r in speed["forward"]
    ]
    runs = [
        [
            r["devices"],
            r["status"],
            r.get("stream_s"),
            r.get("mpx"),
            r.get("mpx_per_s"),
            r.get("finalize_s"),
        ]
        for r in speed["end_to_end"]
    ]
    return "\n".join(
        [
            f"# gpu_check ({doc['mode']}, {doc['seconds']:.0f} s)",
            "",
            f"Machine: `{json.dumps(doc['machine'])}`",
            "",
            "## Correctness",
            "",
            *_table(["check", "status", "max abs diff", "limit", "mask agreement", "note"], checks),
            "",
            f"## Bare forward ({speed['precision']}, output Mpx/s)",
            "",
            *_table(["tile", "batch", "channels-last", "compiled", "Mpx/s"], forward),
            "",
            "## Stages alone (output Mpx/s)",
            "",
            *_table(["stage", "Mpx/s"], [[k, v] for k, v in b["rates"].items()]),
            "",
            f"Bottleneck: **{b['stage']}**",
            "",
            "## End to end (`tilesegment run`)",
            "",
            *_table(["devices", "status", "stream s", "Mpx", "Mpx/s", "finalize s"], runs),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes (the CI test)")
    ap.add_argument("--out", type=Path, default=HERE / "_work" / "gpu_check")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        print("gpu_check: no CUDA device here; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    if not CMU.exists():
        print(f"gpu_check: {CMU} is missing; set TILESEGMENT_DATA", file=sys.stderr)
        return 2
    from tilesegment.machine import usable_cores

    sizes = DRY if args.dry_run else REAL
    sizes = replace(sizes, read_threads=max(1, min(sizes.read_threads, usable_cores())))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checks = check_correctness(sizes, args.out, cuda and not args.dry_run)
    speed = measure_speed(sizes, args.out, cuda and not args.dry_run)
    doc = {
        "mode": "dry-run" if args.dry_run else "cuda",
        "sizes": asdict(sizes),
        "machine": machine(),
        "checks": checks,
        "speed": speed,
        "passed": all(c["status"] != "failed" for c in checks.values()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(doc))
    _log(f"wrote {args.out}/gpu_check.json and .md in {doc['seconds']} s; passed={doc['passed']}")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
