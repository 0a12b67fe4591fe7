"""Tissue detection on a low-resolution view of the slide, and which tiles it lets through.

The mask is computed once per run on a thumbnail (at most :data:`THUMBNAIL_PX` on its long
side): a pixel is tissue when its saturation or its darkness exceeds an Otsu threshold capped
at values glass never reaches, then small specks are removed and the mask is dilated so that
tissue edges are never skipped. A tile is processed when any tissue pixel falls inside its
*input* window (halo included), so every output pixel on tissue is exactly what a run without
masking computes.

Small images are all tissue: when either side of the image is shorter than
:data:`MIN_DETECT_PX` (2048 px, the thumbnail size), nothing is detected and every tile is
computed. Such an image is cheap to segment whole, while the morphology above would erase
tissue narrower than a few thumbnail pixels (a 3 px strip, a 1 x 1 image).

The thumbnail is read in bounded memory whatever the file's pyramid: readers that can
(:class:`~tilesegment.io.base.StridedReader`: TIFF and Zarr) decode one tile at a time and
keep its samples; others are read in blocks of at most :data:`THUMBNAIL_BLOCK_PX` square.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.io.base import SlideInfo, SlideReader, StridedReader

log = logging.getLogger(__name__)

#: Long side of the thumbnail the tissue mask is computed on.
THUMBNAIL_PX = 2048
#: An image with a side shorter than this (px of level 0) is all tissue: no detection.
MIN_DETECT_PX = THUMBNAIL_PX
#: Largest block edge (px) read at once for a thumbnail by readers without ``read_strided``.
THUMBNAIL_BLOCK_PX = 2048
#: Saturation (0-1) above which a pixel is tissue even if Otsu puts the threshold higher; glass
#: and background stay below it.
MAX_SATURATION_THRESHOLD = 0.08
#: Gray level (0-255) below which a pixel is tissue even if Otsu puts the threshold lower.
MIN_DARKNESS_THRESHOLD = 215
#: Largest relative difference between the aspect ratios (h / w) of a user's tissue mask and of
#: the slide that is accepted; a mask may also be off by the rounding of one of its pixels.
MASK_ASPECT_TOLERANCE = 0.02


def thumbnail_grid(info: SlideInfo, *, max_px: int = THUMBNAIL_PX) -> tuple[int, int]:
    """(level, step) of the thumbnail: the coarsest level with a long side of at least
    ``max_px`` (or level 0), sampled every ``step`` px so that the long side is <= ``max_px``.

    >>> from tilesegment.io.base import SlideInfo
    >>> info = SlideInfo(Path("s"), "tiff", "t", ((60000, 40000),), (1.0,), None, 3)
    >>> thumbnail_grid(info)
    (0, 30)
    """
    level = 0
    for lv, (h, w) in enumerate(info.level_shapes):
        if max(h, w) >= max_px:
            level = lv
    h, w = info.level_shapes[level]
    return level, max(1, math.ceil(max(h, w) / max_px))


def read_thumbnail(reader: SlideReader, *, max_px: int = THUMBNAIL_PX) -> tuple[np.ndarray, int]:
    """A thumbnail of ``reader`` (long side <= ``max_px``) and its level.

    The thumbnail holds the pixels (o + i * step, o + j * step) of the level chosen by
    :func:`thumbnail_grid`, with o = step // 2 (or the last row / column of a level thinner
    than that). Memory is bounded whatever the level's size: a
    :class:`~tilesegment.io.base.StridedReader` decodes one tile at a time; any other reader is
    read in blocks of at most :data:`THUMBNAIL_BLOCK_PX` px square.
    """
    level, step = thumbnail_grid(reader.info, max_px=max_px)
    h, w = reader.info.level_shapes[level]
    y0, x0 = min(step // 2, h - 1), min(step // 2, w - 1)
    if isinstance(reader, StridedReader):
        return reader.read_strided(level, y0, x0, step), level
    return _read_blocks(reader, level, y0, x0, step), level


def _read_blocks(reader: SlideReader, level: int, y0: int, x0: int, step: int) -> np.ndarray:
    """The samples of :func:`read_thumbnail` through ``read_region``, one bounded block at a
    time; each block spans only the rows and columns from its first sample to its last."""
    h, w = reader.info.level_shapes[level]
    ys, xs = np.arange(y0, h, step), np.arange(x0, w, step)
    out = np.empty((len(ys), len(xs), reader.info.channels), dtype=np.uint8)
    k = max(1, THUMBNAIL_BLOCK_PX // step)  # samples per block edge
    for i in range(0, len(ys), k):
        ya, yb = int(ys[i]), int(ys[min(i + k, len(ys)) - 1])
        for j in range(0, len(xs), k):
            xa, xb = int(xs[j]), int(xs[min(j + k, len(xs)) - 1])
            block = reader.read_region(level, ya, xa, yb - ya + 1, xb - xa + 1)
            out[i : i + k, j : j + k] = block[::step, ::step]
    return out


def detect_tissue(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an (h, w, C) uint8 thumbnail (C = 3: H&E-like; C = 1: all tissue).

    Grayscale images (EM, fluorescence) have no glass to find: everything counts as tissue.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    if thumbnail.shape[-1] == 1:
        return np.ones(thumbnail.shape[:2], dtype=bool)
    rgb = thumbnail.astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0)
    gray = rgb.mean(axis=-1)
    t_sat = MAX_SATURATION_THRESHOLD
    t_gray = MIN_DARKNESS_THRESHOLD
    if np.ptp(sat) > 0:
        t_sat = min(float(threshold_otsu(sat)), MAX_SATURATION_THRESHOLD)
    if np.ptp(gray) > 0:
        t_gray = max(float(threshold_otsu(gray)), MIN_DARKNESS_THRESHOLD)
    mask = (sat > t_sat) | (gray < t_gray)
    mask = ndimage.binary_opening(mask, iterations=1)
    min_size = max(4, mask.size // 20000)
    mask = remove_small_objects(mask, max_size=min_size)
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_dilation(mask, iterations=2)


def auto_tissue(thumbnail: np.ndarray, image_shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The ``--tissue auto`` mask of an image of ``image_shape`` (h, w) from its thumbnail,
    and how it was made (for the log and the run report).

    All tissue when a side of the image is shorter than :data:`MIN_DETECT_PX` (see the module
    notes); otherwise :func:`detect_tissue`.

    >>> mask, how = auto_tissue(np.full((1, 1, 3), 255, np.uint8), (1, 1))
    >>> mask.tolist(), how
    ([[True]], 'all tissue: the image (1 x 1 px) has a side shorter than 2048 px')
    """
    h, w = image_shape
    th, tw = thumbnail.shape[:2]
    if min(h, w) < MIN_DETECT_PX:
        how = f"all tissue: the image ({h} x {w} px) has a side shorter than {MIN_DETECT_PX} px"
        return np.ones((th, tw), dtype=bool), how
    return detect_tissue(thumbnail), f"detected on a {th} x {tw} px thumbnail"


