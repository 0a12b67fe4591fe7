"""Pure tile arithmetic for a valid-convolution U-Net: halos, valid sizes, tile grids, mirror
indices.

This module works on shapes, never on pixels of a slide or on an ``nn.Module``, and imports only
numpy, the standard library and :mod:`tilesegment.errors`; planning a run or a training crop
needs nothing else. All boxes are ``(y, x, h, w)`` in the pixel grid of the level being
processed, half-open: rows ``y .. y + h - 1`` and columns ``x .. x + w - 1``.

The contract that makes tiled output identical to a whole-image pass:

* The whole image is mirror-padded (numpy ``"symmetric"``: the edge pixel is repeated) by the
  model's ``halo`` on every side, plus bottom/right padding up to the next valid size.
* Tile *origins* in that padded frame are multiples of the model's pooling factor ``2**depth``,
  so each tile sees the same pooling phase as the whole-image pass.
* Each tile writes only its ``stride``-sized core; the ``output - stride`` pixels it also
  computes are identical to the next tile's and are discarded.

>>> grid = tile_grid((1000, 700), halo=92, output_tile=388, pooling=16)
>>> grid.stride, grid.input_shape, grid.grid_shape
((384, 384), (572, 572), (3, 2))
>>> t = grid.tile(0, 0)
>>> t.read, t.pad, t.write
(Box(y=-92, x=-92, h=572, w=572), ((92, 0), (92, 0)), Box(y=0, x=0, h=384, w=384))
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tilesegment.errors import ConfigError

#: The one padding mode used everywhere: numpy's ``"symmetric"`` (``abc|cba``), which dask's
#: ``map_overlap`` calls ``"reflect"``. Ronneberger et al. mirror the border the same way.
PAD_MODE = "symmetric"


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box, half-open, in (y, x) order."""

    y: int
    """First row (inclusive); may be negative for boxes that extend past the image."""
    x: int
    """First column (inclusive); may be negative."""
    h: int
    """Number of rows; the last row is ``y + h - 1``."""
    w: int
    """Number of columns; the last column is ``x + w - 1``."""

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(slice(y, y + h), slice(x, x + w))`` for indexing a (y, x, ...) array."""
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)

    @property
    def shape(self) -> tuple[int, int]:
        return self.h, self.w


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile of a :class:`TileGrid`: where to read, how to pad, where to write."""

    index: tuple[int, int]
    """(row, column) of the tile in the grid."""
    read: Box
    """Input window in image coordinates; extends past the image by the pad widths."""
    source: Box
    """Part of the image to read so that :func:`tile_indices` can build ``read`` exactly:
    the bounding box of the mirrored indices of ``read``, always inside the image."""
    pad: tuple[tuple[int, int], tuple[int, int]]
    """How far ``read`` extends past the image: ((top, bottom), (left, right)), all >= 0."""
    write: Box
    """The core of the tile's output, in image coordinates, clipped to the image."""
    core: Box
    """Where ``write`` lies inside this tile's model output (offsets from its top-left)."""


