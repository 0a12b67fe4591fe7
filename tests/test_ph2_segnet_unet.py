"""``benchmarks/ph2_segnet_unet.py --smoke``: the SegNet-vs-U-Net comparison runs end to end on
real PH2 cases (tiny networks, two steps), so the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import DATA, ROOT, data_path

SCRIPT = ROOT / "benchmarks" / "ph2_segnet_unet.py"


def test_smoke_run_trains_both_models_and_scores_them_side_by_side(tmp_path):
    data_path("ph2", "PH2 Dataset images")
    env = {**os.environ, "TILESEGMENT_DATA": str(DATA)}
    command = [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    segnet, unet = result["segnet"], result["unet"]
    # Same budget: the same steps of the same batch, both timed.
    assert segnet["steps"] == unet["steps"] == 2 and result["batch_size"] == 1
    for arm in (segnet, unet):
        assert 0 < arm["step_seconds"] <= arm["loop_seconds"]
        assert math.isfinite(arm["last_epoch_loss"]) and arm["parameters"] > 0
        scores = arm["scores"]
        # Scored on the first held-out case of the split, on its own full grid.
        assert [row["name"] for row in scores["images"]] == ["IMD019"]
        assert len(scores["inference_seconds"]) == 1
        for how in ("mean", "pooled"):
            dice, iou = scores[how]["foreground_dice"], scores[how]["foreground_iou"]
            assert 0 <= iou <= dice <= 1  # Dice = 2 IoU / (1 + IoU) >= IoU
            assert math.isclose(dice, 2 * iou / (1 + iou), rel_tol=1e-9)
    assert (tmp_path / "unet" / "last.safetensors").is_file()
    assert (tmp_path / "segnet.safetensors").is_file()
    assert result["train_cases"] == ["IMD006", "IMD016"]  # the split's first two, not others
    table = proc.stdout
    assert "| | SegNet (same padding, BN, pooling indices) | U-Net (valid, tilesegment) |" in table
    assert "| optimizer steps x batch | 2 x 1 | 2 x 1 |" in table
    assert "| IMD019 |" in table
    assert (tmp_path / "results.md").read_text().count("| Dice, pooled |") == 1


def test_steps_must_fill_whole_epochs(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("ph2_segnet_unet", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ph2_segnet_unet", script)  # for its dataclasses
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--smoke", "--steps", "3", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        "--steps (3) must be a positive multiple of --steps-per-epoch (2)"
        in capsys.readouterr().err
    )