def check_mask_aspect(
    mask_shape: tuple[int, int], slide_shape: tuple[int, int], *, name: str, slide: str
) -> None:
    """Refuse a tissue mask whose aspect ratio is not the slide's (a transposed or cropped mask).

    Accepted: aspect ratios (h / w) within :data:`MASK_ASPECT_TOLERANCE` of each other, or a
    mask whose height (or width) is within one pixel of the slide's aspect applied to its
    width (or height), which any downsampling with rounding gives.

    >>> check_mask_aspect((23, 17), (2967, 2220), name="m.png", slide="s.svs")  # 1/128
    >>> check_mask_aspect((2220, 2967), (2967, 2220), name="m", slide="s")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tilesegment.errors.ConfigError: --tissue m: the mask is 2220 x 2967 px (h x w) but ...
    """
    mh, mw = mask_shape
    h, w = slide_shape
    want_h, want_w = mw * h / w, mh * w / h
    if abs(mh - want_h) <= max(1.0, MASK_ASPECT_TOLERANCE * want_h):
        return
    if abs(mw - want_w) <= max(1.0, MASK_ASPECT_TOLERANCE * want_w):
        return
    raise ConfigError(
        f"--tissue {name}: the mask is {mh} x {mw} px (h x w) but the slide {slide} is "
        f"{h} x {w} px: aspect ratios (h / w) {mh / mw:.3f} and {h / w:.3f} differ by more "
        f"than {MASK_ASPECT_TOLERANCE:.0%} (transposed or cropped?); give a mask of the "
        "slide's shape, at any scale"
    )


