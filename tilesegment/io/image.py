"""Small flat images (PNG, JPEG, BMP, GIF, WebP) through Pillow.

These formats cannot be read by region, so the image is decoded once, on the first
``read_region``, and regions are slices of that array. Meant for tiles and test images;
whole slides belong in a tiled TIFF.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from tilesegment.io.base import DecodeWarning, ReaderBase, SlideInfo
from tilesegment.io.common import (
    DECODE_ERRORS,
    check_box,
    describe,
    make_info,
    region_error,
    samples_to_output,
    scale_to_uint8,
    slide_error,
)

logger = logging.getLogger(__name__)

__all__ = ["ImageReader"]

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
"""Gray modes. "I" (32-bit) is how older Pillow opens 16-bit PNGs; values must fit 0..65535."""
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_OPEN_ERRORS = (*DECODE_ERRORS, SyntaxError, Image.DecompressionBombError)
"""Pillow plugins raise SyntaxError for malformed headers and DecompressionBombError for
images above ``Image.MAX_IMAGE_PIXELS * 2``."""


def _as_samples(image: Image.Image) -> tuple[np.ndarray, bool]:
    """(H, W, S) samples of a decoded Pillow image and whether the last sample is opacity.

    Gray stays one colour sample and colour becomes RGB; palette and transparency-keyed images
    are expanded to RGBA / LA so that the transparent colour composites to white.
    """
    mode = image.mode
    has_key = "transparency" in image.info
    if mode in ("LA", "La") or (mode == "L" and has_key):
        image, alpha = image.convert("LA"), True
    elif mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and has_key):
        image, alpha = image.convert("RGBA"), True
    elif mode in _GRAY_MODES:
        alpha = False
    else:
        image, alpha = image.convert("RGB"), False
    samples = np.asarray(image)
    if samples.dtype == np.int32:
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            msg = "32-bit samples outside 0..65535 cannot be read as 16-bit gray"
            raise ValueError(msg)
        samples = samples.astype(np.uint16)
    if samples.ndim == 2:
        samples = samples[..., None]
    return scale_to_uint8(samples), alpha


class ImageReader(ReaderBase):
    """A :class:`~tilesegment.io.base.SlideReader` over a flat image file read with Pillow.

    Parameters
    ----------
    path : Path
        An image Pillow can decode (PNG, JPEG, BMP, GIF, WebP...).

    Notes
    -----
    Size and mode are read from the header in the constructor; pixels are decoded once, on the
    first ``read_region``, and kept (the file is closed in between). Gray ("1", "L", 16-bit)
    stays one channel, 16-bit is scaled by 255/65535 with a warning; gray+alpha composites to
    one gray channel; palette, RGBA and other colour modes become RGB, alpha composited on
    white. Only the first frame of animated/multi-frame files is read (warned). EXIF
    orientation is not applied: pixels are in stored order.

    Lifecycle: no file handle is held between calls; :meth:`close` drops the decoded pixels.
    Thread-safety: the one-time decode is guarded by a lock, later reads only slice an
    immutable array. Picklability: not picklable by contract; open a new reader per worker.
    """

    backend = "image"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._pixels: np.ndarray | None = None
        self._alpha = False
        try:
            with Image.open(self.path) as image:
                mode, (width, height) = image.mode, image.size
                image_format = (image.format or "image").lower()
                frames = getattr(image, "n_frames", 1)
        except _OPEN_ERRORS as exc:
            raise slide_error(
                self.path,
                f"Pillow cannot open the image ({describe(exc)})",
                "the file is corrupt, truncated or too large for a flat image format; for big "
                "images use a tiled TIFF",
            ) from exc
        if mode not in _GRAY_MODES and mode not in _COLOUR_MODES:
            raise slide_error(
                self.path,
                f"unsupported image mode {mode!r}",
                "convert it to 8-bit gray or RGB (e.g. PNG or JPEG)",
            )
        if mode.startswith("I"):
            logger.warning("%s: 16-bit samples are scaled to 8 bits (value * 255 / 65535)", path)
        if frames > 1:
            logger.warning("%s: has %d frames; reading only the first", path, frames)
        self.info: SlideInfo = make_info(
            self.path,
            backend=self.backend,
            vendor=image_format,
            level_shapes=[(height, width)],
            channels=1 if mode in _GRAY_MODES else 3,
            mpp=None,
            properties={"image.mode": mode, "image.format": image_format},
        )

    def _load(self) -> np.ndarray:
        """Decode the whole image once (thread-safe) and return the (H, W, S) samples."""
        pixels = self._pixels
        if pixels is not None:
            return pixels
        with self._lock:
            if self._pixels is None:
                with Image.open(self.path) as image:
                    image.load()
                    samples, self._alpha = _as_samples(image)
                if samples.shape[:2] != self.info.shape:
                    msg = f"decoded {samples.shape[:2]} px, header said {self.info.shape}"
                    raise ValueError(msg)
                samples.setflags(write=False)
                self._pixels = samples
            return self._pixels

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of the box (y, x, h, w) as a C-contiguous (h, w, C) uint8 array (level 0 only).

        Raises
        ------
        ConfigError
            When the box is not inside the image or ``level`` is not 0.
        SlideReadError
            When the image cannot be decoded (names the file, the box and the cause).
        """
        level, y, x, h, w = check_box(self.info, level, y, x, h, w)
        try:
            pixels = self._load()
        except _OPEN_ERRORS as exc:
            raise region_error(self.path, level, (y, x, h, w), exc) from exc
        # copy: the cached array is shared and read-only, the caller owns what it gets
        return samples_to_output(pixels[y : y + h, x : x + w].copy(), alpha=self._alpha)

    def decode_warnings(self) -> tuple[DecodeWarning, ...]:
        """Always empty: not checked (Pillow, like imagecodecs, drops libjpeg's warnings)."""
        return ()

    def close(self) -> None:
        """Drop the decoded pixels; idempotent."""
        with self._lock:
            self._pixels = None
