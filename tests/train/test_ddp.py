"""DistributedDataParallel: 2 torchrun processes on CPU (gloo) train the same weights as one
process with the same global batch and data order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import data_path
from tilesegment.model.checkpoint import load_spec, new_model
from tilesegment.train.config import TrainConfig
from tilesegment.train.loop import run_training

OPTIONS = {
    "label_kind": "binary",
    "depth": 2,
    "base_channels": 4,
    "tile_size": 92,
    "batch_size": 4,
    "epochs": 2,
    "steps_per_epoch": 3,
    "val_fraction": 0.0,
    "seed": 3,
}


def cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    images = data_path("isbi2012", "train-volume.tif")
    labels = data_path("isbi2012", "train-labels.tif")
    single = run_training(
        TrainConfig(images=images, labels=labels, run_dir=tmp_path / "one", **OPTIONS)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tilesegment",
        "train",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "-o",
        str(tmp_path / "two"),
        "--no-progress",
        *cli_args(OPTIONS),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 epochs (6 steps)") == 1  # only rank 0 reports
    one = load_file(str(tmp_path / "one" / "last.safetensors"))
    two = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    # the weights did move, so this compares two trained models, not two initialisations
    spec = load_spec(tmp_path / "two" / "last")
    start = new_model(spec, seed=OPTIONS["seed"]).state_dict()
    assert max(float((start[k] - one[k]).abs().max()) for k in one) > 1e-3
    doc = json.loads((tmp_path / "two" / "state.json").read_text())
    assert doc["global_step"] == 6 and spec.training["world_size"] == 2
    losses_two = [row["train_loss"] for row in doc["history"]]
    losses_one = [row["train_loss"] for row in single.history]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
