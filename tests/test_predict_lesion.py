"""`tilesegment predict` on PH2 dermoscopy images (in PH2's own layout) with the shipped
skin-lesion model writes one mask per image, equal to the `labels/mask` that `tilesegment run`
computes for the same image (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from tests.conftest import data_path
from tilesegment.cli import main
from tilesegment.model.registry import shipped_models

#: The shipped model under test.
MODEL = "lesion-derm"

#: Held-out cases of the lesion-derm split (workflows/models/splits/ph2-val.txt).
CASES = ("IMD019", "IMD041")


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def model() -> str:
    if MODEL not in {m.name for m in shipped_models()}:
        pytest.skip(f"model {MODEL!r} is not shipped yet (tilesegment/models/{MODEL}.json)")
    return MODEL


def test_predict_writes_one_mask_per_image_equal_to_runs_labels_mask(model, tmp_path):
    root = data_path("ph2", "PH2 Dataset images")
    images = [root / c / f"{c}_Dermoscopic_Image" / f"{c}.bmp" for c in CASES]
    out = tmp_path / "masks"
    result = invoke("predict", *images, "-o", out, "--model", model, "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"{c}.png" for c in CASES]
    classes = next(m.classes for m in shipped_models() if m.name == model)
    for image in images:
        store = tmp_path / f"{image.stem}.zarr"
        run = invoke("run", image, "-o", store, "--model", model, "--no-preview", "--no-progress")
        assert run.exit_code == 0, run.output
        mask = np.asarray(zarr.open_group(str(store), mode="r")["labels/mask/0"])
        png = Image.open(out / f"{image.stem}.png")
        assert mask.shape == png.size[::-1] == Image.open(image).size[::-1]
        # Two classes: a 0/255 gray PNG; more: a palette PNG of the class ids.
        expected = mask * 255 if len(classes) == 2 else mask
        np.testing.assert_array_equal(np.asarray(png), expected)
        assert 0 < np.count_nonzero(mask) < mask.size  # something found, not everything
