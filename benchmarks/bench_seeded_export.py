"""Peak RSS and time of seeded instance labelling (``label_instances`` on a store whose model
declares interior/boundary classes) for growing image sizes: memory must stay flat.

Each size builds an output store of a crowded synthetic class map (touching discs: interior
cores, boundary rings; ``tests/test_seeded.py``'s ``nuclei_map`` repeated) in every
``--every``-th chunk, then labels it in a fresh child process and reports that process's peak
RSS. Usage::

    python benchmarks/bench_seeded_export.py --sizes 8192 16384 32768 --every 4
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 1152


def build(path: Path, size: int, every: int) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_seeded import nuclei_map
    from tilesegment.instances import InstanceSpec
    from tilesegment.store import ClassSpec, OutputStore

    classes = ClassSpec(("background", "interior", "boundary"), ((0, 0, 0, 0),) * 3)
    store = OutputStore.create(
        path,
        image_shape=(size, size),
        classes=classes,
        chunk_shape=(CHUNK, CHUNK),
        mpp=(0.25, 0.25),
        attrs={"instances": InstanceSpec().to_json()},
    )
    tile = nuclei_map(np.random.default_rng(0), (CHUNK, CHUNK), 6000)
    onehot = np.stack([tile == k for k in range(3)]).astype(np.float32)
    zeros = np.zeros_like(onehot)
    zeros[0] = 1
    written = 0
    for i, box in enumerate(store.chunk_boxes()):
        p = onehot if i % every == 0 else zeros
        store.write_chunk(box, np.ascontiguousarray(p[:, : box.h, : box.w]))
        written += i % every == 0
    store.finalize()
    return written


def label(path: Path, method: str) -> None:
    from tilesegment.postprocess import InstanceOptions, label_instances

    start = time.perf_counter()
    summary = label_instances(path, InstanceOptions(threads=2, method=method))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{summary.count} {summary.method} {time.perf_counter() - start:.1f} {peak:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--label", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--method", default="seeded", help="seeded, or components (of the interior) to compare"
    )
    args = parser.parse_args()
    if args.label:
        label(args.label, args.method)
        return
    print("| image px | chunks with nuclei | method | instances | label s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "out.zarr"
            written = build(path, size, args.every)
            out = subprocess.run(
                [sys.executable, __file__, "--label", str(path), "--method", args.method],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            count, method, seconds, peak = out
            assert method == args.method
            row = f"| {size}² | {written} | {method} | {count} | {seconds} | {peak} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