def load_tissue_mask(path: Path, slide: SlideInfo) -> np.ndarray:
    """A user-supplied mask image or Zarr array of ``slide`` (any resolution, the slide's aspect
    ratio: see :func:`check_mask_aspect`); nonzero = tissue. Read at its coarsest level."""
    from tilesegment.io import open_slide

    with open_slide(path) as reader:
        level = reader.info.level_count - 1
        h, w = reader.info.level_shapes[level]
        check_mask_aspect((h, w), slide.shape, name=str(path), slide=slide.path.name)
        if h * w > 200e6:
            raise ConfigError(
                f"{path}: tissue mask of {h} x {w} px is too large; give a downsampled mask"
            )
        return reader.read_region(level, 0, 0, h, w).max(axis=-1) > 0


class TissueMap:
    """A tissue mask registered to the image being segmented, by the ratio of their shapes.

    Picklable in a compact form: the mask 8 pixels a byte and the two shapes. The summed-area
    table behind :meth:`any_in` (8 bytes a mask pixel) is built on its first use, so neither
    the pickle nor a process that only renders (a pool worker) carries it. The pool sends the
    map to every worker at start-up: for an 80000² slide (a 2000² thumbnail mask) that is
    0.5 MB instead of 36 MB.
    """

    def __init__(self, mask: np.ndarray, image_shape: tuple[int, int]) -> None:
        self.mask = mask.astype(bool)
        self.image_shape = image_shape
        self._fy = mask.shape[0] / image_shape[0]
        self._fx = mask.shape[1] / image_shape[1]

    @functools.cached_property
    def _sat(self) -> np.ndarray:
        """Summed-area table of the mask: any tissue in a window is one O(1) lookup."""
        return np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray, tuple[int, int], tuple[int, int]]]:
        h, w = self.mask.shape
        return TissueMap.unpack, (np.packbits(self.mask, axis=None), (h, w), self.image_shape)

    @classmethod
    def unpack(
        cls, bits: np.ndarray, mask_shape: tuple[int, int], image_shape: tuple[int, int]
    ) -> TissueMap:
        """The map of a mask of ``mask_shape`` packed by ``np.packbits(mask, axis=None)``.

        >>> import pickle
        >>> tmap = TissueMap(np.eye(3, dtype=bool), (300, 300))
        >>> back = pickle.loads(pickle.dumps(tmap))
        >>> back.mask.tolist() == tmap.mask.tolist(), back.image_shape
        (True, (300, 300))
        """
        h, w = mask_shape
        return cls(np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool), image_shape)

    @property
    def fraction(self) -> float:
        """Fraction of the mask that is tissue (0 when it is empty)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def found(self) -> bool:
        """Whether the mask holds any tissue at all."""
        return bool(self.mask.any())

    def any_in(self, box: Box) -> bool:
        """Whether the image box (may extend past the image) touches any tissue."""
        h, w = self.mask.shape
        y0 = min(h, max(0, math.floor(box.y * self._fy)))
        x0 = min(w, max(0, math.floor(box.x * self._fx)))
        y1 = min(h, max(0, math.ceil((box.y + box.h) * self._fy)))
        x1 = min(w, max(0, math.ceil((box.x + box.w) * self._fx)))
        if y1 <= y0 or x1 <= x0:
            return False
        s = self._sat
        return bool(s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0] > 0)

    def render(self, box: Box) -> np.ndarray:
        """The mask resampled (nearest, from global pixel centres) onto an image box, uint8."""
        ys = np.clip(((np.arange(box.y, box.y + box.h) + 0.5) * self._fy).astype(int), 0, None)
        xs = np.clip(((np.arange(box.x, box.x + box.w) + 0.5) * self._fx).astype(int), 0, None)
        ys = np.minimum(ys, self.mask.shape[0] - 1)
        xs = np.minimum(xs, self.mask.shape[1] - 1)
        return self.mask[np.ix_(ys, xs)].astype(np.uint8)
