"""The array API: ``tilesegment.dask.segment`` computes lazy blocks that equal one whole-image
pass and the stored output of ``tilesegment run``, on the threaded scheduler and on a real
``dask.distributed`` cluster, loading the model once per worker process."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tilesegment.dask import block_geometry, segment
from tilesegment.errors import ConfigError
from tilesegment.infer.predict import Predictor, predict_image
from tilesegment.model import ModelSpec, UNetConfig, load_checkpoint, new_model, save_checkpoint
from tilesegment.testing.synthetic import render

#: fp32 blocks differ from the whole-image pass only by float rounding (other conv sizes).
ATOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A fixed random depth-4 model (halo 92, pooling 16), this module's own file."""
    spec = ModelSpec.default(UNetConfig(depth=4, base_channels=4, classes=3), name="tiny")
    path = tmp_path_factory.mktemp("model") / "tiny-dask"
    save_checkpoint(new_model(spec, seed=5), spec, path)
    return path


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    net, spec = load_checkpoint(model)
    return Predictor(net, spec, precision="fp32")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """1000 x 777 px of synthetic H&E: 3 x 3 blocks of 384 px, unequal last blocks."""
    return render(0, 0, 1000, 777, size=(1000, 777), tissue_fraction=0.6, seed=2)


def test_numpy_and_zarr_images_equal_the_whole_image_pass(model, predictor, image):
    import zarr

    expected = predict_image(image, predictor)
    got = segment(image, model, precision="fp32", tile_size=572)  # blocks of one 572 px stride
    assert got.shape == expected.shape and got.dtype == np.float32
    assert got.chunks == ((3,), (384, 384, 232), (384, 393))  # last x block merged (9 < depth)
    # The default tile (828 px, strides of 640) gives other blocks and the same pixels.
    default = segment(image, model, precision="fp32")
    assert default.chunks == ((3,), (640, 360), (640, 137))
    np.testing.assert_allclose(default.compute(scheduler="threads"), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.compute(scheduler="threads"), expected, rtol=0, atol=ATOL)
    stored = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(256, 256, 3))
    from_zarr = segment(stored, model, precision="fp32", tile_size=572).compute(scheduler="threads")
    np.testing.assert_array_equal(from_zarr, got.compute(scheduler="threads"))


def test_odd_dask_chunks_on_a_cluster_equal_the_pass_and_load_the_model_once_per_worker(
    model, predictor, image, dask_client
):
    from tilesegment.infer.executors import cache

    expected = predict_image(image, predictor)
    lazy = da.from_array(image, chunks=(123, 457, 3))
    probabilities, mask = segment(lazy, model, output="both", precision="fp32", tile_size=380)
    assert probabilities.chunks[1:] == ((192,) * 4 + (232,), (192,) * 3 + (201,))
    before = dask_client.run(cache.loads)
    got, got_mask = dask.compute(probabilities, mask, scheduler=dask_client)
    after = dask_client.run(cache.loads)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert (got_mask == expected.argmax(axis=0)).mean() >= 0.9999
    # 20 blocks over 2 workers: each worker that computed loaded this checkpoint once.
    loaded = [after[w] - before[w] for w in before]
    assert max(loaded) == 1 and sum(loaded) >= 1, loaded


def test_grayscale_image_and_stored_uint8_output(model, predictor, image):
    gray = image[:500, :300, 1]  # (Y, X): repeated to the model's 3 channels
    expected = predict_image(gray, predictor)
    probabilities = segment(gray, model, dtype="uint8", precision="fp32").compute()
    assert probabilities.dtype == np.uint8 and probabilities.shape == (3, 500, 300)
    diff = np.abs(probabilities.astype(np.int16) - np.rint(expected * 255))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.9999
    mask = segment(gray, model, output="mask", precision="fp32").compute()
    assert mask.dtype == np.uint8 and (mask == expected.argmax(axis=0)).mean() >= 0.9999


def test_equals_the_stored_output_of_run(model, tmp_path, cmu_slide):
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide
    from tilesegment.io import open_slide
    from tilesegment.store import OutputStore

    opts = RunOptions(tile_size=572, tissue="none", preview=False, progress=False, precision="fp32")
    run_slide(cmu_slide, tmp_path / "out.zarr", model, opts)
    stored = OutputStore.open(tmp_path / "out.zarr")
    with open_slide(cmu_slide) as reader:
        h, w = reader.info.shape
        pixels = reader.read_region(0, 0, 0, h, w)
    probabilities, mask = segment(
        da.from_array(pixels, chunks=(1000, 1000, 3)),
        model,
        output="both",
        dtype="uint8",
        precision="fp32",
        tile_size=572,
    )
    probabilities, mask = dask.compute(probabilities, mask, scheduler="threads")
    expected = stored.probabilities[:]
    diff = np.abs(probabilities.astype(np.int16) - expected)
    # Interior blocks are the run's tiles exactly; the last row and column of blocks are
    # shorter forward passes, whose float rounding may move a value across a rounding edge.
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.9999
    assert (mask == stored.mask[:]).mean() >= 0.9999


@given(
    n=st.integers(1, 5000),
    tile_k=st.integers(0, 60),
    depth=st.sampled_from([(1, 10, 2, 2), (3, 44, 8, 4), (4, 92, 16, 4), (5, 188, 32, 4)]),
)
def test_block_geometry_keeps_the_pooling_phase_and_dask_depth(n, tile_k, depth):
    _, halo, pooling, residue = depth
    tile = 2 * halo + residue + pooling * tile_k
    g = block_geometry((n, 7), halo=halo, pooling=pooling, residue=residue, tile_size=tile)
    chunks, d = g.chunks[0], g.depth[0]
    assert sum(chunks) == n
    assert all(c % pooling == 0 for c in chunks[:-1])  # every block starts on the grid
    if len(chunks) == 1:
        assert d == 0  # one block: padded in numpy like the whole image
    else:
        assert all(c >= d for c in chunks)  # dask can overlap and reflect every block
        assert all(d >= halo + (residue - c) % pooling for c in chunks)  # a valid input


def test_invalid_input_is_refused_with_the_parameter_named(model, image):
    with pytest.raises(ConfigError, match=r"`image` must be uint8"):
        segment(image.astype(np.float32), model)
    with pytest.raises(ConfigError, match=r"C 1 or 3, got shape \(10, 10, 4\)"):
        segment(np.zeros((10, 10, 4), np.uint8), model)
    with pytest.raises(ConfigError, match=r"`tile_size` 500 px is not valid.*492 or 508"):
        segment(image, model, tile_size=500)
    with pytest.raises(ConfigError, match=r"`output` \('labels'\) must be one of"):
        segment(image, model, output="labels")  # type: ignore[arg-type]
