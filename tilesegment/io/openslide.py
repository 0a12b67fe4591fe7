"""Vendor whole-slide images (svs, ndpi, mrxs, scn, vms, bif, ...) through OpenSlide.

This is the only module that knows OpenSlide's conventions: (x, y) order, (width, height) sizes
and locations given in level-0 pixels. Everything it returns is (y, x) and level-local.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import numpy as np
import openslide

from tilesegment.io.base import DecodeWarning, ReaderBase, SlideInfo
from tilesegment.io.common import (
    check_box,
    composite_on_white,
    describe,
    make_info,
    plausible_mpp,
    region_error,
    slide_error,
)

logger = logging.getLogger(__name__)

__all__ = ["OpenSlideReader", "detect_vendor"]


def detect_vendor(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path`` (``"aperio"``, ``"generic-tiff"``...), or None.

    Cheap: OpenSlide only inspects the file's header. Returns None when OpenSlide does not
    recognise the file or cannot inspect it.
    """
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as exc:
        logger.debug("%s: openslide could not inspect the file (%s)", path, describe(exc))
        return None


def _mpp(path: Path, properties: dict[str, str], vendor: str) -> tuple[float, float] | None:
    """Level-0 (y, x) µm/px from ``openslide.mpp-y/x``, or None when absent or unusable."""
    raw_y = properties.get(openslide.PROPERTY_NAME_MPP_Y)
    raw_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
    if raw_y is None or raw_x is None:
        return None
    try:
        mpp_y, mpp_x = float(raw_y), float(raw_x)
    except ValueError:
        logger.debug("%s: ignoring unparsable mpp (%r, %r)", path, raw_y, raw_x)
        return None
    if not (math.isfinite(mpp_y) and math.isfinite(mpp_x) and mpp_y > 0 and mpp_x > 0):
        logger.debug("%s: ignoring non-positive mpp (%r, %r)", path, raw_y, raw_x)
        return None
    if vendor == "generic-tiff":
        # OpenSlide derives generic-TIFF mpp from the resolution tags: apply the same
        # plausibility rule as the tifffile backend, so a 72 dpi default is not taken as truth.
        return plausible_mpp(path, mpp_y, mpp_x, source="TIFF resolution tag")
    return mpp_y, mpp_x


class OpenSlideReader(ReaderBase):
    """A :class:`~tilesegment.io.base.SlideReader` over ``openslide.OpenSlide``.

    Parameters
    ----------
    path : Path
        A slide OpenSlide can open (see :func:`detect_vendor`).

    Notes
    -----
    Lifecycle: the slide is opened in the constructor and released by :meth:`close` (or the
    ``with`` block). Thread-safety: OpenSlide documents every C function except ``close`` as
    thread-safe, and concurrent ``openslide_read_region`` calls on one handle run in parallel
    (ctypes releases the GIL), so ``read_region`` takes no lock; ``close`` must not race reads.
    Errors latch: after one failed read OpenSlide fails every later call on the same handle.
    Picklability: not picklable; workers open their own reader from the path.

    Pixel alignment: level ``L`` pixel (y, x) is requested at level-0 location
    ``(round(x * d), round(y * d))`` with ``d`` the level's downsample. When ``d`` is an
    integer this is exact; for non-integer downsamples (a level whose size was rounded)
    OpenSlide resamples at a sub-pixel offset of at most half a pixel.
    """

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise slide_error(self.path, "not a slide format OpenSlide supports") from exc
        except openslide.OpenSlideError as exc:
            raise slide_error(
                self.path,
                f"OpenSlide cannot open it ({describe(exc)})",
                "the file is corrupt or uses an unsupported variant; try converting it to a "
                "tiled TIFF",
            ) from exc
        self._closed = False
        self._close_lock = threading.Lock()
        properties = dict(self._slide.properties)
        vendor = properties.get(openslide.PROPERTY_NAME_VENDOR) or detect_vendor(self.path)
        try:
            self.info: SlideInfo = make_info(
                self.path,
                backend=self.backend,
                vendor=vendor or "unknown",
                level_shapes=[(h, w) for w, h in self._slide.level_dimensions],
                level_downsamples=self._slide.level_downsamples,
                channels=3,
                mpp=_mpp(self.path, properties, vendor or ""),
                properties=properties,
            )
        except BaseException:
            self._slide.close()
            raise

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of the box (y, x, h, w) of ``level`` as a C-contiguous (h, w, 3) uint8 array.

        Transparent pixels (outside the scanned area) come back white, as glass does.

        Raises
        ------
        ConfigError
            When the box is not inside the level.
        SlideReadError
            When OpenSlide cannot decode the region (names the file, the box and the cause).
        """
        level, y, x, h, w = check_box(self.info, level, y, x, h, w)
        downsample = self.info.level_downsamples[level]
        location = (round(x * downsample), round(y * downsample))
        try:
            image = self._slide.read_region(location, level, (w, h))
        except openslide.OpenSlideError as exc:
            raise region_error(self.path, level, (y, x, h, w), exc) from exc
        rgba = np.asarray(image)
        return np.ascontiguousarray(composite_on_white(rgba[..., :3], rgba[..., 3]))

    def decode_warnings(self) -> tuple[DecodeWarning, ...]:
        """None: OpenSlide raises libjpeg's corrupt-data warnings as errors (read_region fails)."""
        return ()

    def close(self) -> None:
        """Release the OpenSlide handle; idempotent."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._slide.close()
