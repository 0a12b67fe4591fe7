"""End to end on the real Aperio slide: the stitched output does not depend on the tile size or
the batch size, and equals one whole-image forward pass of the mirror-padded slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tilesegment.infer.options import RunOptions
from tilesegment.infer.predict import Predictor, predict_image
from tilesegment.infer.run import run_slide
from tilesegment.io import open_slide
from tilesegment.model import ModelSpec, UNetConfig, load_checkpoint, new_model, save_checkpoint
from tilesegment.store import OutputStore, is_complete

# 252: many small tiles (stride 64); 572: the paper's tile; 3164: one tile larger than the slide.
TILE_SIZES = (252, 572, 3164)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A fixed random depth-4 model, small enough to run the whole slide several times."""
    spec = ModelSpec.default(UNetConfig(depth=4, base_channels=4, classes=3), name="tiny")
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(new_model(spec, seed=11), spec, path)
    return path


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[int, Path]:
    from tests.conftest import data_path

    slide = data_path("slides", "CMU-1-Small-Region.svs")
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for i, tile in enumerate(TILE_SIZES):
        paths[tile] = out / f"t{tile}.zarr"
        opts = RunOptions(
            tile_size=tile,
            batch_size=(1, 3, 1)[i],
            tissue="none",
            preview=False,
            progress=False,
            precision="fp32",  # the reference arithmetic (auto may pick bf16 on this CPU)
        )
        summary = run_slide(slide, paths[tile], tiny_model, opts)
        assert summary.image_shape == (2967, 2220)
    return paths


@pytest.fixture(scope="module")
def whole_image(tiny_model) -> np.ndarray:
    from tests.conftest import data_path

    slide = data_path("slides", "CMU-1-Small-Region.svs")
    net, spec = load_checkpoint(tiny_model)
    with open_slide(slide) as reader:
        h, w = reader.info.shape
        image = reader.read_region(0, 0, 0, h, w)
    return predict_image(image, Predictor(net, spec))


def test_tile_size_does_not_change_the_output(runs):
    stores = {t: OutputStore.open(p) for t, p in runs.items()}
    probs = {t: s.probabilities[:] for t, s in stores.items()}
    masks = {t: s.mask[:] for t, s in stores.items()}
    ref_p, ref_m = probs[TILE_SIZES[0]], masks[TILE_SIZES[0]]
    for t in TILE_SIZES[1:]:
        diff = np.abs(probs[t].astype(np.int16) - ref_p.astype(np.int16))
        assert diff.max() <= 1, f"tile {t}: probabilities differ by {diff.max()}/255"
        agree = (masks[t] == ref_m).mean()
        assert agree >= 0.9999, f"tile {t}: masks agree on only {agree:.6%}"


def test_output_equals_the_whole_image_pass(runs, whole_image):
    expected = np.rint(whole_image * 255)
    expected_mask = whole_image.argmax(axis=0)
    for t, path in runs.items():
        store = OutputStore.open(path)
        got = store.probabilities[:].astype(np.float32)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1, f"tile {t}"
        assert (store.mask[:] == expected_mask).mean() >= 0.9999, f"tile {t}"


def test_bf16_runs_are_tile_invariant_within_two_levels(tiny_model, runs, tmp_path):
    """bf16 autocast (``--precision auto`` on CPUs with native bf16) rounds differently per
    tile size, but stays within 2/255 across tilings and a few /255 of fp32, with the same
    mask almost everywhere (pixels within a rounding step of a class tie may flip)."""
    from tests.conftest import data_path

    slide = data_path("slides", "CMU-1-Small-Region.svs")
    got = {}
    for tile in (252, 572):
        out = tmp_path / f"bf16-{tile}.zarr"
        opts = RunOptions(
            tile_size=tile, tissue="none", preview=False, progress=False, precision="bf16"
        )
        run_slide(slide, out, tiny_model, opts)
        store = OutputStore.open(out)
        got[tile] = (store.probabilities[:].astype(np.int16), store.mask[:])
    tiling = np.abs(got[572][0] - got[252][0])
    assert tiling.max() <= 2 and (tiling > 0).mean() < 0.01, (tiling.max(), (tiling > 0).mean())
    assert (got[572][1] == got[252][1]).mean() >= 0.9995
    # Against fp32 (this random model has many near-ties between its 3 classes).
    fp32 = OutputStore.open(runs[572])
    arith = np.abs(got[572][0] - fp32.probabilities[:].astype(np.int16))
    assert arith.max() <= 5 and (arith > 1).mean() < 0.02, (arith.max(), (arith > 1).mean())
    assert (got[572][1] == fp32.mask[:]).mean() >= 0.99


