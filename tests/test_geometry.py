"""Property tests of the pure tile geometry: exact cover, read boxes, pad widths, pooling phase."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilesegment.geometry import (
    PAD_MODE,
    Box,
    Symmetry,
    mirror_indices,
    tile_grid,
    tile_indices,
    whole_image_padding,
)

# (halo, pooling, residue) of real valid U-Nets: depth 1..5 transposed, depth 4 bilinear.
NETS = [(8, 2, 0), (20, 4, 0), (44, 8, 4), (92, 16, 4), (188, 32, 4), (107, 16, 6)]


@st.composite
def grids(draw):
    halo, pooling, residue = draw(st.sampled_from(NETS))
    # Images from 1 px (smaller than the halo) to several tiles.
    h = draw(st.integers(1, 900))
    w = draw(st.integers(1, 900))
    k = draw(st.integers(1, 40))
    out = pooling * k + residue
    return tile_grid((h, w), halo=halo, output_tile=out, pooling=pooling), out


@given(grids())
@settings(max_examples=300, deadline=None)
def test_write_boxes_cover_the_image_exactly_once(args):
    grid, _ = args
    h, w = grid.image_shape
    cover = np.zeros((h, w), dtype=np.int32)
    for t in grid:
        assert t.write.h >= 1 and t.write.w >= 1
        cover[t.write.slices] += 1
        # The written core lies inside the tile's model output.
        assert t.core.y + t.core.h <= grid.output_shape[0]
        assert t.core.x + t.core.w <= grid.output_shape[1]
    assert (cover == 1).all()


@given(grids())
@settings(max_examples=300, deadline=None)
def test_read_boxes_pads_and_pooling_phase(args):
    grid, requested = args
    h, w = grid.image_shape
    p = grid.pooling
    assert grid.stride[0] % p == 0 and grid.stride[1] % p == 0
    assert grid.output_shape[0] <= requested and grid.output_shape[1] <= requested
    # Output sizes keep the valid residue, so the input is a valid size of the same network.
    assert grid.output_shape[0] % p == requested % p
    for t in grid:
        # Read box = output box grown by the halo, same shape for every tile.
        assert t.read.shape == grid.input_shape
        assert t.read.y == t.write.y - grid.halo and t.read.x == t.write.x - grid.halo
        # Pooling phase: origins in the halo-padded frame are multiples of the pooling factor.
        assert (t.read.y + grid.halo) % p == 0 and (t.read.x + grid.halo) % p == 0
        # Pad widths are exactly how far the read box sticks out of the image.
        (top, bottom), (left, right) = t.pad
        assert top == max(0, -t.read.y) and left == max(0, -t.read.x)
        assert bottom == max(0, t.read.y + t.read.h - h)
        assert right == max(0, t.read.x + t.read.w - w)
        # The source box is inside the image.
        s = t.source
        assert 0 <= s.y and s.y + s.h <= h and 0 <= s.x and s.x + s.w <= w


@given(grids(), st.integers(0, 2**31 - 1))
@settings(max_examples=120, deadline=None)
def test_tile_pixels_equal_the_globally_padded_image(args, seed):
    """Every tile's input equals the same window of the whole-image mirror padding."""
    grid, _ = args
    h, w = grid.image_shape
    image = np.random.default_rng(seed).integers(0, 1 << 30, (h, w))
    big = max(grid.input_shape) + max(grid.stride) + grid.halo
    reference = np.pad(image, ((big, big), (big, big)), mode=PAD_MODE)
    for t in grid:
        rows, cols = tile_indices(t, (h, w))
        tile = image[t.source.slices][np.ix_(rows, cols)]
        y, x = t.read.y + big, t.read.x + big
        np.testing.assert_array_equal(tile, reference[y : y + t.read.h, x : x + t.read.w])


@given(st.integers(-500, 500), st.integers(0, 300), st.integers(1, 60))
def test_mirror_indices_match_numpy_symmetric(start, length, n):
    axis = np.arange(n)
    pad = 900
    ref = np.pad(axis, pad, mode="symmetric")
    got = mirror_indices(start, start + length, n)
    np.testing.assert_array_equal(got, ref[start + pad : start + pad + length])


