"""Test-time augmentation (issue 11, item 4): what ``--tta`` gains in AJI and what it costs, with
``tilesegment evaluate`` on held-out images.

    python benchmarks/bench_tta.py --repeats 3
    python benchmarks/bench_tta.py --model nuclei-he --modes none flips d4 --repeats 3 \\
        --images ../shared/data/monuseg/images --labels ../shared/data/monuseg/labels \\
        --list benchmarks/lists/monuseg-held-out.txt

Each repeat runs ``tilesegment evaluate --json`` once per mode, in a fresh child process, the
modes one after the other (so the ratios of one repeat share the machine's load of that
moment). Reported: the scores of each mode (deterministic: the same in every repeat, checked),
and per mode the median over repeats of the child's wall time and CPU time (user + system)
and of its ratio to the ``none`` child of the same repeat. The child's time includes starting
Python, loading the model and the labels, and scoring, which TTA does not multiply, so the
ratio is below the number of forward passes; a least-squares line through the median CPU
seconds against the number of forward passes (1, 4, 8) splits them into what does not grow
with TTA and what one pass over the images costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILESEGMENT_DATA", ROOT.parent / "shared" / "data"))
PASSES = {"none": 1, "flips": 4, "d4": 8}


def command(args: argparse.Namespace, mode: str) -> list[str]:
    return [
        "tilesegment",
        "evaluate",
        "--model",
        args.model,
        "--images",
        str(args.images),
        "--labels",
        str(args.labels),
        "--list",
        str(args.list),
        "--precision",
        "fp32",
        "--tta",
        mode,
        "--json",
    ]


def run_child(cmd: list[str]) -> tuple[dict, float, float]:
    """(JSON document, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout), wall, cpu


def scores(doc: dict) -> dict[str, float]:
    """Mean over images of the headline scores, plus AJI aggregated over the images (MoNuSeg)."""
    mean, agg = doc["mean"], doc["aggregate"]
    return {
        "aji": mean["aji"],
        "aji_aggregated": agg["aji"],
        "aji_plus": mean["aji_plus"],
        "pq": mean["pq"],
        "dice": mean["foreground_dice"],
        "object_f1": mean["object_f1"],
        "per_image_aji": {r["name"]: round(r["aji"], 4) for r in doc["images"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nuclei-he")
    parser.add_argument("--images", type=Path, default=DATA / "monuseg" / "images")
    parser.add_argument("--labels", type=Path, default=DATA / "monuseg" / "labels")
    parser.add_argument(
        "--list", type=Path, default=ROOT / "benchmarks" / "lists" / "monuseg-held-out.txt"
    )
    parser.add_argument("--modes", nargs="+", default=["none", "flips", "d4"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.modes[0] != "none":
        parser.error("--modes must start with none (the reference of the ratios)")
    found: dict[str, dict] = {}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:
            doc, wall, cpu = run_child(command(args, mode))
            got = scores(doc)
            if found.setdefault(mode, got) != got:
                sys.exit(f"--tta {mode}: scores differ between repeats: {found[mode]} vs {got}")
            times[mode].append((wall, cpu))
            print(f"repeat {repeat} {mode}: wall {wall:.1f} s, cpu {cpu:.1f} s", file=sys.stderr)
    result = {"commands": {m: " ".join(command(args, m)) for m in args.modes}, "modes": {}}
    for mode in args.modes:
        walls = [w for w, _ in times[mode]]
        cpus = [c for _, c in times[mode]]
        ratios_wall = [w / r for (w, _), (r, _) in zip(times[mode], times["none"], strict=True)]
        ratios_cpu = [c / r for (_, c), (_, r) in zip(times[mode], times["none"], strict=True)]
        s = found[mode]
        result["modes"][mode] = {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()},
            "aji_gain": round(s["aji"] - found["none"]["aji"], 4),
            "aji_aggregated_gain": round(s["aji_aggregated"] - found["none"]["aji_aggregated"], 4),
            "wall_s_median": round(statistics.median(walls), 1),
            "cpu_s_median": round(statistics.median(cpus), 1),
            "wall_ratio_median": round(statistics.median(ratios_wall), 2),
            "cpu_ratio_median": round(statistics.median(ratios_cpu), 2),
            "repeats": len(walls),
        }
    if len(args.modes) > 1:
        result["cpu_s_fit"] = fit(
            [PASSES[m] for m in args.modes],
            [result["modes"][m]["cpu_s_median"] for m in args.modes],
        )
    print(json.dumps(result, indent=2))


def fit(passes: list[int], seconds: list[float]) -> dict[str, float]:
    """``seconds = fixed + per_pass * passes`` by least squares."""
    slope, intercept = statistics.linear_regression(passes, seconds)
    return {"fixed_s": round(intercept, 1), "per_pass_s": round(slope, 1)}


if __name__ == "__main__":
    main()
