"""Reading a slide at a target resolution: choose the pyramid level, then resample.

Resampling is a pure function of *global* pixel coordinates: output pixel ``i`` samples the
source at ``(i + 0.5) * s - 0.5`` (``s`` = source px per output px) with a separable triangle
(linear) kernel widened to ``s`` px when downsampling (antialiasing), and source indices
clamped to the image edge. Every output pixel therefore has the same value whichever box it is
read in, so tiles of a resampled slide stitch exactly like tiles of a native one.

>>> scale_and_shape((1000, 700), 0.5, 0.75)
(1.5, (667, 467))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.io.base import ReaderBase, SlideInfo, SlideReader

if TYPE_CHECKING:
    from scipy import sparse

log = logging.getLogger(__name__)

#: Relative difference of µm/px below which a level is used as is, without resampling
#: (0.499 vs 0.5 µm/px is the same magnification to any model).
MPP_TOLERANCE = 0.03


def choose_level(info: SlideInfo, target_mpp: float, *, mpp: float) -> int:
    """The coarsest level whose µm/px is at or finer than ``target_mpp`` (within tolerance).

    ``mpp`` is level 0's µm/px (the file's or the user's).
    """
    best = 0
    for level, ds in enumerate(info.level_downsamples):
        if mpp * ds <= target_mpp * (1 + MPP_TOLERANCE):
            best = level if ds >= info.level_downsamples[best] else best
    return best


def scale_and_shape(
    shape: tuple[int, int], source_mpp: float, target_mpp: float
) -> tuple[float, tuple[int, int]]:
    """Source px per output px, and the output shape (rounded, at least 1 px)."""
    s = target_mpp / source_mpp
    return s, (max(1, round(shape[0] / s)), max(1, round(shape[1] / s)))


def _weights(start: int, n: int, scale: float, size: int) -> tuple[int, sparse.csr_array]:
    """First source index and the sparse (n, k) weights of output positions start..start+n-1.

    Each output position's taps and weights depend only on its global index, so a pixel gets
    bit-identical values in every box that contains it.
    """
    from scipy import sparse  # only resampled reads need it (~0.1 s to import)

    centres = (np.arange(start, start + n, dtype=np.float64) + 0.5) * scale - 0.5
    support = max(scale, 1.0)  # kernel half-width in source px
    taps = math.ceil(2 * support) + 1
    first_tap = np.floor(centres - support).astype(np.int64) + 1
    src = first_tap[:, None] + np.arange(taps)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(src - centres[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    idx = np.clip(src, 0, size - 1)  # out-of-range taps read the edge pixel
    first = int(idx.min())
    rows = np.repeat(np.arange(n), taps)
    m = sparse.csr_array(
        (w.ravel(), (rows, (idx - first).ravel())), shape=(n, int(idx.max()) - first + 1)
    )
    m.sum_duplicates()
    return first, m


def _apply(wy: sparse.csr_array, wx: sparse.csr_array, block: np.ndarray) -> np.ndarray:
    """(h, w, C) float64: the (rows, cols, C) ``block`` weighted by ``wy`` (h, rows) and ``wx``
    (w, cols)."""
    rows, cols, c = block.shape
    h, w = wy.shape[0], wx.shape[0]
    # Rows first: (h, rows) @ (rows, cols * C); then columns: (w, cols) @ (cols, h * C).
    tmp = wy @ block.reshape(rows, cols * c).astype(np.float64)
    tmp = tmp.reshape(h, cols, c).transpose(1, 0, 2).reshape(cols, h * c)
    return (wx @ tmp).reshape(w, h, c).transpose(1, 0, 2)


def resample_region(
    read: Callable[[int, int, int, int], np.ndarray],
    source_shape: tuple[int, int],
    box: tuple[int, int, int, int],
    scale: float,
) -> np.ndarray:
    """The (h, w, C) float64 values of output box ``(y, x, h, w)`` of a resampled array.

    ``read(y, x, h, w)`` returns the (h, w, C) source block at those source coordinates (a
    reader's level, a stored array); ``source_shape`` is the source's (H, W) and ``scale`` its
    px per output px. Output pixel ``i`` depends only on its global index, so any box gives
    the pixels :func:`resample_array` gives for the whole array, bit for bit.
    """
    y, x, h, w = box
    y0, wy = _weights(y, h, scale, source_shape[0])
    x0, wx = _weights(x, w, scale, source_shape[1])
    return _apply(wy, wx, read(y0, x0, wy.shape[1], wx.shape[1]))


def nearest_indices(start: int, n: int, scale: float, size: int) -> np.ndarray:
    """Source indices of output positions ``start .. start + n - 1`` sampled at their centres
    (``(i + 0.5) * scale - 0.5``, rounded half up, clamped to ``0 .. size - 1``): the point the
    resampling kernel is centred on, for values that must not be mixed (class or object ids).

    >>> nearest_indices(0, 4, 3.0, 12).tolist(), nearest_indices(0, 3, 2.0, 6).tolist()
    ([1, 4, 7, 10], [1, 3, 5])
    """
    centres = (np.arange(start, start + n, dtype=np.float64) + 0.5) * scale - 0.5
    return np.clip(np.floor(centres + 0.5).astype(np.int64), 0, size - 1)


def nearest_array(array: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """``array`` (H, W[, ...]) sampled onto ``shape`` at the kernel centres of
    :func:`resample_array` (:func:`nearest_indices`): every value is one of ``array``'s."""
    rows = nearest_indices(0, shape[0], scale, array.shape[0])
    cols = nearest_indices(0, shape[1], scale, array.shape[1])
    return np.ascontiguousarray(array[np.ix_(rows, cols)])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Resampled pixel values rounded and clipped to C-contiguous uint8 (as the reader does)."""
    return np.ascontiguousarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def resample_array(array: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """``array`` resampled onto ``shape`` with the kernel of :class:`ResampledReader`.

    Parameters
    ----------
    array : (H, W, C) ndarray
        Any real dtype (computed in float64).
    shape : (h, w) tuple of int
        Output shape.
    scale : float
        ``array`` px per output px: output pixel ``i`` samples ``array`` at
        ``(i + 0.5) * scale - 0.5`` (global coordinates, edge clamped).

    Returns
    -------
    (h, w, C) float64 ndarray

    >>> row = np.arange(4.0).reshape(1, 4, 1)
    >>> resample_array(row, (1, 8), 0.5)[..., 0].tolist()
    [[0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]]
    >>> resample_array(row, (1, 2), 2.0)[..., 0].tolist()  # antialiased
    [[0.625, 2.375]]
    """
    if array.ndim != 3:
        raise ConfigError(f"`array` must be (H, W, C), got shape {array.shape}")
    if scale <= 0:
        raise ConfigError(f"`scale` ({scale}) must be positive")
    y0, wy = _weights(0, shape[0], scale, array.shape[0])
    x0, wx = _weights(0, shape[1], scale, array.shape[1])
    block = array[y0 : y0 + wy.shape[1], x0 : x0 + wx.shape[1]]
    return _apply(wy, wx, block)


def resample_probabilities(
    probabilities: np.ndarray, shape: tuple[int, int], scale: float
) -> np.ndarray:
    """(C, h, w) float32 class probabilities moved onto ``shape`` with :func:`resample_array`.

    ``scale`` is source px per output px (a model grid brought back to an image's own grid:
    model px per image px). The kernel's weights are non-negative and sum to 1, so the result
    still sums to 1 over the classes.
    """
    moved = resample_array(probabilities.transpose(1, 2, 0), shape, scale)
    return np.ascontiguousarray(moved.transpose(2, 0, 1), dtype=np.float32)


class ResampledReader(ReaderBase):
    """A one-level view of ``reader``'s ``level`` resampled to ``target_mpp``.

    Satisfies the :class:`~tilesegment.io.base.SlideReader` protocol (level 0 only). Thread-safe
    if the wrapped reader is. Closing it closes the wrapped reader.
    """

    def __init__(
        self, reader: SlideReader, level: int, *, source_mpp: float, target_mpp: float
    ) -> None:
        if source_mpp <= 0 or target_mpp <= 0:
            raise ConfigError(f"µm/px must be positive (got {source_mpp} and {target_mpp})")
        self.reader = reader
        self.level = level
        src_shape = reader.info.level_shapes[level]
        self.scale, shape = scale_and_shape(src_shape, source_mpp, target_mpp)
        self._src_shape = src_shape
        base = reader.info
        self.info = SlideInfo(
            path=base.path,
            backend=base.backend,
            vendor=base.vendor,
            level_shapes=(shape,),
            level_downsamples=(1.0,),
            mpp=(target_mpp, target_mpp),
            channels=base.channels,
            properties=base.properties,
        )

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        if level != 0:
            raise ConfigError(f"a resampled slide has only level 0 (asked for {level})")
        hh, ww = self.info.level_shapes[0]
        if h < 1 or w < 1 or y < 0 or x < 0 or y + h > hh or x + w > ww:
            raise ConfigError(f"box {(y, x, h, w)} is outside the resampled image {(hh, ww)}")
        return to_uint8(resample_region(self._read, self._src_shape, (y, x, h, w), self.scale))

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.reader.read_region(self.level, y, x, h, w)

    def close(self) -> None:
        self.reader.close()