@given(st.integers(1, 2000), st.integers(1, 2000), st.sampled_from(NETS))
def test_whole_image_padding_gives_a_valid_size(h, w, net):
    halo, pooling, residue = net
    (t, b), (lft, r) = whole_image_padding((h, w), halo=halo, pooling=pooling, residue=residue)
    assert t == lft == halo
    for n, extra in ((h, b - halo), (w, r - halo)):
        assert 0 <= extra < pooling
        assert (n + extra) % pooling == residue % pooling


def test_single_tile_shrinks_to_the_image():
    grid = tile_grid((50, 3000), halo=92, output_tile=2004, pooling=16)
    assert grid.grid_shape == (1, 2)
    assert grid.output_shape == (68, 2004)
    assert grid.stride == (64, 2000)


def test_chunks_are_whole_tile_cores():
    grid = tile_grid((1000, 700), halo=92, output_tile=68, pooling=16)
    chunks = grid.chunks((8, 8))
    seen = set()
    for box, tiles in chunks:
        assert box.y % 512 == 0 and box.x % 512 == 0
        for t in tiles:
            w = t.write
            assert box.y <= w.y and w.y + w.h <= box.y + box.h
            assert box.x <= w.x and w.x + w.w <= box.x + box.w
            seen.add(t.index)
    assert len(seen) == len(grid)
    assert chunks[0][0] == Box(0, 0, 512, 512)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"halo": 92, "output_tile": 4, "pooling": 16}, "must be >= pooling"),
        ({"halo": -1, "output_tile": 388, "pooling": 16}, "halo"),
        ({"halo": 92, "output_tile": 388, "pooling": 0}, "pooling"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tile_grid((100, 100), **kwargs)


def test_zero_size_image_is_refused():
    with pytest.raises(ValueError, match="image height"):
        tile_grid((0, 10), halo=92, output_tile=388, pooling=16)


@given(
    depth=st.integers(1, 6),
    upsampling=st.sampled_from(["transpose", "bilinear"]),
    k=st.integers(0, 40),
)
def test_pooling_windows_leave_equal_margins_so_reversal_keeps_the_grid(depth, upsampling, k):
    """Every valid input is pooled from its two ends alike: a reversed (or transposed) tile is
    pooled in the same global cells (the argument of ``TTA_MODES``)."""
    from tilesegment.geometry import UNetGeometry

    g = UNetGeometry.of(depth, upsampling)
    n = g.valid_input_sizes(1, start=k)[0]
    margins = g.pooling_margins(n)
    assert [before for before, _ in margins] == [2 ** (i + 2) - 2 for i in range(depth)]
    assert all(before == after for before, after in margins), margins
    # The deepest cells, 2**depth px each, fill the rest exactly.
    assert (n - 2 * margins[-1][0]) % g.pooling == 0


def test_tta_modes_are_distinct_symmetries_with_inverses():
    from tilesegment.cli.options import tta_option
    from tilesegment.geometry import TTA_MODES, tta_symmetries

    assert list(TTA_MODES) == ["none", "flips", "d4"]
    assert set(TTA_MODES["flips"]) < set(TTA_MODES["d4"]) and TTA_MODES["d4"][0] == Symmetry()
    a = np.arange(5 * 5).reshape(5, 5)
    seen = set()
    for s in tta_symmetries("d4"):
        b = np.flip(a, s.flip_axes)
        b = b.T if s.transpose else b
        seen.add(b.tobytes())
        back = np.flip(b.T if s.transpose else b, s.flip_axes)  # inverse: transpose, then flip
        assert np.array_equal(back, a), s
    assert len(seen) == 8  # the whole dihedral group of the square
    choices = tta_option()(lambda tta: tta).__click_params__[0].type.choices
    assert list(choices) == list(TTA_MODES)  # the CLI offers exactly these
