"""A declared input scale for images without µm/px (issue 12): a model with ``downsample`` F is
trained on images shrunk by F (``train --downsample``), and ``run``, ``predict`` and
``evaluate`` shrink images alike and bring the outputs back to the image's own grid, where
they agree with each other and do not depend on the tile size.

The model is trained here, very briefly, on 4 real PH2 cases: the test is about scales and
grids, not accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from tests.conftest import data_path
from tilesegment.cli import main
from tilesegment.errors import ModelError
from tilesegment.model import ModelSpec, UNetConfig, load_spec

#: Training and validation cases (4 PH2 cases), and a case neither trained nor validated on.
TRAIN, VAL, OTHER = ("IMD006", "IMD016", "IMD017"), ("IMD019",), "IMD041"

#: Options every inference of the tests shares: the reference arithmetic, no bar.
FP32 = ("--precision", "fp32", "--no-progress")


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def ph2_image(case: str) -> Path:
    return data_path("ph2", "PH2 Dataset images", case, f"{case}_Dermoscopic_Image", f"{case}.bmp")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``train --downsample 2``: depth 2, 4 channels, 64 px crops, 2 steps (a few seconds);
    seed 1 gives a model that finds some lesion and some skin (seed 0: all lesion)."""
    root = data_path("ph2", "PH2 Dataset images")
    folder = tmp_path_factory.mktemp("downsample")
    (folder / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (folder / "val.txt").write_text("\n".join(VAL) + "\n")
    result = invoke(
        "train", "--images", root, "--train-list", folder / "train.txt",
        "--val-list", folder / "val.txt", "--label-kind", "binary",
        "--class-names", "background,lesion", "--depth", "2", "--base-channels", "4",
        "--tile-size", "64", "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "2",
        "--hed-scale", "0", "--hed-shift", "0", "--downsample", "2", "--seed", "1",
        "-o", folder / "run", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder / "run" / "last"


def test_the_checkpoint_records_the_downsample_and_round_trips(trained):
    doc = json.loads(trained.with_suffix(".json").read_text())
    assert doc["downsample"] == 2.0 and doc["mpp"] is None
    assert doc["training"]["config"]["downsample"] == 2.0
    spec = load_spec(trained)
    assert spec.downsample == 2.0
    again = ModelSpec.from_json(spec.to_json(), source=trained)
    assert again == spec and again.downsample == 2.0
    info = invoke("model", "info", trained, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["downsample"] == 2.0
    assert "images shrunk 2x" in invoke("model", "info", trained).output


def test_a_config_declares_downsample_or_mpp_never_both(tmp_path):
    unet = UNetConfig(depth=2, base_channels=4)
    base = ModelSpec.default(unet, name="m").to_json()
    source = tmp_path / "m.json"
    assert ModelSpec.from_json({**base, "downsample": 1}, source=source).downsample is None
    assert ModelSpec.from_json({**base, "downsample": 3}, source=source).downsample == 3.0
    with pytest.raises(ModelError, match="must be a number > 1"):
        ModelSpec.from_json({**base, "downsample": 0.5}, source=source)
    with pytest.raises(ModelError, match="declares both mpp"):
        ModelSpec.from_json({**base, "downsample": 2, "mpp": 0.5}, source=source)


def test_train_refuses_mpp_with_downsample(tmp_path):
    result = invoke(
        "train", "--images", tmp_path, "--mpp", "0.5", "--downsample", "2", "-o", tmp_path / "r"
    )
    assert result.exit_code == 2
    message = result.output.strip()
    assert "--mpp 0.5 and --downsample 2 exclude each other" in message
    assert len(message.splitlines()) == 1


def test_training_images_are_shrunk_with_runs_kernel():
    from tilesegment.io import open_slide
    from tilesegment.io.resample import ResampledReader
    from tilesegment.train.data import downsample_pairs, load_pairs

    root = data_path("ph2", "PH2 Dataset images")
    (pair,) = load_pairs(root, only={OTHER})
    (small,) = downsample_pairs([pair], 2.0, "binary")
    with open_slide(ph2_image(OTHER)) as reader:
        view = ResampledReader(reader, 0, source_mpp=1.0, target_mpp=2.0)
        seen = view.read_region(0, 0, 0, *view.info.shape)
    np.testing.assert_array_equal(small.image, seen)  # what `run` feeds the network
    assert small.label.shape == seen.shape[:2] and set(np.unique(small.label)) == {0, 1}
    # The majority keeps the lesion's area (to a few % along its outline).
    assert abs(small.label.mean() - pair.label.mean()) < 0.01
    # Instance ids are sampled, never blended: every id is one of the label's.
    ids = np.where(pair.label != 0, 1 + (np.arange(pair.label.shape[1]) // 100), 0)
    (shrunk,) = downsample_pairs([dataclasses.replace(pair, label=ids)], 2.0, "instances")
    assert set(np.unique(shrunk.label)) <= set(np.unique(ids))


def test_run_predict_and_evaluate_agree_on_the_images_own_grid(trained, tmp_path):
    from tilesegment.train.evaluate import evaluate_model

    image = ph2_image(OTHER)
    shape = Image.open(image).size[::-1]
    masks, probabilities = [], []
    # Two tile sizes (and --mpp, which only labels the output of a downsample model).
    for name, extra in (("a", ("--tile-size", "124")), ("b", ("--tile-size", "204", "--mpp", "5"))):
        out = tmp_path / f"{name}.zarr"
        result = invoke("run", image, "-o", out, "--model", trained, "--dtype", "float32", *FP32,
                        "--no-preview", "--tissue", "none", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        group = zarr.open_group(str(out), mode="r")
        masks.append(np.asarray(group["labels/mask/0"]))
        probabilities.append(np.asarray(group["0"]))
        report = json.loads(out.with_suffix(".report.json").read_text())
        assert report["params"]["downsample"] == 2.0
        assert report["downsample"]["output_grid"] == list(shape)
        assert report["downsample"]["network_grid"] == [round(n / 2) for n in shape]
    scale = zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs["multiscales"][0]
    assert scale["datasets"][0]["coordinateTransformations"][0]["scale"][1:] == [5.0, 5.0]
    run_mask = masks[0]
    assert run_mask.shape == shape  # the image's own grid, not the network's
    np.testing.assert_array_equal(masks[1], run_mask)  # whatever the tile size
    # (to float rounding: torch's convolutions sum in another order on other tile sizes)
    np.testing.assert_allclose(probabilities[1], probabilities[0], rtol=0, atol=1e-6)
    assert 0 < np.count_nonzero(run_mask) < run_mask.size

    result = invoke("predict", image, "-o", tmp_path / "masks", "--model", trained,
                    "--tile-size", "124", *FP32)  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "masks" / f"{OTHER}.png")),
                                  run_mask * 255)  # fmt: skip

    (tmp_path / "one.txt").write_text(OTHER + "\n")
    report, _ = evaluate_model(trained, data_path("ph2", "PH2 Dataset images"),
                               name_list=tmp_path / "one.txt", keep_examples=True)  # fmt: skip
    row = report.per_image[0]
    assert row["shape"] == list(shape) and row["predicted_shape"] == [round(n / 2) for n in shape]
    assert report.mpp["downsample"] == 2.0
    # A whole-image pass, not tiles: the same numbers to float rounding.
    pred = report.examples[OTHER].pred
    probs = probabilities[0]
    decided = np.abs(probs[1] - probs[0]) > 1e-4
    np.testing.assert_array_equal(pred[decided], run_mask[decided])
