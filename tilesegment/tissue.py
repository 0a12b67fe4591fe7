"""Tissue detection on a low-resolution view of the slide, and which tiles it lets through.

The mask is computed once per run on a thumbnail (at most :data:`THUMBNAIL_PX` on its long
side): a pixel is tissue when its saturation or its darkness exceeds an Otsu threshold capped
at values glass never reaches, then small specks are removed and the mask is dilated so that
tissue edges are never skipped. A tile is processed when any tissue pixel falls inside its
*input* window (halo included), so every output pixel on tissue is exactly what a run without
masking computes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.io.base import SlideReader

log = logging.getLogger(__name__)

#: Long side of the thumbnail the tissue mask is computed on.
THUMBNAIL_PX = 2048
#: Saturation (0-1) above which a pixel is tissue even if Otsu puts the threshold higher; glass
#: and background stay below it.
MAX_SATURATION_THRESHOLD = 0.08
#: Gray level (0-255) below which a pixel is tissue even if Otsu puts the threshold lower.
MIN_DARKNESS_THRESHOLD = 215


def read_thumbnail(reader: SlideReader, *, max_px: int = THUMBNAIL_PX) -> tuple[np.ndarray, int]:
    """A thumbnail of ``reader`` (long side <= ``max_px`` where possible) and its level.

    Uses the coarsest pyramid level with a long side of at least ``max_px`` (or level 0) and
    decimates it by an integer factor, reading in row bands so memory stays bounded.
    """
    info = reader.info
    level = 0
    for lv, (h, w) in enumerate(info.level_shapes):
        if max(h, w) >= max_px:
            level = lv
    h, w = info.level_shapes[level]
    step = max(1, math.ceil(max(h, w) / max_px))
    band = step * max(1, 4096 // step)
    rows = []
    for y in range(0, h, band):
        bh = min(band, h - y)
        block = reader.read_region(level, y, 0, bh, w)
        rows.append(block[step // 2 :: step, step // 2 :: step])
    return np.concatenate(rows, axis=0), level


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


def load_tissue_mask(path: Path) -> np.ndarray:
    """A user-supplied mask image or Zarr array (any resolution covering the slide); nonzero =
    tissue. Read at its coarsest level."""
    from tilesegment.io import open_slide

    with open_slide(path) as reader:
        level = reader.info.level_count - 1
        h, w = reader.info.level_shapes[level]
        if h * w > 200e6:
            raise ConfigError(
                f"{path}: tissue mask of {h} x {w} px is too large; give a downsampled mask"
            )
        return reader.read_region(level, 0, 0, h, w).max(axis=-1) > 0


class TissueMap:
    """A tissue mask registered to the image being segmented, by the ratio of their shapes."""

    def __init__(self, mask: np.ndarray, image_shape: tuple[int, int]) -> None:
        self.mask = mask.astype(bool)
        self.image_shape = image_shape
        self._fy = mask.shape[0] / image_shape[0]
        self._fx = mask.shape[1] / image_shape[1]
        # Summed-area table: any tissue in a window is one O(1) lookup.
        self._sat = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

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
