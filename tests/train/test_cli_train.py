"""`tilesegment train` / `evaluate` on the command line: bad inputs are one-line errors (exit 2),
divergence is a runtime failure (exit 1), a trained run is usable by `evaluate` and `run`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from tests.conftest import data_path
from tests.train.conftest import write_folder
from tilesegment.cli import main

TINY = ["--depth", "2", "--base-channels", "4", "--tile-size", "60", "--batch-size", "2"]
SHORT = ["--epochs", "1", "--steps-per-epoch", "2", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def train_args(images, labels, out, *extra):
    return ["train", "--images", images, "--labels", labels, "-o", out, *TINY, *SHORT, *extra]


def assert_input_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert pattern in lines[0], lines[0]


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data", 4)


def test_image_label_shape_mismatch(tmp_path, folder):
    images, labels = folder
    tifffile.imwrite(labels / "img2.tif", np.zeros((64, 50), np.uint16))
    result = invoke(*train_args(images, labels, tmp_path / "run"))
    assert_input_error(result, "img2.png: image is 64 x 64 px but its label img2.tif is 64 x 50")


def test_unexpected_label_values(tmp_path):
    images, labels = write_folder(tmp_path / "data", 3, kind="binary")
    label = tifffile.imread(labels / "img1.tif")
    label[0, :3] = 7
    tifffile.imwrite(labels / "img1.tif", label)
    result = invoke(*train_args(images, labels, tmp_path / "run", "--label-kind", "binary"))
    assert_input_error(result, "img1.tif: --label-kind binary expects values 0/1 or 0/255")
    assert "found [0, 7, 255]" in result.output


def test_empty_folders(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    result = invoke(*train_args(tmp_path / "i", tmp_path / "l", tmp_path / "run"))
    assert_input_error(result, "no image files (.bmp, .gif, .jpg, .png, .tif, ...) in the folder")


def test_label_without_foreground_is_skipped_or_refused(tmp_path, folder, caplog):
    images, labels = folder
    tifffile.imwrite(labels / "img3.tif", np.zeros((64, 64), np.uint16))
    caplog.set_level(logging.WARNING)
    result = invoke(*train_args(images, labels, tmp_path / "run", "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    assert "img3.tif: label has no foreground; skipped for training" in caplog.text
    for i in range(3):
        tifffile.imwrite(labels / f"img{i}.tif", np.zeros((64, 64), np.uint16))
    result = invoke(*train_args(images, labels, tmp_path / "run2", "--label-kind", "instances"))
    assert_input_error(result, "training label images has foreground; nothing to learn")


def test_tile_larger_than_images(tmp_path, folder):
    images, labels = folder
    result = invoke(*train_args(images, labels, tmp_path / "run"), "--tile-size", "120")
    assert_input_error(result, "--tile-size 120 px needs images of at least 80 x 80 px")
    assert "use --tile-size 104 or less" in result.output


def test_invalid_tile_size(tmp_path, folder):
    images, labels = folder
    result = invoke(*train_args(images, labels, tmp_path / "run"), "--tile-size", "62")
    assert_input_error(result, "--tile-size 62 px is not valid for this U-Net")
    assert "nearest valid: 60 or 64" in result.output


def test_class_names_must_match_classes(tmp_path, folder):
    images, labels = folder
    result = invoke(
        *train_args(images, labels, tmp_path / "run"), "--class-names", "bg,nucleus,extra"
    )
    assert_input_error(result, "--class-names gives 3 names")
    assert "label kind detected as 'classes': pass --label-kind?" in result.output
    result = invoke(*train_args(images, labels, tmp_path / "run"), "--class-names", "bg,bg")
    assert result.exit_code == 2 and "two distinct" in result.output


def test_huge_learning_rate_stops_with_exit_1(tmp_path, folder):
    images, labels = folder
    args = train_args(images, labels, tmp_path / "run", "--val-fraction", "0")
    args += ["--optimizer", "sgd", "--lr", "1e9", "--grad-clip", "0", "--epochs", "3"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "training diverged: the loss is nan" in result.output
    assert "lower --lr" in result.output


def test_train_then_evaluate_and_run(tmp_path):
    images, labels = write_folder(tmp_path / "data", 4, rgb=True, shape=(80, 80))
    out = tmp_path / "run"
    result = invoke(
        *train_args(images, labels, out, "--class-names", "background,nucleus", "--mpp", "0.5"),
        "--label-kind",
        "instances",
    )
    assert result.exit_code == 0, result.output
    assert "best epoch 1: aji" in result.output
    assert f"best checkpoint: {out / 'best'}" in result.output
    spec = json.loads((out / "best.json").read_text())
    assert spec["input"]["channel_order"] == "RGB" and spec["mpp"] == 0.5
    assert spec["classes"]["names"] == ["background", "nucleus"]
    assert len(spec["input"]["mean"]) == 3

    table = invoke("evaluate", "--model", out / "best", "--images", images, "--labels", labels)
    assert table.exit_code == 0, table.output
    assert "instances labels (instances: components), 4 image(s)" in table.output
    assert "img3" in table.output and "mean" in table.output and "AJI" in table.output
    doc = json.loads(
        invoke(
            "evaluate", "--model", out / "best", "--images", images, "--labels", labels, "--json"
        ).output
    )
    assert [row["name"] for row in doc["images"]] == ["img0", "img1", "img2", "img3"]
    assert {"aji", "object_f1", "foreground_dice"} <= set(doc["mean"])

    ran = invoke("run", images / "img0.png", "-o", tmp_path / "img0.zarr", "--model", out / "best")
    assert ran.exit_code == 0, ran.output

    again = invoke(*train_args(images, labels, out))
    assert_input_error(again, "already holds a training run")


def test_checkpoints_name_their_data_not_this_machines_paths(tmp_path):
    images, labels = write_folder(tmp_path / "data", 2, rgb=True, shape=(80, 80))
    out = tmp_path / "run"
    result = invoke(*train_args(images, labels, out, "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    training = json.loads((out / "last.json").read_text())["training"]
    assert training["data"]["images"] == "data/images"
    assert training["config"]["labels"] == "data/labels"
    assert training["config"]["run_dir"] == "run"
    assert str(tmp_path) not in json.dumps(training)


def test_evaluate_resolves_a_shipped_model_name_like_run(tmp_path):
    """`evaluate --model nuclei-he` used to fail with 'model config not found'."""
    images, labels = data_path("tnbc", "images"), data_path("tnbc", "labels")
    names = tmp_path / "one.txt"
    names.write_text(sorted(p.stem for p in images.glob("*.png"))[0] + "\n")
    result = invoke(
        "evaluate", "--model", "nuclei-he", "--images", images, "--labels", labels,
        "--list", names, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["name"] == "nuclei-he" and len(doc["images"]) == 1
    assert doc["model"].endswith("nuclei-he")
    missing = invoke("evaluate", "--model", "no-such-model", "--images", images, "--labels", labels)
    assert missing.exit_code == 2 and "shipped: " in missing.output


def test_class_labels_with_gaps_warn_naming_the_values(tmp_path, caplog):
    """0/1/7 masks build an 8-class model; the unused classes 2-6 are named in a warning."""
    images, labels = write_folder(tmp_path / "data", 3, kind="binary")
    for path in sorted(labels.glob("*.tif")):
        label = (tifffile.imread(path) > 0).astype(np.uint8)
        label[:8, :8] = 7
        tifffile.imwrite(path, label)
    caplog.set_level(logging.WARNING)
    result = invoke(*train_args(images, labels, tmp_path / "run", "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    assert (
        "class labels hold the values 0, 1, 7: the model gets 8 classes, of which 2-6 never occur"
        in caplog.text
    )
    assert "remap the labels to 0..2" in caplog.text
    config = json.loads((tmp_path / "run" / "last.json").read_text())
    assert len(config["classes"]["names"]) == 8


def test_boundary_class_run_declares_seeded_instances_and_records_augmentation(tmp_path):
    """A --boundary-class model names its interior/boundary classes, so `run --geojson` grows
    seeds; the augmentation options are recorded in the checkpoint's provenance."""
    images, labels = write_folder(tmp_path / "data", 3, rgb=True, shape=(80, 80))
    out = tmp_path / "run"
    extra = ("--boundary-class", "--label-kind", "instances", "--scale-jitter", "0.2")
    extra += ("--hed-scale", "0.15", "--hed-shift", "0.02", "--blur-sigma", "0.5")
    result = invoke(*train_args(images, labels, out, *extra))
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "last.json").read_text())
    assert spec["classes"]["names"] == ["background", "foreground", "boundary"]
    assert spec["instances"] == {"interior": 1, "boundary": 2, "max_growth_px": 8, "min_seed_px": 4}
    config = spec["training"]["config"]
    assert (config["scale_jitter"], config["hed_scale"], config["hed_shift"]) == (0.2, 0.15, 0.02)
    assert (config["blur_sigma"], config["brightness"]) == (0.5, 0.1)

    output = tmp_path / "img0.zarr"
    ran = invoke(
        "run", images / "img0.png", "-o", output, "--model", out / "last",
        "--geojson", tmp_path / "img0.geojson",
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    attrs = json.loads((output / ".zattrs").read_text())["tilesegment"]
    assert attrs["instances"]["max_growth_px"] == 8

    bad = invoke(*train_args(images, labels, tmp_path / "r2", "--scale-jitter", "1.5"))
    assert bad.exit_code == 2 and "--scale-jitter" in bad.output
