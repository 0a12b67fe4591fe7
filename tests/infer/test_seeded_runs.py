"""Seeded instances of a whole run (``tilesegment run --geojson`` with a model that declares
interior and boundary classes): the same nuclei for every tile size and every engine.

The slide is a 640 x 832 px crop of the real CMU-1-Small-Region written as a tiled TIFF; the
model a seeded random 3-class U-Net whose class map has many interiors and boundaries there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tests.infer.conftest import SEEDED_SPEC, write_cmu_crop
from tilesegment.infer.options import RunOptions
from tilesegment.infer.run import run_slide
from tilesegment.postprocess import postprocess_output
from tilesegment.postprocess.seeded import seeded_instances
from tilesegment.store import OutputStore
from tilesegment.testing.instances import instances_agree_away_from

COMMON = {"tissue": "none", "precision": "fp32", "preview": False, "progress": False}
SPEC = SEEDED_SPEC


@pytest.fixture(scope="module")
def crop_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "crop.tif"
    write_cmu_crop(path, 640, 832)
    return path


@pytest.fixture(scope="module")
def runs(seeded_model, crop_slide, tmp_path_factory) -> dict[str, Path]:
    """Outputs by engine and tile size, each with its GeoJSON beside it: ``run_slide`` and
    ``postprocess_output``, as ``tilesegment run --geojson`` calls them, with chunks of about
    256 px so that many nuclei cross chunk faces."""
    engines = {
        "252": {"tile_size": 252},
        "572": {"tile_size": 572},
        "1084": {"tile_size": 1084},
        "pool": {"tile_size": 572, "workers": 2},
        "dask": {"tile_size": 572, "dask_workers": 2},
    }
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, extra in engines.items():
        path = out / name / "out.zarr"
        opts = RunOptions(chunk_target_px=256, **COMMON, **extra)
        run_slide(crop_slide, path, seeded_model, opts)
        postprocess_output(path, geojson=path.with_suffix(".geojson"))
        paths[name] = path
    return paths


def arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    store = OutputStore.open(path)
    return store.mask[:], store.label("nuclei")[:]


def crossing_chunk_faces(nuclei: np.ndarray, chunk_shape: tuple[int, int]) -> int:
    """Pixel pairs across chunk faces that lie in one nucleus."""
    cy, cx = chunk_shape
    above, below = nuclei[cy - 1 : -1 : cy], nuclei[cy::cy]
    left, right = nuclei[:, cx - 1 : -1 : cx], nuclei[:, cx::cx]
    return int(
        np.count_nonzero(above & (above == below)) + np.count_nonzero(left & (left == right))
    )


def test_every_run_equals_the_whole_image_computation_on_its_class_map(runs):
    chunks = {OutputStore.open(p).chunk_shape for p in runs.values()}
    assert chunks == {(256, 256), (384, 384), (640, 832)}  # 1084: one chunk, clipped
    for name, path in runs.items():
        mask, nuclei = arrays(path)
        min_area_px = 10.0  # the default 10 µm² in px: the crop has no mpp
        expected = seeded_instances(mask, SPEC, min_area_px=min_area_px)
        assert np.array_equal(nuclei, expected), name
        assert nuclei.max() > 200, name
        if name != "1084":  # one chunk covers the crop
            assert crossing_chunk_faces(nuclei, OutputStore.open(path).chunk_shape) > 20, name


def test_seeding_separates_what_components_merge(runs):
    mask, nuclei = arrays(runs["572"])
    components = ndimage.label(mask > 0)[1]
    assert nuclei.max() > 1.5 * components


def test_pool_and_dask_give_the_same_nuclei_and_geojson(runs):
    pool, dask = arrays(runs["pool"]), arrays(runs["dask"])
    assert np.array_equal(pool[0], dask[0]) and np.array_equal(pool[1], dask[1])
    geo = {n: runs[n].with_suffix(".geojson").read_bytes() for n in ("pool", "dask")}
    assert geo["pool"] == geo["dask"]
    features = json.loads(geo["pool"])["features"]
    assert len(features) == pool[1].max()
    assert {f["properties"]["objectType"] for f in features} == {"detection"}


def test_tile_sizes_give_the_same_nuclei_wherever_the_class_maps_agree(runs):
    """fp32 convolutions of different tile sizes round differently, and an argmax near a tie
    can flip (a few px in a million, as in tests/test_run.py); every nucleus farther than the
    halo from such a pixel must be the same pixel set in every run."""
    ref_mask, ref = arrays(runs["572"])
    for name in ("252", "1084", "pool"):
        mask, nuclei = arrays(runs[name])
        differ = mask != ref_mask
        assert differ.mean() < 1e-4, name
        agree, matched = instances_agree_away_from(ref, nuclei, differ, SPEC.halo_px)
        assert agree, name  # same sets, not just overlapping ones
        assert matched > 0.9 * ref.max(), name


def test_export_method_option(runs, tmp_path):
    """`export` follows the store's declaration; --method components overrides it; options of
    the components method on a seeded store are a one-line error (exit 2)."""
    from tests.infer.conftest import invoke

    store = runs["1084"]
    seeded_count = int(arrays(store)[1].max())
    bad = invoke("export", store, "--instances", "--threshold", "0.5")
    assert bad.exit_code == 2, bad.output
    assert bad.output.count("\n") == 1 and "--method components" in bad.output
    table = tmp_path / "t.csv"
    done = invoke("export", store, "--method", "components", "--instances", "--table", table)
    assert done.exit_code == 0, done.output
    mask, components = arrays(store)
    interior, _ = ndimage.label(mask == 1)  # 4-connected components of class 1, >= 10 px
    assert components.max() == np.count_nonzero(np.bincount(interior.ravel())[1:] >= 10)
    again = invoke("export", store, "--instances", "--table", table)
    assert again.exit_code == 0 and int(arrays(store)[1].max()) == seeded_count