@dataclass(frozen=True, slots=True)
class TileGrid:
    """The overlap-tile grid covering an image; every image pixel is written by exactly one tile."""

    image_shape: tuple[int, int]
    """(height, width) of the image in pixels."""
    halo: int
    """Pixels of context the model consumes on each side: ``input = output + 2 * halo``."""
    pooling: int
    """The model's total pooling factor ``2**depth``; tile origins are multiples of it."""
    output_shape: tuple[int, int]
    """(h, w) of every tile's model output (identical for all tiles)."""
    stride: tuple[int, int]
    """Distance between tile origins: a multiple of ``pooling`` and <= ``output_shape``."""

    @property
    def input_shape(self) -> tuple[int, int]:
        """(h, w) of every tile's model input."""
        return self.output_shape[0] + 2 * self.halo, self.output_shape[1] + 2 * self.halo

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Number of tiles along (y, x)."""
        return (
            max(1, math.ceil(self.image_shape[0] / self.stride[0])),
            max(1, math.ceil(self.image_shape[1] / self.stride[1])),
        )

    def __len__(self) -> int:
        gy, gx = self.grid_shape
        return gy * gx

    def __iter__(self) -> Iterator[Tile]:
        gy, gx = self.grid_shape
        for i in range(gy):
            for j in range(gx):
                yield self.tile(i, j)

    def tile(self, row: int, col: int) -> Tile:
        """The tile at grid position (row, col)."""
        gy, gx = self.grid_shape
        if not (0 <= row < gy and 0 <= col < gx):
            raise IndexError(f"tile ({row}, {col}) outside grid of shape {self.grid_shape}")
        ys = _axis_tile(row, self.image_shape[0], self.halo, self.output_shape[0], self.stride[0])
        xs = _axis_tile(col, self.image_shape[1], self.halo, self.output_shape[1], self.stride[1])
        (ry, ryn, sy, syn, py, wy, wyn), (rx, rxn, sx, sxn, px, wx, wxn) = ys, xs
        return Tile(
            index=(row, col),
            read=Box(ry, rx, ryn, rxn),
            source=Box(sy, sx, syn, sxn),
            pad=(py, px),
            write=Box(wy, wx, wyn, wxn),
            core=Box(0, 0, wyn, wxn),
        )

    def chunks(self, tiles_per_chunk: tuple[int, int]) -> list[tuple[Box, list[Tile]]]:
        """Group tiles into output chunks of ``tiles_per_chunk`` tile cores each.

        Returns, in row-major order, each chunk's box (image coordinates, clipped) and the
        tiles whose cores make it up. Chunk edges fall on tile-core boundaries, so a chunk is
        assembled from whole cores and no tile contributes to two chunks.
        """
        ky, kx = tiles_per_chunk
        if ky < 1 or kx < 1:
            raise ValueError(f"`tiles_per_chunk` ({tiles_per_chunk}) must be >= 1 on both axes")
        gy, gx = self.grid_shape
        out: list[tuple[Box, list[Tile]]] = []
        for ci in range(0, gy, ky):
            for cj in range(0, gx, kx):
                tiles = [
                    self.tile(i, j)
                    for i in range(ci, min(ci + ky, gy))
                    for j in range(cj, min(cj + kx, gx))
                ]
                y0, x0 = tiles[0].write.y, tiles[0].write.x
                y1 = max(t.write.y + t.write.h for t in tiles)
                x1 = max(t.write.x + t.write.w for t in tiles)
                out.append((Box(y0, x0, y1 - y0, x1 - x0), tiles))
        return out


def _axis_tile(
    i: int, n: int, halo: int, out: int, stride: int
) -> tuple[int, int, int, int, tuple[int, int], int, int]:
    """Read start/len, source start/len, pad widths, write start/len along one axis."""
    y0 = i * stride
    read0, read_len = y0 - halo, out + 2 * halo
    pad = (max(0, -read0), max(0, read0 + read_len - n))
    src = mirror_indices(read0, read0 + read_len, n)
    s0, s1 = int(src.min()), int(src.max()) + 1
    w_len = min(stride, n - y0)
    return read0, read_len, s0, s1 - s0, pad, y0, w_len


def _check_positive(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"`{name}` ({value}) must be a positive integer")


def tile_grid(
    image_shape: tuple[int, int],
    *,
    halo: int,
    output_tile: int | tuple[int, int],
    pooling: int,
) -> TileGrid:
    """Lay out the overlap-tile grid for an image.

    Parameters
    ----------
    image_shape : (H, W) tuple of int
        Image size in pixels, each >= 1.
    halo : int
        Context the model consumes on each side (``input = output + 2 * halo``).
    output_tile : int or (int, int)
        A valid model output size (e.g. 388 for a depth-4 U-Net with 572 px input).
    pooling : int
        Total pooling factor of the model, ``2**depth``.

    Returns
    -------
    TileGrid
        Strides are the largest multiple of ``pooling`` not above the output size. Along an
        axis that one tile covers, the tile shrinks to the smallest valid size that covers the
        image, so small images cost no more than a whole-image pass.
    """
    h, w = (int(v) for v in image_shape)
    _check_positive("image height", h)
    _check_positive("image width", w)
    _check_positive("pooling", pooling)
    if halo < 0:
        raise ValueError(f"`halo` ({halo}) must be >= 0")
    outs = (output_tile, output_tile) if isinstance(output_tile, int) else tuple(output_tile)
    shapes = []
    for n, out in zip((h, w), outs, strict=True):
        _check_positive("output_tile", out)
        residue = out % pooling
        stride = out - residue
        if stride < pooling:
            raise ValueError(
                f"`output_tile` ({out}) must be >= pooling + {residue} ({pooling + residue}) "
                "so that tiles advance"
            )
        # Along an axis covered by one tile, shrink it to the smallest valid size.
        stride = min(stride, pooling * math.ceil(n / pooling))
        shapes.append((stride + residue, stride))
    (oy, sy), (ox, sx) = shapes
    return TileGrid((h, w), int(halo), int(pooling), (oy, ox), (sy, sx))


def mirror_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices of positions ``start .. stop - 1`` of an axis of length ``n`` that is
    mirror-padded without limit in numpy's ``"symmetric"`` mode (``... c b a | a b c | c b a ...``).

    >>> mirror_indices(-3, 6, 3).tolist()
    [2, 1, 0, 0, 1, 2, 2, 1, 0]
    """
    _check_positive("n", n)
    k = np.mod(np.arange(start, stop, dtype=np.int64), 2 * n)
    return np.where(k < n, k, 2 * n - 1 - k)


