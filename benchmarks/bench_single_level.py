"""Peak RSS of the default ``tilesegment run`` on single-level (no pyramid) tiled TIFFs (issue 14,
item 6): the tissue thumbnail must not read the slide in full-width bands.

    python benchmarks/bench_single_level.py --sizes 20000 60000
    python benchmarks/bench_single_level.py --sizes 20000 --python OLD/.venv/bin/python  # before

Slides: ``tilesegment.testing.synthetic.write_glass_slide`` — a single-level 512 px tiled JPEG
TIFF at 0.25 µm/px, glass with one H&E-like patch of tissue (an ellipse in a 3000 x 4000 px box
at a third of the height, half the width), written tile by tile from pre-compressed bytes.

Each run is the default command in a fresh child, ``python -m tilesegment run SLIDE -o OUT
--no-progress`` (tissue auto, preview, the shipped model, in-process), and its peak RSS is the
child's ``ru_maxrss`` from ``wait4``, which covers everything the process did (thumbnail,
model, tiles, pyramid, preview). ``--python`` runs the child with another environment's
interpreter (one with an older checkout installed) to measure the code before a change; each
result names the package directory the child imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "single_level"


def slide(size: int) -> Path:
    from tilesegment.testing.synthetic import write_glass_slide

    path = WORK / f"glass-{size}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        box = (size // 3, size // 2, 3000, 4000)
        write_glass_slide(path, (size, size), tissue_box=box, mpp=0.25)
        print(f"wrote {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def run_child(path: Path, python: str) -> dict:
    out = WORK / f"{path.stem}.zarr"
    probe = subprocess.run(
        [python, "-c", "import os, tilesegment; print(os.path.dirname(tilesegment.__file__))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=WORK,  # not the checkout: ``python -m`` puts the working directory first on sys.path
    )
    cmd = [python, "-m", "tilesegment", "run", str(path), "-o", str(out)]
    cmd += ["--no-progress", "--overwrite"]
    log = out.with_suffix(".stderr.txt")
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stderr=err, cwd=WORK)
        # wait4 reaps the child itself and returns its own rusage (ru_maxrss: its peak RSS).
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    row = {
        "slide_px": int(path.stem.split("-")[1]),
        "package": probe.stdout.strip(),
        "exit": code,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }
    report = out / "tilesegment-report.json"
    if code == 0 and report.exists():
        doc = json.loads(report.read_text())
        row.update(
            tiles=doc["tiles"]["total"],
            computed=doc["tiles"]["processed"],
            stream_s=doc["seconds"]["stream"],
            report_peak_rss_mb=doc["peak_rss_mb"]["main"],
        )
    else:
        row["stderr_tail"] = log.read_text().strip().splitlines()[-3:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 60000])
    ap.add_argument("--python", default=sys.executable, help="interpreter of the child runs")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        row = run_child(slide(size), args.python)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(json.dumps({"benchmark": "single_level", "machine": machine, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
