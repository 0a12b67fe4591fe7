"""`tilesegment evaluate` speaks the field's language: AJI and AJI+ (per image and aggregated),
PQ/DQ/SQ, Dice and object F1 on real TNBC tiles with the shipped nuclei-he; `--mpp` predicts
at the model's µm/px and scores on the image's grid; `--figure` draws the worst and best rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from tests.conftest import data_path
from tests.train.conftest import write_folder
from tilesegment.cli import main
from tilesegment.io.image import ImageReader
from tilesegment.io.resample import ResampledReader, resample_array, scale_and_shape, to_uint8
from tilesegment.model import load_checkpoint
from tilesegment.train.evaluate import Report
from tilesegment.train.figure import (
    FN_RGB,
    FP_RGB,
    MIXED_RGB,
    PANEL_PX,
    TP_RGB,
    error_overlay,
    figure_size_px,
    pick_rows,
)

#: Three TNBC tiles of three patients (512 x 512, 40x).
TNBC_NAMES = ("01_1", "02_1", "03_1")
INSTANCE_FIELDS = {
    "aji", "aji_intersection", "aji_union", "aji_plus", "aji_plus_intersection",
    "aji_plus_union", "pq", "dq", "sq", "foreground_dice",
    "foreground_iou", "object_f1", "object_precision", "object_recall", "object_tp",
    "object_fp", "object_fn", "dice_per_class", "iou_per_class", "confusion", "shape",
    "predicted_shape",
}  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tnbc(tmp_path_factory) -> tuple[Path, Path]:
    """images/ and labels/ folders linking three real TNBC tiles."""
    images, labels = data_path("tnbc", "images"), data_path("tnbc", "labels")
    root = tmp_path_factory.mktemp("tnbc")
    for folder in ("images", "labels"):
        (root / folder).mkdir()
    for name in TNBC_NAMES:
        (root / "images" / f"{name}.png").symlink_to(images / f"{name}.png")
        (root / "labels" / f"{name}.tif").symlink_to(labels / f"{name}.tif")
    return root / "images", root / "labels"


@pytest.fixture(scope="module")
def tnbc_20x(tnbc, tmp_path_factory) -> tuple[Path, Path]:
    """The same tiles halved to 256 x 256 (about 0.5 µm/px, as a 20x scan): images by 2 x 2
    means (Pillow's reduce), labels by taking every second pixel."""
    root = tmp_path_factory.mktemp("tnbc20x")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name in TNBC_NAMES:
        with Image.open(tnbc[0] / f"{name}.png") as image:
            image.convert("RGB").reduce(2).save(root / "images" / f"{name}.png")
        label = tifffile.imread(tnbc[1] / f"{name}.tif")
        tifffile.imwrite(root / "labels" / f"{name}.tif", label[::2, ::2])
    return root / "images", root / "labels"


@pytest.fixture(scope="module")
def tnbc_json(tnbc) -> dict:
    result = invoke("evaluate", "--model", "nuclei-he", "--images", tnbc[0], "--labels", tnbc[1],
                    "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_has_every_metric_per_image_and_aggregated(tnbc_json):
    doc = tnbc_json
    assert doc["name"] == "nuclei-he" and doc["kind"] == "instances" and doc["headline"] == "aji"
    assert [row["name"] for row in doc["images"]] == list(TNBC_NAMES)
    for row in doc["images"]:
        assert INSTANCE_FIELDS <= set(row), INSTANCE_FIELDS - set(row)
        assert row["shape"] == row["predicted_shape"] == [512, 512]
        assert row["aji"] == pytest.approx(row["aji_intersection"] / row["aji_union"])
        assert row["aji_plus"] == pytest.approx(
            row["aji_plus_intersection"] / row["aji_plus_union"]
        )
        assert row["pq"] == pytest.approx(row["dq"] * row["sq"])
        # The shipped model on TNBC (measured: AJI 0.60-0.71, AJI+ 0.61-0.71, PQ 0.55-0.73).
        assert 0.45 < row["aji"] < 0.9 and 0.45 < row["aji_plus"] < 0.9
        assert 0.4 < row["pq"] < 0.9
        assert 0.6 < row["foreground_dice"] < 0.95 and 0.6 < row["object_f1"] < 1.0
    rows = doc["images"]
    pooled = doc["aggregate"]
    # Aggregated AJI and AJI+: sum of intersections over sum of unions, not the mean.
    for name in ("aji", "aji_plus"):
        c = sum(r[f"{name}_intersection"] for r in rows)
        u = sum(r[f"{name}_union"] for r in rows)
        assert pooled[name] == pytest.approx(c / u)
        assert doc["mean"][name] == pytest.approx(np.mean([r[name] for r in rows]))
    assert doc["mean"]["pq"] == pytest.approx(np.mean([r["pq"] for r in rows]))
    tp, fp, fn = (sum(r[f"object_{k}"] for r in rows) for k in ("tp", "fp", "fn"))
    assert pooled["object_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    confusion = np.sum([r["confusion"] for r in rows], axis=0)
    assert pooled["foreground_dice"] == pytest.approx(
        2 * confusion[1, 1] / (2 * confusion[1, 1] + confusion[0, 1] + confusion[1, 0])
    )
    assert doc["mpp"] == {"image": None, "model": 0.25}


def test_table_names_the_metrics_and_the_pooled_row(tnbc, tnbc_json):
    result = invoke("evaluate", "--model", "nuclei-he", "--images", tnbc[0], "--labels", tnbc[1],
                    "--list", _names(tnbc[0].parent, TNBC_NAMES[:1]))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "instances labels (instances: seeded), 1 image(s)" in result.output.splitlines()[0]
    header = result.output.splitlines()[1].split()
    assert header == ["image", "AJI", "AJI+", "PQ", "DQ", "SQ", "Dice", "F1@0.5"]
    row = next(line for line in result.output.splitlines() if line.startswith(TNBC_NAMES[0]))
    first = tnbc_json["images"][0]
    assert row.split()[1:3] == [f"{first['aji']:.4f}", f"{first['aji_plus']:.4f}"]
    pooled = next(line for line in result.output.splitlines() if line.startswith("all (pooled)"))
    assert pooled.split()[2:4] == [f"{first['aji']:.4f}", f"{first['aji_plus']:.4f}"]


def test_mpp_predicts_at_the_models_resolution_and_scores_on_the_image_grid(tnbc_json, tnbc_20x):
    base = ["evaluate", "--model", "nuclei-he", "--images", tnbc_20x[0], "--labels", tnbc_20x[1]]
    result = invoke(*base, "--mpp", "0.5", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["mpp"] == {"image": 0.5, "model": 0.25}
    for row in doc["images"]:
        assert row["shape"] == [256, 256]  # scored on the image's own grid
        assert row["predicted_shape"] == [512, 512]  # predicted at 0.25 µm/px
    as_is = json.loads(invoke(*base, "--json").output)
    assert [row["predicted_shape"] for row in as_is["images"]] == [[256, 256]] * 3
    # Nuclei at half the size the model knows are segmented badly (measured 0.37 pooled);
    # resampled, the 20x copy scores close to the 40x original (0.63 vs 0.65).
    assert doc["aggregate"]["aji"] > as_is["aggregate"]["aji"] + 0.15
    assert doc["aggregate"]["aji"] == pytest.approx(tnbc_json["aggregate"]["aji"], abs=0.06)


def test_tta_is_applied_and_reported(tnbc_20x):
    """``--tta flips`` reaches the predictor (other scores, same shapes) and is reported; the
    20x copies without --mpp keep it cheap (256 px images)."""
    base = ["evaluate", "--model", "nuclei-he", "--images", tnbc_20x[0], "--labels", tnbc_20x[1]]
    plain = json.loads(invoke(*base, "--json").output)
    result = invoke(*base, "--tta", "flips", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert plain["tta"] == "none" and doc["tta"] == "flips"
    assert [r["predicted_shape"] for r in doc["images"]] == [[256, 256]] * 3
    for a, b in zip(plain["images"], doc["images"], strict=True):
        assert a["confusion"] != b["confusion"], a["name"]  # other pixels, not just other ids
    assert "test-time augmentation flips" in invoke(*base, "--tta", "flips").output.splitlines()[0]


def test_images_are_resampled_exactly_as_run_reads_them():
    path = data_path("tnbc", "images", f"{TNBC_NAMES[0]}.png")
    with ImageReader(path) as reader:
        pixels = reader.read_region(0, 0, 0, *reader.info.shape)
        scale, shape = scale_and_shape(reader.info.shape, 0.5, 0.25)
        with ResampledReader(reader, 0, source_mpp=0.5, target_mpp=0.25) as view:
            assert view.info.shape == shape == (1024, 1024)
            expected = view.read_region(0, 0, 0, *shape)
    np.testing.assert_array_equal(to_uint8(resample_array(pixels, shape, scale)), expected)


def test_figure_has_two_n_rows_worst_and_best(tnbc, tmp_path):
    grid = tmp_path / "grid.png"
    result = invoke("evaluate", "--model", "nuclei-he", "--images", tnbc[0], "--labels", tnbc[1],
                    "--figure", grid, "--figure-n", "1", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    by_aji = sorted(doc["images"], key=lambda row: row["aji"])
    assert doc["figure"]["rows"] == [by_aji[0]["name"], by_aji[-1]["name"]]
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.size == figure_size_px(2)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    width = image.size[0]
    errors = pixels[:, 3 * width // 4 :]  # the error-overlay column
    magenta = np.all(np.abs(errors - np.array(FP_RGB)) < 40, axis=-1)
    assert 100 < np.count_nonzero(magenta) < 0.2 * 2 * PANEL_PX**2
    assert not list(tmp_path.glob(".*.tmp"))


def test_figure_rows_without_a_model():
    rows = [{"name": f"im{i}", "aji": v} for i, v in enumerate([0.5, math.nan, 0.9, 0.1, 0.7])]
    report = Report(kind="instances", per_image=rows)
    picked = pick_rows(report, 2)
    assert [(p, r["name"]) for p, r in picked] == [
        ("worst 1", "im1"), ("worst 2", "im3"), ("best 1", "im2"), ("best 2", "im4"),
    ]  # fmt: skip
    assert [r["name"] for _, r in pick_rows(report, 3)] == ["im1", "im3", "im0", "im4", "im2"]


def test_error_overlay_colours_objects_as_the_f1_counts_them():
    truth = np.array([[1, 1, 0, 2, 2, 0, 3, 3, 0, 0, 4]])
    pred = np.array([[5, 5, 5, 5, 5, 0, 6, 6, 0, 7, 0]])  # merge of 1 and 2, 3 found
    out = error_overlay(np.zeros((1, 11, 3), np.uint8), truth, pred, kind="instances")
    colours = [tuple(int(v) for v in px) for px in out[0]]
    green = tuple(round(0.5 * v) for v in TP_RGB)  # half-blended on black
    merge, fp, fn = MIXED_RGB, FP_RGB, FN_RGB
    assert colours == [merge, merge, fp, merge, merge, (0, 0, 0), green, green, (0, 0, 0),
                       fp, fn]  # fmt: skip
    # Pixel-level for masks: the merged blob's gap is a false positive, nothing is merged.
    binary = error_overlay(np.zeros((1, 11, 3), np.uint8), truth != 0, pred != 0)
    assert tuple(binary[0, 2]) == FP_RGB and tuple(binary[0, 10]) == FN_RGB
    assert tuple(binary[0, 0]) == green


def test_classes_get_dice_and_iou_per_class_and_a_figure(tiny_model, tmp_path):
    images, labels = write_folder(tmp_path / "data", 2, shape=(64, 64))
    for path in labels.glob("*.tif"):
        tifffile.imwrite(path, (tifffile.imread(path) % 3).astype(np.uint8))
    grid = tmp_path / "classes.png"
    args = ["evaluate", "--model", tiny_model, "--images", images, "--labels", labels,
            "--label-kind", "classes", "--figure", grid]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[1]
    for column in ("mean Dice", "Dice background", "Dice class2", "IoU class1"):
        assert column in header
    doc = json.loads(invoke(*args, "--json").output)
    assert "instances" not in doc and "instances" not in result.output.splitlines()[0]
    assert len(doc["aggregate"]["dice_per_class"]) == 3
    assert len(doc["images"][0]["iou_per_class"]) == 3
    with Image.open(grid) as image:
        assert image.size == figure_size_px(2)


def test_bad_figure_path_and_mpp_without_model_mpp_are_one_line_errors(tnbc, tiny_model, tmp_path):
    base = ["evaluate", "--model", "nuclei-he", "--images", tnbc[0], "--labels", tnbc[1]]
    for figure, message in (
        (tmp_path / "grid.jpg", "the figure is a PNG; name it with .png"),
        (tmp_path / "no" / "grid.png", "does not exist; create it"),
    ):
        result = invoke(*base, "--figure", figure)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    result = invoke("evaluate", "--model", tiny_model, "--images", tnbc[0], "--labels", tnbc[1],
                    "--mpp", "0.5")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "declares no µm/px" in result.output


def _names(folder: Path, names) -> Path:
    path = folder / "names.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def test_instances_components_compares_the_post_processing(tnbc, tnbc_json):
    """`--instances components` scores the components of the nucleus class of the same
    prediction instead of the seeded instances the model declares (and `run` makes)."""
    assert tnbc_json["instances"] == "seeded"
    result = invoke("evaluate", "--model", "nuclei-he", "--images", tnbc[0], "--labels", tnbc[1],
                    "--instances", "components", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["instances"] == "components"
    assert doc["mean"]["foreground_dice"] == pytest.approx(
        tnbc_json["mean"]["foreground_dice"], abs=0.02
    )
    seeded = [row["object_tp"] + row["object_fp"] for row in tnbc_json["images"]]
    components = [row["object_tp"] + row["object_fp"] for row in doc["images"]]
    assert seeded != components  # other objects from the same probabilities


def test_a_model_without_instance_spec_scores_components(tiny_model, tmp_path):
    """The method reported is the one evaluation used: `--instances model` on a model that
    declares no instances falls back to components, and says so."""
    assert load_checkpoint(tiny_model)[1].instances is None
    images, labels = write_folder(tmp_path / "data", 2, shape=(64, 64))
    base = ["evaluate", "--model", tiny_model, "--images", images, "--labels", labels,
            "--label-kind", "instances", "--instances", "model"]  # fmt: skip
    doc = json.loads(invoke(*base, "--json").output)
    assert doc["kind"] == "instances" and doc["instances"] == "components"
    result = invoke(*base)
    assert result.exit_code == 0, result.output
    assert "instances labels (instances: components)" in result.output.splitlines()[0]
