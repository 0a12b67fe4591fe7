"""Check that this tree writes the same outputs as an older commit, byte for byte.

Builds the old commit's source with ``git archive`` into a work folder, writes one seeded
random checkpoint (``model init --seed 0``, with the old code; its mask is all background) and
takes the shipped ``nuclei-he`` (trained, fixed weights; it finds nuclei, so the GeoJSON and
table have rows, and its 0.25 um/px make the run resample the slide). It then runs
``tilesegment run ... --geojson`` with each model on CMU-1-Small-Region at fp32 with both
trees, each in its own subprocess (``PYTHONPATH`` selects the tree), in four configurations:
in-process with tiles of 572 and 1084 px, ``--workers 2`` and ``--dask-workers 2``. It then
compares every array of both stores (each pyramid level of the probabilities and of every
label: dtype, shape and values), the GeoJSON files and the instance tables (bytes). Exit code
0 when all are equal, 1 otherwise, 2 when the slide is missing.

    python benchmarks/check_identity.py                    # against 2007103 (before the redesign)
    python benchmarks/check_identity.py --old REV --work /tmp/identity --only inproc-572 \
        --model seeded

Old outputs are kept in the work folder and reused by later calls (delete it to rebuild them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parent.parent
SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
CONFIGS = {
    "inproc-572": ["--tile-size", "572"],
    "inproc-1084": ["--tile-size", "1084"],
    "workers-2": ["--tile-size", "572", "--workers", "2"],
    "dask-2": ["--tile-size", "572", "--dask-workers", "2"],
}


def tilesegment(src: Path, *args: str) -> None:
    """Run ``python -m tilesegment ARGS`` with the package taken from ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([sys.executable, "-m", "tilesegment", *args], env=env, check=True, cwd=src)


def old_source(rev: str, work: Path) -> Path:
    src = work / f"src-{rev}"
    if not (src / "tilesegment").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def segment(src: Path, model: str, out: Path, extra: list[str]) -> float:
    """One run with the tree ``src`` into ``out/OUT.zarr`` (+ GeoJSON and table); seconds."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tilesegment(
        src,
        "run",
        str(SLIDE),
        "-o",
        str(out / "OUT.zarr"),
        "--model",
        model,
        "--precision",
        "fp32",
        "--no-preview",
        "--no-progress",
        "--overwrite",
        "--geojson",
        str(out / "OUT.geojson"),
        *extra,
    )
    return time.perf_counter() - t0


def arrays(path: Path) -> dict[str, zarr.Array]:
    """Every array of a store, by its path inside it."""
    found: dict[str, zarr.Array] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old outputs hold foreign files zarr warns about
        root = zarr.open_group(str(path), mode="r", zarr_format=2)
        for name, node in root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                found[name] = node
    return found


def compare(old: Path, new: Path) -> list[str]:
    """Differences between two run folders (empty when identical)."""
    diffs: list[str] = []
    a, b = arrays(old / "OUT.zarr"), arrays(new / "OUT.zarr")
    if sorted(a) != sorted(b):
        diffs.append(f"arrays differ: {sorted(a)} vs {sorted(b)}")
    for name in sorted(set(a) & set(b)):
        x, y = a[name][...], b[name][...]
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            diffs.append(f"array {name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}, differ")
    for name in ("OUT.geojson", "OUT.nuclei.csv"):
        if (old / name).read_bytes() != (new / name).read_bytes():
            diffs.append(f"{name} differs")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="2007103", help="commit to compare with")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="configs")
    parser.add_argument("--model", action="append", choices=["seeded", "nuclei-he"])
    parser.add_argument("--old-only", action="store_true", help="only build the old outputs")
    args = parser.parse_args()
    if not SLIDE.is_file():
        print(f"{SLIDE} is missing; it is in ../shared/data (see its README)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="ts-identity-"))
    work.mkdir(parents=True, exist_ok=True)
    src = old_source(args.old, work)
    seeded = work / "model" / "seeded"
    if not seeded.with_suffix(".json").is_file():
        tilesegment(src, "model", "init", str(seeded), "--base-channels", "8", "--seed", "0")
    models = {"seeded": str(seeded), "nuclei-he": "nuclei-he"}
    failed = 0
    for model in args.model or sorted(models):
        for config in args.only or sorted(CONFIGS):
            name = f"{model}/{config}"
            old_dir, new_dir = work / args.old / name, work / "new" / name
            if not (old_dir / "OUT.nuclei.csv").is_file():
                shutil.rmtree(old_dir, ignore_errors=True)
                seconds = segment(src, models[model], old_dir, CONFIGS[config])
                print(f"{name}: old run took {seconds:.1f} s")
            if args.old_only:
                continue
            seconds = segment(REPO, models[model], new_dir, CONFIGS[config])
            print(f"{name}: new run took {seconds:.1f} s")
            diffs = compare(old_dir, new_dir)
            n = len(arrays(new_dir / "OUT.zarr"))
            features = len(json.loads((new_dir / "OUT.geojson").read_text())["features"])
            status = "IDENTICAL" if not diffs else "DIFFERENT: " + "; ".join(diffs)
            print(f"{name}: {n} arrays, {features} GeoJSON features: {status}")
            failed += bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