def test_output_is_valid_ngff_with_the_slide_scale(runs):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04 import Image, ImageLabel

    path = runs[572]
    assert is_complete(path)
    root = zarr.open_group(path, mode="r")
    image = Image.from_zarr(root)
    ImageLabel.from_zarr(root["labels/mask"])
    ms = image.attributes.multiscales[0]
    scale = ms.datasets[0].coordinateTransformations[0].scale
    assert scale[1:] == pytest.approx([0.499, 0.499])
    assert [a.unit for a in ms.axes[1:]] == ["micrometer", "micrometer"]
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes[0].data[0].shape == (3, 2967, 2220)
    # Pyramid down to <= 1024 px.
    assert max(nodes[0].data[-1].shape[1:]) <= 1024
    attrs = root.attrs["tilesegment"]
    assert attrs["tile_size"] == [572, 572] and attrs["halo"] == 92


def test_existing_output_is_refused(runs, tiny_model):
    from tests.conftest import data_path
    from tilesegment.errors import StoreError

    slide = data_path("slides", "CMU-1-Small-Region.svs")
    with pytest.raises(StoreError, match="--overwrite"):
        run_slide(slide, runs[572], tiny_model, RunOptions(progress=False))
    assert is_complete(runs[572])


def test_resampled_runs_are_tile_invariant(tmp_path):
    """Through resampling to the model's µm/px, the output still equals a whole-image pass."""
    from tests.conftest import data_path
    from tilesegment.io.resample import ResampledReader

    slide = data_path("slides", "CMU-1-Small-Region.svs")
    spec = ModelSpec.default(UNetConfig(depth=3, base_channels=4), name="coarse", mpp=1.3)
    save_checkpoint(new_model(spec, seed=5), spec, tmp_path / "coarse")
    outs = []
    for tile in (140, 572):
        out = tmp_path / f"r{tile}.zarr"
        opts = RunOptions(
            tile_size=tile, tissue="none", preview=False, progress=False, precision="fp32"
        )
        summary = run_slide(slide, out, tmp_path / "coarse", opts)
        assert summary.extra["mpp"] == pytest.approx(1.3)
        outs.append(OutputStore.open(out))
    assert outs[0].image_shape == (1139, 852)
    assert outs[0].mpp == pytest.approx((1.3, 1.3))
    p0, p1 = (o.probabilities[:].astype(np.int16) for o in outs)
    assert np.abs(p0 - p1).max() <= 1
    net, spec = load_checkpoint(tmp_path / "coarse")
    with open_slide(slide) as reader:
        view = ResampledReader(reader, 0, source_mpp=0.499, target_mpp=1.3)
        image = view.read_region(0, 0, 0, *view.info.shape)
    whole = np.rint(predict_image(image, Predictor(net, spec)) * 255)
    assert np.abs(p0 - whole).max() <= 1


def test_tissue_masking_skips_glass_and_keeps_tissue_output(tmp_path, tiny_model):
    from tilesegment.testing.synthetic import write_slide

    # 90 % glass, one compact tissue region.
    slide = write_slide(tmp_path / "glass.tif", (6000, 6000), tissue_fraction=0.1, patches=1)
    runs = {}
    for tissue in ("auto", "none"):
        out = tmp_path / f"{tissue}.zarr"
        opts = RunOptions(tile_size=572, tissue=tissue, progress=False)
        runs[tissue] = (run_slide(slide, out, tiny_model, opts), OutputStore.open(out))
    auto, none = runs["auto"][0].extra, runs["none"][0].extra
    assert none["tiles_processed"] == runs["none"][0].tiles
    share = auto["tiles_processed"] / runs["auto"][0].tiles
    # Tiles whose input window (halo included) touches the tissue edge are processed too.
    assert 0.08 <= share <= 0.2, share
    assert 0.07 <= auto["tissue_fraction"] <= 0.15
    tissue = runs["auto"][1].label("tissue")[:].astype(bool)
    p_auto = runs["auto"][1].probabilities[:]
    p_none = runs["none"][1].probabilities[:]
    # On tissue, masking changes nothing; on skipped glass, probabilities stay at the fill value.
    np.testing.assert_array_equal(p_auto[:, tissue], p_none[:, tissue])
    assert runs["auto"][1].is_complete()
    assert Path(runs["auto"][0].extra["preview"]).is_file()


def test_report_peak_rss_is_this_runs_not_the_processes(tmp_path, tiny_model):
    """A batch or a notebook runs many slides in one process: each report holds its own peak."""
    import json

    from tests.conftest import data_path
    from tilesegment.infer.devices import peak_rss_mb
    from tilesegment.store.layout import report_path

    big = np.ones(600 * 2**20 // 8)  # +600 MB, freed before the run
    inflated = peak_rss_mb()
    del big
    out = tmp_path / "o.zarr"
    opts = RunOptions(tile_size=572, tissue="none", preview=False, progress=False)
    run_slide(data_path("slides", "small.svs"), out, tiny_model, opts)
    report = json.loads(report_path(out).read_text())
    assert 0 < report["peak_rss_mb"]["main"] < inflated - 300, (report["peak_rss_mb"], inflated)
