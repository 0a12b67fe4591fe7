"""End-to-end `tilesegment run` on a synthetic pyramidal JPEG TIFF: peak RSS and throughput,
next to the bare model forward rate on the same tile size, measured in the same run.

    python benchmarks/bench_run.py --size 20000 --base-channels 16 --tile-size 572

Each measurement runs in its own child process (so peak RSS is that process's own), with the
same torch thread count. The bare forward rate is measured before and after the run and the
median is used; the efficiency ratio is end-to-end output Mpx/s / bare forward output Mpx/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"


def child_forward(model: str, tile: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from tilesegment.infer.predict import Predictor
    from tilesegment.model import load_checkpoint

    net, spec = load_checkpoint(model)
    predictor = Predictor(net, spec)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, tile, tile, spec.unet.in_channels), dtype=np.uint8)
    predictor(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor(x)
        times.append(time.perf_counter() - t0)
    out = net.output_size(tile)
    med = statistics.median(times)
    return {
        "seconds_per_tile": med,
        "mpx_per_s": out * out / med / 1e6,
        "threads": torch.get_num_threads(),
    }


def child_run(slide: str, model: str, tile: int, out: str) -> dict:
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide

    t0 = time.perf_counter()
    summary = run_slide(
        slide,
        out,
        model,
        # Every tile is processed (no tissue skipping) so Mpx/s compares with the bare forward.
        RunOptions(tile_size=tile, tissue="none", preview=False, progress=False, overwrite=True),
    )
    total = time.perf_counter() - t0
    return {
        "tiles": summary.tiles,
        "megapixels": summary.megapixels,
        "stream_seconds": summary.seconds,
        "total_seconds": total,
        "mpx_per_s": summary.megapixels / summary.seconds,
        "mpx_per_s_with_pyramid": summary.megapixels / total,
    }


def _child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--tile-size", type=int, default=572)
    ap.add_argument("--forward-repeats", type=int, default=7)
    ap.add_argument("--child", nargs="*")
    args = ap.parse_args()

    if args.child is not None:
        kind, *rest = args.child
        res = child_forward(rest[0], int(rest[1]), int(rest[2])) if kind == "forward" else None
        if kind == "run":
            res = child_run(rest[0], rest[1], int(rest[2]), rest[3])
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint
    from tilesegment.testing.synthetic import write_slide

    WORK.mkdir(exist_ok=True)
    slide = WORK / f"synthetic-{args.size}.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        write_slide(slide, (args.size, args.size), tissue_fraction=0.5, seed=1)
        print(f"wrote {slide} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model = WORK / f"unet-b{args.base_channels}"
    spec = ModelSpec.default(UNetConfig(base_channels=args.base_channels), name=model.name)
    save_checkpoint(new_model(spec, seed=0), spec, model)

    fwd = [_child("forward", str(model), str(args.tile_size), str(args.forward_repeats))]
    run = _child("run", str(slide), str(model), str(args.tile_size), str(WORK / "out.zarr"))
    fwd.append(_child("forward", str(model), str(args.tile_size), str(args.forward_repeats)))
    bare = statistics.median(f["mpx_per_s"] for f in fwd)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "slide_px": args.size,
        "model": f"depth 4, base {args.base_channels}, fp32, channels-last",
        "tile_size": args.tile_size,
        "bare_forward_mpx_per_s": [round(f["mpx_per_s"], 3) for f in fwd],
        "run": run,
        "efficiency": run["mpx_per_s"] / bare,
        "efficiency_with_pyramid": run["mpx_per_s_with_pyramid"] / bare,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
