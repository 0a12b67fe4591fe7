"""Test-time augmentation (``--tta d4``): the averaged probabilities still do not depend on the
tile size or the engine and equal the whole-image computation, the definition is the mean of
the transformed *padded* image's passes, and the seeded nuclei follow.

The slide is a 300 x 400 px crop of the real CMU-1-Small-Region written as a tiled TIFF; the
model a seeded random 3-class U-Net with many interiors and boundaries there (as in
tests/infer/test_seeded_runs.py). Probabilities are stored as float32 and compared with the
tolerance of the untransformed paths (tests/test_dask.py): fp32 convolutions of other sizes
round differently, by a few 1e-7.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.infer.conftest import SEEDED_SPEC, write_cmu_crop
from tilesegment.errors import ConfigError
from tilesegment.geometry import PAD_MODE, TTA_MODES, whole_image_padding
from tilesegment.infer.options import RunOptions
from tilesegment.infer.predict import Predictor, predict_image
from tilesegment.infer.run import run_slide
from tilesegment.model import load_checkpoint
from tilesegment.postprocess import postprocess_output
from tilesegment.postprocess.seeded import seeded_instances
from tilesegment.store import OutputStore
from tilesegment.store.layout import sidecar_path
from tilesegment.testing.instances import instances_agree_away_from

#: As tests/test_dask.py: fp32 passes of other sizes differ only by float rounding.
ATOL = 1e-5
COMMON = {
    "tissue": "none",
    "precision": "fp32",
    "dtype": "float32",
    "preview": False,
    "progress": False,
    "chunk_target_px": 256,
}
SPEC = SEEDED_SPEC
#: Engines by name: 252 (5 x 7 tiles, stride 64), 572 (1 x 2 tiles), 1084 (one tile), the
#: worker pool, a local dask cluster, and 572 without augmentation.
ENGINES = {
    "252": {"tile_size": 252},
    "572": {"tile_size": 572},
    "1084": {"tile_size": 1084},
    "pool": {"tile_size": 572, "workers": 2},
    "dask": {"tile_size": 572, "dask_workers": 2},
    "plain": {"tile_size": 572, "tta": "none"},
}


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("slide") / "crop.tif"
    return path, write_cmu_crop(path, 300, 400)


@pytest.fixture(scope="module")
def runs(seeded_model, crop, tmp_path_factory) -> dict[str, Path]:
    """Outputs by engine, with seeded nuclei (as ``run --geojson`` makes them)."""
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, extra in ENGINES.items():
        path = out / name / "out.zarr"
        opts = RunOptions(**{**COMMON, "tta": "d4", **extra})
        run_slide(crop[0], path, seeded_model, opts)
        postprocess_output(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def whole(seeded_model, crop) -> np.ndarray:
    """The whole-image computation: one padded image, each symmetry a forward pass."""
    net, spec = load_checkpoint(seeded_model)
    return predict_image(crop[1], Predictor(net, spec, precision="fp32", tta="d4"))


def stored(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    store = OutputStore.open(path)
    return store.probabilities[:], store.mask[:], store.label("nuclei")[:]


def test_every_tile_size_and_engine_equals_the_whole_image_computation(runs, whole):
    for name in ("252", "572", "1084", "pool", "dask"):
        probabilities, mask, _ = stored(runs[name])
        assert probabilities.dtype == np.float32 and probabilities.shape == whole.shape
        np.testing.assert_allclose(probabilities, whole, rtol=0, atol=ATOL, err_msg=name)
        assert (mask == whole.argmax(axis=0)).mean() >= 0.9999, name


def test_the_pool_and_dask_equal_the_in_process_run(runs):
    ref = stored(runs["572"])[0]
    for name in ("pool", "dask"):
        np.testing.assert_allclose(stored(runs[name])[0], ref, rtol=0, atol=ATOL, err_msg=name)


def test_whole_image_tta_is_the_mean_over_the_transformed_padded_image(seeded_model, crop, whole):
    """An independent numpy reference: pad once, then per symmetry flip/transpose the padded
    image, run the plain predictor, undo, and average."""
    net, spec = load_checkpoint(seeded_model)
    plain = Predictor(net, spec, precision="fp32")
    pixels = crop[1]
    pads = whole_image_padding(pixels.shape[:2], halo=net.halo, pooling=net.pooling, residue=4)
    padded = np.pad(pixels, (*pads, (0, 0)), mode=PAD_MODE)
    total = np.zeros_like(whole)
    for s in TTA_MODES["d4"]:
        image = np.flip(padded, [a - 1 for a in s.flip_axes])  # (Y, X, C): y is -3, x is -2
        image = image.swapaxes(0, 1) if s.transpose else image
        probs = plain(np.ascontiguousarray(image)[None])[0]  # (C, Y, X)
        probs = probs.swapaxes(1, 2) if s.transpose else probs
        total += np.flip(probs, s.flip_axes)[:, : pixels.shape[0], : pixels.shape[1]]
    np.testing.assert_allclose(whole, total / 8, rtol=0, atol=1e-6)
    # The transforms really change the passes: one pass alone is far from the mean.
    assert np.abs(predict_image(pixels, plain) - whole).max() > 0.1


def test_augmentation_changes_the_output(runs):
    tta, plain = stored(runs["572"]), stored(runs["plain"])
    assert np.abs(tta[0] - plain[0]).max() > 0.1
    assert (tta[1] != plain[1]).mean() > 0.01


def test_nuclei_are_the_whole_image_computations_for_every_tile_size(runs, whole):
    whole_mask = whole.argmax(axis=0).astype(np.uint8)
    expected = seeded_instances(whole_mask, SPEC, min_area_px=10.0)  # 10 µm² without an mpp
    assert expected.max() > 50
    for name in ("252", "572", "1084", "pool", "dask"):
        _, mask, nuclei = stored(runs[name])
        assert np.array_equal(nuclei, seeded_instances(mask, SPEC, min_area_px=10.0)), name
        agree, matched = instances_agree_away_from(
            expected, nuclei, mask != whole_mask, SPEC.halo_px
        )
        assert agree and matched > 0.9 * expected.max(), (name, matched, expected.max())


def test_tta_is_recorded_and_resume_refuses_another(runs, seeded_model, crop):
    path = runs["572"]
    report = json.loads(sidecar_path(path, "report.json").read_text())
    assert report["tta"] == "d4" and report["params"]["tta"] == "d4"
    assert OutputStore.open(path).attrs["tta"] == "d4"
    plain = json.loads(sidecar_path(runs["plain"], "report.json").read_text())
    assert plain["tta"] == "none" and "tta" not in plain["params"]  # as before --tta existed
    for other, recorded in (("none", "None"), ("flips", "'flips'")):
        opts = RunOptions(**{**COMMON, "tile_size": 572, "tta": other, "resume": True})
        with pytest.raises(ConfigError, match=rf"tta 'd4' -> {recorded}"):
            run_slide(crop[0], path, seeded_model, opts)


def test_predict_and_the_dask_array_api_apply_it_too(seeded_model, crop, whole):
    from tilesegment.dask import segment
    from tilesegment.infer.image import ImageSegmenter

    opts = RunOptions(tile_size=252, precision="fp32", tta="d4", progress=False)
    got = ImageSegmenter(seeded_model, opts).segment(crop[0]).probabilities
    np.testing.assert_allclose(got, whole, rtol=0, atol=ATOL)
    lazy = segment(crop[1], seeded_model, precision="fp32", tile_size=380, tta="d4")
    assert lazy.numblocks == (1, 2, 2)
    np.testing.assert_allclose(lazy.compute(scheduler="threads"), whole, rtol=0, atol=ATOL)


def test_unknown_mode_is_refused_with_the_modes_named(seeded_model, crop, tmp_path):
    opts = RunOptions(**{**COMMON, "tta": "rot"})
    with pytest.raises(ConfigError, match=r"--tta 'rot' must be one of none, flips, d4"):
        run_slide(crop[0], tmp_path / "out.zarr", seeded_model, opts)
