"""``benchmarks/gpu_check.py --dry-run``: the GPU check's code paths, on the CPU, in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import DATA, ROOT, data_path


def test_gpu_check_dry_run_writes_json_and_markdown_and_passes(tmp_path):
    data_path("slides", "CMU-1-Small-Region.svs")
    env = {**os.environ, "TILESEGMENT_DATA": str(DATA)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "dry-run" and doc["passed"] is True
    assert set(doc) >= {"machine", "sizes", "checks", "speed", "seconds"}
    checks = doc["checks"]
    # What a CPU can check really ran and passed, with its measured numbers.
    for name in ("tile_invariance_fp32", "autocast_bf16", "oom_halving"):
        assert checks[name]["status"] == "passed", (name, checks[name])
        assert checks[name]["max_abs_diff"] <= checks[name]["tolerance"]
    assert checks["tile_invariance_fp32"]["mask_agreement"] >= 0.999
    assert checks["oom_halving"]["halved_to"] < checks["oom_halving"]["batch"]
    assert "simulated" in checks["oom_halving"]["how"]
    # What needs CUDA is skipped with a reason, never reported as passed.
    for name in ("device_vs_cpu_fp32", "autocast_fp16"):
        assert checks[name]["status"] == "skipped" and "CUDA" in checks[name]["reason"]
    speed = doc["speed"]
    assert all(r["mpx_per_s"] > 0 for r in speed["forward"] if "skipped" not in r)
    assert {r["channels_last"] for r in speed["forward"]} == {True, False}
    (run,) = speed["end_to_end"]
    assert run["status"] == "ok" and run["devices"] == "cpu" and run["mpx"] > 0
    assert run["mpx_per_s"] > 0
    rates = speed["bottleneck"]["rates"]
    assert set(rates) == {"decode (2 threads)", "forward", "write"}
    assert speed["bottleneck"]["stage"] == min(rates, key=rates.get)
    assert speed["stages"]["host_to_device"]["status"] == "skipped"
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Correctness", "## Bare forward", "## Stages alone", "## End to end"):
        assert heading in md
    assert "| tile_invariance_fp32 | passed |" in md
    assert f"Bottleneck: **{speed['bottleneck']['stage']}**" in md
