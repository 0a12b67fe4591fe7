"""`tilesegment train` and `evaluate` on the dataset layouts of the U-Net tutorials: a short real
training run on PH2 as distributed, evaluation from a list of image<TAB>label pairs, and
one-line errors for partial layouts."""

from __future__ import annotations

import json
import logging

import numpy as np
from click.testing import CliRunner
from PIL import Image

from tests.conftest import data_path
from tilesegment.cli import main

TINY = ["--depth", "2", "--base-channels", "4", "--tile-size", "60", "--batch-size", "2"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_on_ph2_as_distributed_then_evaluate_from_a_pair_list(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = data_path("ph2", "PH2 Dataset images")
    out = tmp_path / "ph2"
    result = invoke(
        "train", "--images", root, "-o", out, *TINY,
        "--epochs", "2", "--steps-per-epoch", "2", "--val-fraction", "0.05", "--no-progress",
        "--class-names", "background,lesion",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "matched 40 pair(s) (one tree)" in caplog.text
    assert "labels normalised: 40 x 1-bit" in caplog.text
    assert "trained 2 epochs (4 steps)" in result.output
    training = json.loads((out / "last.json").read_text())["training"]
    assert training["label_kind"] == "binary"
    names = training["data"]["train"] + training["data"]["validation"]
    assert sorted(names) == sorted(d.name for d in root.iterdir())
    assert len(training["data"]["validation"]) == 2
    assert training["data"]["images"] == "ph2/PH2 Dataset images"

    held = training["data"]["validation"]
    listed = tmp_path / "test.txt"
    listed.write_text(
        "".join(
            f"{root / n / f'{n}_Dermoscopic_Image' / f'{n}.bmp'}\t"
            f"{root / n / f'{n}_lesion' / f'{n}_lesion.bmp'}\n"
            for n in held
        )
    )
    doc = invoke("evaluate", "--model", out / "last", "--list", listed, "--json")
    assert doc.exit_code == 0, doc.output
    report = json.loads(doc.output)
    assert [row["name"] for row in report["images"]] == sorted(held)
    assert report["kind"] == "binary"


def test_partial_layout_is_a_one_line_error(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / f"{name}.png")
    Image.fromarray(np.eye(32, dtype=np.uint8) * 255).save(tmp_path / "a_mask.png")
    result = invoke("train", "--images", tmp_path, "-o", tmp_path / "run", *TINY)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: 1 of 2 images in "), result.output
    assert "have no label (b.png)" in lines[0]
    missing = invoke("evaluate", "--model", "nuclei-he")
    assert missing.exit_code == 2
    assert "give --images (and --labels), or a --list of image<TAB>label pairs" in missing.output
