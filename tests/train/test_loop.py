"""The training loop: optimizer state without pickle, resume, divergence, a real ISBI run."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import data_path
from tests.train.conftest import write_folder
from tilesegment.errors import ConfigError
from tilesegment.model.checkpoint import load_checkpoint, new_model
from tilesegment.train import loop, state
from tilesegment.train.config import TrainConfig, TrainingDiverged
from tilesegment.train.evaluate import evaluate_model
from tilesegment.train.loop import run_training


def tiny(tmp_path: Path, run: str = "run", **overrides) -> TrainConfig:
    root = tmp_path / "data"
    if not root.exists():
        write_folder(root, 4)
    options = {
        "images": root / "images",
        "labels": root / "labels",
        "run_dir": tmp_path / run,
        "label_kind": "instances",
        "depth": 2,
        "base_channels": 4,
        "tile_size": 60,
        "batch_size": 2,
        "epochs": 4,
        "steps_per_epoch": 3,
        "val_fraction": 0.25,
        "seed": 7,
    }
    options.update(overrides)
    return TrainConfig(**options)


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path.with_suffix(".safetensors")))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizer_state_round_trip_without_pickle(tmp_path, name):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 2, 1))
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.95)),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.99),
    }[name]
    opt = make(net.parameters())
    for _ in range(3):
        net(torch.randn(2, 1, 8, 8)).square().mean().backward()
        opt.step()
    tensors, doc = state.flatten_optimizer_state(opt.state_dict())
    save_file(tensors, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(doc))
    fresh = make(net.parameters())
    restored = state.unflatten_optimizer_state(
        load_file(str(tmp_path / "s.safetensors")),
        json.loads((tmp_path / "s.json").read_text()),
        fresh.state_dict(),
    )
    fresh.load_state_dict(restored)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, entry in a["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(b["state"][pid][key], value, rtol=0, atol=0)


def test_learning_rate_schedules():
    assert loop.learning_rate(5, 10, 0.1, "constant") == 0.1
    cosine = [loop.learning_rate(s, 10, 1.0, "cosine") for s in range(11)]
    assert cosine[0] == 1.0 and all(a > b for a, b in itertools.pairwise(cosine))
    assert cosine[-1] == pytest.approx(0.01)
    assert loop.learning_rate(4, 10, 1.0, "step") == 1.0
    assert loop.learning_rate(8, 10, 1.0, "step") == pytest.approx(0.01)


def test_resume_continues_the_curve(tmp_path):
    """2 epochs + 2 resumed epochs give the same weights and losses as 4 straight epochs
    (with dropout, so the RNG is covered too)."""
    straight = run_training(tiny(tmp_path, "straight", dropout=0.2))
    first = run_training(tiny(tmp_path, "resumed", dropout=0.2), stop_after_epoch=2)
    assert first.epochs_run == 2 and first.global_step == 6
    resumed = run_training(tiny(tmp_path, "resumed", dropout=0.2, resume=True))
    assert resumed.epochs_run == 4 and resumed.global_step == 12
    a = weights_of(tmp_path / "straight" / "last")
    b = weights_of(tmp_path / "resumed" / "last")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0)
    losses = [[r["train_loss"] for r in s.history] for s in (straight, resumed)]
    assert losses[0] == losses[1] and None not in losses[0][1:]
    with (tmp_path / "resumed" / "log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [int(r["step"]) for r in rows] == [0, 3, 6, 9, 12]
    jsonl = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in jsonl] == [0, 1, 2, 3, 4]
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert state["epoch"] == 4 and state["global_step"] == 12
    assert (tmp_path / "resumed" / "curves.png").stat().st_size > 1000


def test_resume_refuses_changed_options_and_missing_state(tmp_path):
    run_training(tiny(tmp_path, epochs=1, steps_per_epoch=1), stop_after_epoch=1)
    with pytest.raises(ConfigError, match=r"--resume: options differ .*--tile-size 60 -> 64"):
        run_training(tiny(tmp_path, epochs=2, tile_size=64, resume=True))
    with pytest.raises(ConfigError, match="no resumable run"):
        run_training(tiny(tmp_path, "empty", resume=True))
    with pytest.raises(ConfigError, match="already holds a training run"):
        run_training(tiny(tmp_path, epochs=1))


def test_nan_loss_stops_with_a_message(tmp_path, monkeypatch):
    real = loop.F.cross_entropy
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * math.nan if len(calls) == 5 else out

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 5 .* lower --lr"):
        run_training(tiny(tmp_path, val_fraction=0))
    # the last good checkpoint (epoch 1) is intact and loadable
    _, spec = load_checkpoint(tmp_path / "run" / "last")
    assert spec.training["epoch"] == 1


@pytest.mark.slow
def test_isbi_training_reduces_loss_and_rand_error(tmp_path):
    """A short real run on ISBI 2012: the training loss falls clearly and the validation Rand
    error ends far below the untrained model's (same seed); the best checkpoint is a normal
    model that `evaluate` scores the same way."""
    cfg = TrainConfig(
        images=data_path("isbi2012", "train-volume.tif"),
        labels=data_path("isbi2012", "train-labels.tif"),
        run_dir=tmp_path / "isbi",
        label_kind="binary",
        class_names=("membrane", "cell"),
        depth=3,
        base_channels=8,
        tile_size=188,
        batch_size=2,
        epochs=8,
        steps_per_epoch=60,
        val_fraction=0.12,
        seed=0,
        select_metric="rand_error",
    )
    summary = run_training(cfg)
    history = summary.history
    untrained, first, last = history[0], history[1], history[-1]
    assert untrained["epoch"] == 0 and untrained["train_loss"] is None
    assert last["train_loss"] < 0.85 * first["train_loss"]
    assert last["val_loss"] < 0.75 * untrained["val_loss"]
    best = summary.best_row
    assert best["rand_error"] < untrained["rand_error"] - 0.3
    assert best["pixel_error"] < untrained["pixel_error"]

    # The untrained reference really is new_model(spec, seed) of the same architecture.
    net, spec = load_checkpoint(summary.best_path)
    fresh = new_model(dataclasses.replace(spec), seed=cfg.seed)
    assert not torch.equal(fresh.head.weight, net.head.weight)
    assert spec.class_names == ("membrane", "cell") and spec.channel_order == "L"
    assert spec.training["label_kind"] == "binary"
    val_names = spec.training["data"]["validation"]
    assert len(val_names) == 3
    report, _ = evaluate_model(
        summary.best_path, cfg.images, cfg.labels, names=val_names, label_kind="binary"
    )
    assert report.mean["rand_error"] == pytest.approx(best["rand_error"], abs=1e-9)
    assert np.isfinite(report.loss)


def test_dataloader_workers_do_not_change_the_run(tmp_path):
    """Samples depend on (seed, epoch, index) only: worker processes give the same weights."""
    run_training(tiny(tmp_path, "w0", epochs=1, val_fraction=0))
    run_training(tiny(tmp_path, "w2", epochs=1, val_fraction=0, workers=2))
    a = weights_of(tmp_path / "w0" / "last")
    b = weights_of(tmp_path / "w2" / "last")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0)


def test_resume_of_a_run_older_than_the_augmentation_options(tmp_path, caplog):
    """A run saved before --blur-sigma etc. existed resumes (with a warning); a changed
    augmentation range is refused like any frozen option."""
    cfg = TrainConfig(images=tmp_path, labels=tmp_path, run_dir=tmp_path / "run")
    saved = cfg.to_json()
    del saved["blur_sigma"], saved["scale_jitter"]
    state.check_resume_config(cfg, saved)
    assert "predates --blur-sigma" in caplog.text and "predates --scale-jitter" in caplog.text
    with pytest.raises(ConfigError, match=r"--hed-scale 0.1 -> 0.3"):
        state.check_resume_config(dataclasses.replace(cfg, hed_scale=0.3), cfg.to_json())
