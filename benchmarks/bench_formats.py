"""NGFF 0.4 vs NGFF 0.5 outputs (issue 13, item 3): files on disk, bytes, time and peak RSS of
writing one output of ``tilesegment run``'s geometry, each format in a fresh child process.

    python benchmarks/bench_formats.py write --size 20000 --repeats 3
    python benchmarks/bench_formats.py count --sizes 20000 100000
    python benchmarks/bench_formats.py run --size 8192 --repeats 2

write  Every level-0 chunk of a 2-class output with a tissue label is written through the writer
       a run uses (0.4: ``OutputStore.write_chunk`` and ``write_label_chunk`` per chunk; 0.5: a
       ``ShardBuffer`` per shard, written whole once its chunks are in), then ``finalize``
       builds the pyramids. Probabilities are the shipped ``nuclei-he``'s on a corner of
       CMU-1-Small-Region (four distinct chunks, reused), so they compress like real outputs.
       Reports the files and bytes of the output, the seconds of the writes and of
       ``finalize`` and the child's peak RSS (``ru_maxrss``, which includes Python, numpy and
       zarr: compare the formats, not the absolute value). Formats alternate; medians over
       ``--repeats``.
count  The chunk or shard files of every array and level of such an output (every chunk
       holding data: an all-tissue slide), from the chunk and shard grids alone.
run    ``tilesegment run`` end to end (the command line, default model and options,
       ``--tissue none``) on a synthetic pyramidal JPEG slide at the model's 0.25 um/px, with
       each ``--format``, alternating: files, stream and total seconds and peak RSS from the
       run report, and whether every array of the two outputs is equal.

Geometry: the default model at its default tile (572 px in, 388 out, stride 384) gives chunks
of 3 strides (1152 px) and, with ``--format ngff-0.5``, shards of 7 chunks (8064 px).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "formats"
CHUNK = 1152
SHARD = 7 * CHUNK
FORMATS = ("ngff-0.4", "ngff-0.5")
SLIDE = HERE.parent.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _chunks() -> list:
    """Four (2, CHUNK, CHUNK) float32 probability chunks of the shipped ``nuclei-he`` on the
    top 2304 px of CMU-1-Small-Region (computed once, cached in ``WORK``), so the outputs
    compress like real ones."""
    import numpy as np

    cache = WORK / "nuclei-he-probabilities.npy"
    if not cache.exists():
        import dask

        from tilesegment.dask import segment
        from tilesegment.io import open_slide

        with open_slide(SLIDE) as reader:
            pixels = reader.read_region(0, 0, 0, 2 * CHUNK, reader.info.shape[1])
        probabilities = segment(pixels, "nuclei-he", tile_size=572, precision="fp32")
        WORK.mkdir(parents=True, exist_ok=True)
        np.save(cache, dask.compute(probabilities, scheduler="synchronous")[0])
    p = np.load(cache)  # 2304 x 2220: the second column of chunks overlaps the first
    return [p[:, y : y + CHUNK, x : x + CHUNK] for y in (0, CHUNK) for x in (0, p.shape[2] - CHUNK)]


def _write(path: Path, fmt: str, size: int) -> dict:
    """The body of a child: write one output, return what it measured."""
    import numpy as np

    from tilesegment.store import ClassSpec, OutputStore
    from tilesegment.store.layout import TISSUE
    from tilesegment.store.shards import ShardBuffer, grid_boxes

    classes = ClassSpec(("background", "nucleus"), ((0, 0, 0, 0), (255, 0, 0, 255)))
    chunks = _chunks()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store = OutputStore.create(
        path,
        image_shape=(size, size),
        classes=classes,
        chunk_shape=(CHUNK, CHUNK),
        mpp=(0.5, 0.5),
        overwrite=True,
        format=fmt,
        shard_shape=(SHARD, SHARD) if fmt == "ngff-0.5" else None,
    )
    store.create_label(TISSUE, dtype="uint8", colours={1: (60, 180, 75, 128)})
    ones = np.ones((CHUNK, CHUNK), np.uint8)
    t0 = time.perf_counter()
    i = 0
    # Shard by shard, as a run's units are (in 0.4 a shard is a chunk).
    for shard in grid_boxes(store.image_shape, store.shard_shape):
        sink = ShardBuffer(store, shard) if store.sharded else store
        for box in grid_boxes(store.image_shape, store.chunk_shape, within=shard):
            sink.write_chunk(box, chunks[i % len(chunks)][:, : box.h, : box.w])
            sink.write_label_chunk(TISSUE, box, ones[: box.h, : box.w])
            i += 1
        if store.sharded:
            sink.flush()
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.finalize()
    finalize_s = time.perf_counter() - t0
    files = [f for f in path.rglob("*") if f.is_file()]
    data = [f for f in files if f.name.isdigit()]
    return {
        "format": fmt,
        "size": size,
        "files": len(files),
        "data_files": len(data),
        "mb": sum(f.stat().st_size for f in files) / 1e6,
        "write_s": write_s,
        "finalize_s": finalize_s,
        "rss_before_mb": rss0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def count(size: int) -> dict[str, int]:
    """Chunk (0.4) or shard (0.5) files of an all-tissue output of ``size``²: the image, mask and
    tissue label at every pyramid level (each level chunked and sharded like level 0, clipped)."""
    from tilesegment.store import pyramid_shapes

    result = {}
    for fmt in FORMATS:
        total = 0
        for h, w in pyramid_shapes((size, size)):
            cy, cx = min(CHUNK, h), min(CHUNK, w)
            if fmt == "ngff-0.4":
                sy, sx = cy, cx
            else:
                sy = cy * min(math.ceil(SHARD / cy), math.ceil(h / cy))
                sx = cx * min(math.ceil(SHARD / cx), math.ceil(w / cx))
            total += 3 * math.ceil(h / sy) * math.ceil(w / sx)
        result[fmt] = total
    return result


def _run(slide: Path, fmt: str) -> dict:
    """``tilesegment run`` of ``slide`` in ``fmt`` in a child process; what its report says."""
    out = WORK / f"run-{fmt}.zarr"
    cmd = [sys.executable, "-m", "tilesegment", "run", str(slide), "-o", str(out), "--format"]
    cmd += [fmt, "--tissue", "none", "--no-preview", "--no-progress", "--overwrite"]
    subprocess.run(cmd, check=True, capture_output=True)
    report = json.loads(out.with_name(f"run-{fmt}.report.json").read_text())
    return {
        "format": fmt,
        "files": sum(1 for f in out.rglob("*") if f.is_file()),
        "stream_s": report["seconds"]["stream"],
        "total_s": report["seconds"]["total"],
        "peak_rss_mb": report["peak_rss_mb"]["main"],
    }


def _equal_outputs(a: Path, b: Path) -> bool:
    import numpy as np
    import zarr

    def arrays(path: Path) -> dict:
        members = zarr.open_group(path, mode="r").members(max_depth=None)
        return {k: v for k, v in members if isinstance(v, zarr.Array)}

    x, y = arrays(a), arrays(b)
    return sorted(x) == sorted(y) and all(np.array_equal(x[k][:], y[k][:]) for k in x)


def run(size: int, repeats: int) -> None:
    from tilesegment.testing.synthetic import write_slide

    WORK.mkdir(parents=True, exist_ok=True)
    slide = WORK / f"synthetic-{size}.tif"
    if not slide.exists():
        write_slide(slide, (size, size), tissue_fraction=0.6, mpp=0.25)
    results: dict[str, list[dict]] = {f: [] for f in FORMATS}
    for _ in range(repeats):
        for fmt in FORMATS:
            results[fmt].append(_run(slide, fmt))
            print(json.dumps(results[fmt][-1]), flush=True)
    same = _equal_outputs(WORK / "run-ngff-0.4.zarr", WORK / "run-ngff-0.5.zarr")
    print(f"\n`tilesegment run` of a {size}² slide, --tissue none, medians of {repeats}:")
    print("format    files  stream s  total s  peak RSS MB")
    for fmt, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "format"}
        print(
            f"{fmt}  {med['files']:6.0f}  {med['stream_s']:8.1f}  {med['total_s']:7.1f}  "
            f"{med['peak_rss_mb']:11.0f}"
        )
    print(f"every array equal: {same}")


def _child(fmt: str, size: int, path: Path) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from bench_formats import _write; from pathlib import Path;"
        "print(json.dumps(_write(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), str(path), fmt, str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write")
    w.add_argument("--size", type=int, default=20000)
    w.add_argument("--repeats", type=int, default=3)
    c = sub.add_parser("count")
    c.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    r = sub.add_parser("run")
    r.add_argument("--size", type=int, default=8192)
    r.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "run":
        run(args.size, args.repeats)
        return
    if args.mode == "count":
        for size in args.sizes:
            print(json.dumps({"size": size, "data_files": count(size)}))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    _chunks()  # computed once, before the children time anything
    runs: dict[str, list[dict]] = {f: [] for f in FORMATS}
    for _ in range(args.repeats):
        for fmt in FORMATS:
            path = WORK / f"{fmt}.zarr"
            result = _child(fmt, args.size, path)
            shutil.rmtree(path)
            print(json.dumps(result), flush=True)
            runs[fmt].append(result)
    print(f"\n{args.size}² px, 2 classes + mask + tissue, medians of {args.repeats}:")
    print("format    files  data files  MB      write s  finalize s  peak RSS MB (before)")
    for fmt, rs in runs.items():

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"{fmt}  {med('files'):6.0f}  {med('data_files'):10.0f}  {med('mb'):6.0f}  "
            f"{med('write_s'):7.1f}  {med('finalize_s'):10.1f}  "
            f"{med('peak_rss_mb'):7.0f} ({med('rss_before_mb'):.0f})"
        )
    print(f"computed data files: {count(args.size)}")


if __name__ == "__main__":
    main()