def tile_indices(tile: Tile, image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices into ``image[tile.source.slices]`` that build ``tile.read``.

    ``block[np.ix_(*tile_indices(tile, image.shape[:2]))]`` equals the ``read`` window of the
    image mirror-padded without limit, as :func:`whole_image_padding` pads it for a whole-image
    pass.
    """
    rows = mirror_indices(tile.read.y, tile.read.y + tile.read.h, image_shape[0])
    cols = mirror_indices(tile.read.x, tile.read.x + tile.read.w, image_shape[1])
    return rows - tile.source.y, cols - tile.source.x


def whole_image_padding(
    image_shape: tuple[int, int], *, halo: int, pooling: int, residue: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pad widths for a whole-image pass: ``halo`` on every side plus bottom/right padding so
    the padded size is a valid input (output size congruent to ``residue`` mod ``pooling``).

    >>> whole_image_padding((1000, 700), halo=92, pooling=16, residue=4)
    ((92, 104), (92, 100))
    """
    pads = []
    for n in image_shape:
        extra = (residue - n) % pooling
        pads.append((halo, halo + extra))
    return pads[0], pads[1]


# ---------------------------------------------------------------------------------------------
# the U-Net's size arithmetic


def _unet_walk(n: int, depth: int, up_crop: int) -> int | None:
    """Output size for input size ``n`` along one axis, or None if ``n`` is invalid.

    Two 3x3 valid convolutions (-4) then a 2x2 pooling (/2, even sizes only) per level down, two
    convolutions at the bottom, and per level up a 2x up-sampling (minus ``up_crop`` px) and two
    convolutions.
    """
    for _ in range(depth):
        n -= 4
        if n <= 0 or n % 2:
            return None
        n //= 2
    n -= 4
    if n <= 0:
        return None
    for _ in range(depth):
        n = 2 * n - up_crop - 4
        if n <= 0:
            return None
    return n


@dataclass(frozen=True, slots=True)
class UNetGeometry:
    """The sizes a valid U-Net accepts and returns, from its depth and up-sampling alone.

    >>> g = UNetGeometry.of(depth=4)
    >>> g.halo, g.pooling, g.output_size(572), g.input_size(388), g.valid_input_sizes(3)
    (92, 16, 388, 572, [188, 204, 220])
    """

    depth: int
    """Number of 2x2 poolings."""
    min_input: int
    """Smallest valid input size in px; valid sizes are ``min_input + pooling * k``."""
    halo: int
    """Pixels lost on each side: output = input - 2 * halo."""

    @classmethod
    def of(cls, depth: int, upsampling: str = "transpose") -> UNetGeometry:
        """The geometry of a U-Net of ``depth`` with ``"transpose"`` or ``"bilinear"`` up-sampling
        (bilinear crops the 1 px border that sees the up-sampler's edge clamping)."""
        crop = 2 if upsampling == "bilinear" else 0
        n = 1
        while _unet_walk(n, depth, crop) is None:
            n += 1
        return cls(depth, n, (n - _unet_walk(n, depth, crop)) // 2)  # type: ignore[operator]

    @property
    def pooling(self) -> int:
        """Total pooling factor ``2**depth``: valid sizes and tile origins step by it."""
        return 2**self.depth

    def is_valid_input(self, n: int) -> bool:
        """Whether ``n`` px along an axis is a valid input size."""
        return n >= self.min_input and (n - self.min_input) % self.pooling == 0

    def valid_input_sizes(self, count: int, start: int = 0) -> list[int]:
        """The ``count`` valid input sizes from the ``start``-th one (smallest first)."""
        return [self.min_input + self.pooling * k for k in range(start, start + count)]

    def nearest_valid_inputs(self, n: int) -> tuple[int, ...]:
        """The valid input sizes just below and above ``n`` (one if ``n`` is below the minimum)."""
        if n <= self.min_input:
            return (self.min_input,)
        k = (n - self.min_input) // self.pooling
        lo = self.min_input + k * self.pooling
        return (lo,) if lo == n else (lo, lo + self.pooling)

    def check_input_size(self, n: int, *, name: str = "input size") -> None:
        """Raise :class:`ConfigError` naming the nearest valid sizes when ``n`` is invalid."""
        if not self.is_valid_input(n):
            near = " or ".join(str(v) for v in self.nearest_valid_inputs(n))
            raise ConfigError(
                f"{name} {n} px is not valid for this U-Net (depth {self.depth}: "
                f"{self.min_input} + {self.pooling}k); nearest valid: {near}"
            )

    def output_size(self, input_size: int) -> int:
        """Output size along an axis for a valid ``input_size``."""
        self.check_input_size(input_size)
        return input_size - 2 * self.halo

    def pooling_margins(self, input_size: int) -> list[tuple[int, int]]:
        """Per pooling level, the px of a valid input before its first and after its last
        2x2 pooling window (the pixels whose features that level's pooling leaves out).

        A level-``l`` feature (0-based) stands for ``2**l`` input px; the two valid
        convolutions before each pooling take one feature off each side. Both margins are
        equal: every pooled map of a valid input has an even size, so the windows cover it
        exactly from either end, and a tile read reversed (or transposed) is pooled in the same
        cells as read forwards (see :data:`TTA_MODES`).

        >>> g = UNetGeometry.of(depth=4)
        >>> g.pooling_margins(188)
        [(2, 2), (6, 6), (14, 14), (30, 30)]
        >>> g.pooling_margins(572)[-1], 572 - 2 * 30
        ((30, 30), 512)
        """
        self.check_input_size(input_size)
        margins, start, n = [], 0, input_size
        for level in range(self.depth):
            start, n = start + 2 * 2**level, n - 4  # two 3x3 valid convolutions
            margins.append((start, input_size - start - n * 2**level))
            n //= 2
        return margins

    def input_size(self, output_size: int) -> int:
        """Input size along an axis that yields ``output_size`` (which must be reachable)."""
        n = output_size + 2 * self.halo
        if not self.is_valid_input(n):
            lo = self.min_input - 2 * self.halo
            raise ConfigError(
                f"output size {output_size} px is not reachable (valid outputs: "
                f"{lo} + {self.pooling}k)"
            )
        return n


# ---------------------------------------------------------------------------------------------
# test-time augmentation: the dihedral group D4 on (y, x)


@dataclass(frozen=True, slots=True)
class Symmetry:
    """One element of the dihedral group D4 acting on the last two axes (y, x) of an array:
    reverse the rows if ``flip_y``, the columns if ``flip_x``, then swap y and x if
    ``transpose``. Its inverse undoes the transpose first, then the flips.

    The four without ``transpose`` are the identity, the two mirrors and the 180° rotation; the
    four with it are the two diagonal mirrors and the 90° and 270° rotations.
    """

    flip_y: bool = False
    """Reverse the rows (axis -2)."""
    flip_x: bool = False
    """Reverse the columns (axis -1)."""
    transpose: bool = False
    """Swap axes -2 and -1, after the flips."""

    @property
    def flip_axes(self) -> tuple[int, ...]:
        """The axes to reverse: a subset of ``(-2, -1)``."""
        return tuple(a for a, on in ((-2, self.flip_y), (-1, self.flip_x)) if on)


#: Test-time augmentation: the symmetries a predictor averages its softmax probabilities over,
#: by name (``--tta``), the identity first. ``flips``: identity, mirrors, 180° rotation (4
#: forward passes); ``d4``: those and their transposes, i.e. every flip and 90° rotation (8).
#:
#: Why the tiled output stays identical to a whole-image pass. A tile's input starts at a
#: multiple of the pooling factor ``2**depth`` in the whole image's padded frame, and its size
#: is valid: every pooled map is of even size, so the 2x2 windows of level ``l`` cover the
#: input from ``m_l = 2**(l + 1) - 2`` px after its start to ``m_l`` px before its end
#: (:meth:`UNetGeometry.pooling_margins`; 2, 6, 14, 30 px at depth 4, so 572 = 30 + 32 * 16 +
#: 30). Reversing the tile maps those windows onto themselves: the network run on a flipped
#: tile pools exactly the cells of the global pooling grid that the unflipped tile pools, only
#: visited from the other end; no padding or cropping is needed and no cell depends on the
#: tile's size or position. A transpose swaps the axes, and both axes keep the grid (origins
#: and sizes obey the same rules along y and x). So each ``g^-1(f(g(tile)))`` equals
#: ``g^-1(f(g(padded image)))`` on the tile's output, for every tile size, engine and the
#: whole-image reference (:func:`~tilesegment.infer.predict.predict_image`), and so does their
#: average, summed in this fixed order.
#:
#: The transform is applied to the *mirror-padded* input (the tile, or the whole image padded
#: by :func:`whole_image_padding`), not to the image before padding: flipping an image whose
#: size is not ``residue`` mod ``pooling`` and padding it afterwards would put the extra
#: bottom/right padding on the other side and shift the grid.
TTA_MODES: dict[str, tuple[Symmetry, ...]] = {
    "none": (Symmetry(),),
    "flips": tuple(Symmetry(fy, fx) for fy in (False, True) for fx in (False, True)),
    "d4": tuple(
        Symmetry(fy, fx, t) for t in (False, True) for fy in (False, True) for fx in (False, True)
    ),
}


def tta_symmetries(mode: str) -> tuple[Symmetry, ...]:
    """The symmetries of test-time augmentation ``mode`` (a key of :data:`TTA_MODES`).

    >>> [len(tta_symmetries(m)) for m in ("none", "flips", "d4")]
    [1, 4, 8]
    """
    try:
        return TTA_MODES[mode]
    except (KeyError, TypeError):
        names = ", ".join(TTA_MODES)
        raise ConfigError(f"--tta {mode!r} must be one of {names}") from None
