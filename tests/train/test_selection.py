"""Which validation metric picks the best checkpoint: by label kind, or --select-metric."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import data_path
from tests.train.conftest import write_folder
from tilesegment.cli.train import SELECT_METRICS
from tilesegment.errors import ConfigError
from tilesegment.train.config import TrainConfig
from tilesegment.train.evaluate import SELECTABLE_METRICS, selection_metric
from tilesegment.train.loop import run_training


def test_default_selection_follows_the_label_kind():
    assert selection_metric("binary") == ("foreground_dice", False)
    assert selection_metric("classes") == ("mean_foreground_dice", False)
    assert selection_metric("instances") == ("aji", False)
    assert selection_metric("binary", "rand_error") == ("rand_error", True)
    assert selection_metric("binary", validation=False) == ("train_loss", True)


def test_select_metric_must_be_computed_for_the_kind():
    with pytest.raises(ConfigError, match=r"--select-metric aji is not computed for binary"):
        selection_metric("binary", "aji")
    with pytest.raises(ConfigError, match=r"--select-metric pq needs validation images"):
        selection_metric("instances", "pq", validation=False)


def test_cli_choices_are_the_selectable_metrics():
    known = {m for metrics in SELECTABLE_METRICS.values() for m in metrics}
    assert set(SELECT_METRICS) == known


def test_select_metric_is_recorded_and_frozen_on_resume(tmp_path):
    images, labels = write_folder(tmp_path / "data", 4, kind="binary")
    options = dict(
        images=images,
        labels=labels,
        run_dir=tmp_path / "run",
        label_kind="binary",
        depth=2,
        base_channels=4,
        tile_size=60,
        batch_size=2,
        epochs=2,
        steps_per_epoch=2,
        val_fraction=0.25,
        select_metric="rand_error",
    )
    summary = run_training(TrainConfig(**options), stop_after_epoch=1)
    assert summary.best_metric == "rand_error"
    selection = json.loads((tmp_path / "run" / "last.json").read_text())["training"]["selection"]
    assert selection["metric"] == "rand_error" and selection["lower_is_better"] is True
    assert selection["chosen_by"] == "--select-metric" and selection["images"] == 1
    options.update(select_metric=None, resume=True)
    with pytest.raises(ConfigError, match=r"--select-metric 'rand_error' -> None"):
        run_training(TrainConfig(**options))


@pytest.mark.slow
def test_ph2_training_selects_by_validation_dice(tmp_path):
    """A tiny run on PH2 crops: the best checkpoint is the epoch of the highest mean
    validation Dice, and its provenance says so."""
    root = data_path("ph2", "PH2 Dataset images")
    (tmp_path / "train.txt").write_text("IMD006\nIMD016\nIMD017\nIMD019\n")
    (tmp_path / "val.txt").write_text("IMD020\nIMD022\n")
    cfg = TrainConfig(
        images=root,
        labels=root,
        run_dir=tmp_path / "ph2",
        train_list=tmp_path / "train.txt",
        val_list=tmp_path / "val.txt",
        depth=2,
        base_channels=4,
        tile_size=124,
        batch_size=2,
        epochs=4,
        steps_per_epoch=4,
        seed=1,
    )
    summary = run_training(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ph2" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    dice = {r["epoch"]: r["foreground_dice"] for r in rows if r["epoch"] > 0}
    assert all(math.isfinite(d) for d in dice.values())
    assert summary.best_metric == "foreground_dice"
    assert summary.best_epoch == max(dice, key=lambda e: (dice[e], -e))
    best = json.loads((tmp_path / "ph2" / "best.json").read_text())["training"]
    assert best["label_kind"] == "binary"
    assert best["data"]["validation"] == ["IMD020", "IMD022"]
    assert best["selection"] == {
        "metric": "foreground_dice",
        "lower_is_better": False,
        "chosen_by": "label kind",
        "split": "validation",
        "images": 2,
        "best_epoch": summary.best_epoch,
        "best_value": dice[summary.best_epoch],
    }
    assert best["epoch"] == summary.best_epoch
