"""Helpers the reader backends share: one-line errors, box checks, metadata and pixel conversions.

Private to :mod:`tilesegment.io`; nothing here is part of the public API.
"""

from __future__ import annotations

import itertools
import logging
import operator
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilesegment.errors import ConfigError, SlideReadError
from tilesegment.io.aio import read_selection
from tilesegment.io.base import DecodeWarning, ReaderBase, SlideInfo

logger = logging.getLogger(__name__)

EXPECTED_INPUT = (
    "expected a whole-slide image (svs, ndpi, mrxs, scn, vms, bif, ...), a TIFF, "
    "PNG/JPEG or a Zarr array"
)
"""The 'what to do' half of the message for inputs that are not images at all."""

MPP_RANGE_UM = (0.05, 50.0)
"""Inclusive range of µm/px trusted from TIFF resolution tags; values outside are display junk."""

PROBE_MAX_BYTES = 64 * 2**20
"""Largest decoded chunk (bytes) that ``open_slide`` decodes as a probe; bigger ones are skipped."""

DECODE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    RuntimeError,
    OSError,
    KeyError,
    IndexError,
    ImportError,
    EOFError,
    struct.error,
    zlib.error,
)
"""What decoders raise on corrupt or unsupported data (imagecodecs errors are RuntimeErrors,
missing codec builds are ImportErrors, tifffile/zarr raise ValueError/KeyError/OSError)."""

UM_PER_UNIT: Mapping[str, float] = {
    "nanometer": 1e-3,
    "nm": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "m": 1e6,
}
"""Micrometres per length unit, for the unit names OME-XML, OME-Zarr and ImageJ use."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """A short one-line description of ``exc``: its type and message."""
    text = one_line(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


class ReaderError(SlideReadError):
    """A :class:`SlideReadError` that keeps its parts, so a fallback can merge two of them."""

    def __init__(self, path: Path | str, cause: str, hint: str | None) -> None:
        self.path = str(path)
        self.cause = one_line(cause)
        self.hint = one_line(hint) if hint else None
        message = f"{self.path}: {self.cause}"
        if self.hint:
            message += f"; {self.hint}"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[ReaderError], tuple[str, str, str | None]]:
        return type(self), (self.path, self.cause, self.hint)


class DamagedFileError(ReaderError):
    """The file is truncated or its structure is damaged: no other backend should try it."""


def slide_error(path: Path | str, cause: str, hint: str | None = EXPECTED_INPUT) -> ReaderError:
    """Build the one-line ``SlideReadError`` "PATH: cause; what to do".

    Parameters
    ----------
    path : Path or str
        The file or directory the error is about.
    cause : str
        What went wrong; may contain newlines from a library message, they are collapsed.
    hint : str or None
        What the user can do about it; None for no hint.

    Returns
    -------
    ReaderError
        The error (a ``SlideReadError``), for the caller to raise:
        ``raise slide_error(...) from exc``.
    """
    return ReaderError(path, cause, hint)


def region_error(
    path: Path | str, level: int, box: tuple[int, int, int, int], exc: BaseException
) -> SlideReadError:
    """The ``SlideReadError`` for a region whose pixels could not be decoded."""
    y, x, h, w = box
    return slide_error(
        path,
        f"cannot decode region (y={y}, x={x}, h={h}, w={w}) of level {level} ({describe(exc)})",
        "the file is probably corrupt or truncated; re-export or re-copy it",
    )


def check_box(
    info: SlideInfo, level: int, y: int, x: int, h: int, w: int
) -> tuple[int, int, int, int, int]:
    """Validate a ``read_region`` request against ``info`` and return it as Python ints.

    Raises
    ------
    ConfigError
        When an argument is not an integer, the level does not exist, or the box (y, x, h, w)
        is empty or not entirely inside the level.
    """
    try:
        values = tuple(operator.index(v) for v in (level, y, x, h, w))
    except TypeError as exc:
        msg = (
            f"`level`, `y`, `x`, `h`, `w` must be integers, got "
            f"({level!r}, {y!r}, {x!r}, {h!r}, {w!r}) for {info.path}"
        )
        raise ConfigError(msg) from exc
    level, y, x, h, w = values
    if not 0 <= level < info.level_count:
        msg = f"`level` ({level}) must be in [0, {info.level_count - 1}] for {info.path}"
        raise ConfigError(msg)
    height, width = info.level_shapes[level]
    if h < 1 or w < 1 or y < 0 or x < 0 or y + h > height or x + w > width:
        msg = (
            f"box (y={y}, x={x}, h={h}, w={w}) is not inside level {level} of {info.path} "
            f"(shape {height}x{width}); need h, w >= 1, y >= 0, x >= 0, y + h <= {height} "
            f"and x + w <= {width}"
        )
        raise ConfigError(msg)
    return level, y, x, h, w


def make_info(
    path: Path,
    *,
    backend: str,
    vendor: str,
    level_shapes: Sequence[tuple[int, int]],
    channels: int,
    mpp: tuple[float, float] | None,
    level_downsamples: Sequence[float] | None = None,
    properties: Mapping[str, str] | None = None,
) -> SlideInfo:
    """Build a validated :class:`SlideInfo`.

    Parameters
    ----------
    level_shapes : sequence of (int, int)
        (height, width) of each level, largest first. Every size must be at least 1.
    level_downsamples : sequence of float, optional
        Downsample of each level. By default the mean of the height and width ratios to level 0
        (the rule OpenSlide uses), so non-integer pyramids get the same factor in every backend.

    Raises
    ------
    SlideReadError
        When there is no level, a level has zero size, the levels are not ordered from largest
        to smallest, or ``channels`` is not 1 or 3.
    """
    shapes = tuple((int(h), int(w)) for h, w in level_shapes)
    if not shapes:
        raise slide_error(path, "the file contains no image", "check that it is not empty")
    for level, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise slide_error(
                path,
                f"level {level} has zero size ({h}x{w} px)",
                "the image is empty; re-export it with pixels",
            )
    if level_downsamples is None:
        h0, w0 = shapes[0]
        downsamples = tuple(
            1.0 if i == 0 else (h0 / h + w0 / w) / 2 for i, (h, w) in enumerate(shapes)
        )
    else:
        downsamples = tuple(float(d) for d in level_downsamples)
    if len(downsamples) != len(shapes) or downsamples[0] != 1.0:
        raise slide_error(
            path,
            f"inconsistent pyramid: downsamples {downsamples} for {len(shapes)} levels",
            "the file's pyramid metadata is malformed",
        )
    if any(b <= a for a, b in itertools.pairwise(downsamples)):
        raise slide_error(
            path,
            f"pyramid levels are not ordered from largest to smallest (shapes {shapes})",
            "rebuild the pyramid (e.g. with vips or bfconvert)",
        )
    if channels not in (1, 3):
        raise slide_error(
            path, f"{channels} output channels", "only gray (1) or RGB (3) is supported"
        )
    return SlideInfo(
        path=path,
        backend=backend,
        vendor=vendor,
        level_shapes=shapes,
        level_downsamples=downsamples,
        mpp=mpp,
        channels=channels,
        properties=dict(properties or {}),
    )


def plausible_mpp(
    path: Path, mpp_y: float, mpp_x: float, *, source: str
) -> tuple[float, float] | None:
    """``(mpp_y, mpp_x)`` if both are finite and in :data:`MPP_RANGE_UM`, else None (logged).

    Used for resolutions that writers fill with display defaults (72 dpi is 352.8 µm/px): a
    value outside the range of microscopy is far more likely junk than truth.
    """
    low, high = MPP_RANGE_UM
    if all(np.isfinite(v) and low <= v <= high for v in (mpp_y, mpp_x)):
        return float(mpp_y), float(mpp_x)
    logger.debug(
        "%s: ignoring %s resolution %.6g x %.6g um/px (outside %g-%g um/px, likely a display "
        "default)",
        path,
        source,
        mpp_y,
        mpp_x,
        low,
        high,
    )
    return None


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map integer samples onto uint8 by their dtype's full range (uint16: v * 255 / 65535).

    A fixed mapping, not a per-region stretch, so every tile of an image gets the same pixels.
    Booleans map to 0/255; uint8 is returned unchanged.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * np.uint8(255)
    if values.dtype == np.uint16:
        wide = values.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    msg = f"cannot scale {values.dtype} samples to uint8"
    raise TypeError(msg)


def composite_on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten non-premultiplied colour over a white background (transparent = glass).

    Parameters
    ----------
    color : (H, W, C) uint8 ndarray
    alpha : (H, W) uint8 ndarray

    Returns
    -------
    (H, W, C) uint8 ndarray
        ``round(color * a + 255 * (1 - a))`` with ``a = alpha / 255``.

    Examples
    --------
    >>> composite_on_white(np.array([[[0, 100, 255]]], np.uint8), np.array([[0]], np.uint8))
    array([[[255, 255, 255]]], dtype=uint8)
    >>> composite_on_white(np.array([[[0, 100, 255]]], np.uint8), np.array([[255]], np.uint8))
    array([[[  0, 100, 255]]], dtype=uint8)
    """
    a = alpha.astype(np.uint16)[..., None]
    out = (color.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def samples_to_output(pixels: np.ndarray, *, alpha: bool) -> np.ndarray:
    """Turn (H, W, S) uint8 samples into the reader output (H, W, C), C-contiguous.

    With ``alpha`` the last sample is opacity and is composited away (gray+alpha -> 1 channel,
    RGBA -> 3 channels).
    """
    if alpha:
        pixels = composite_on_white(pixels[..., :-1], pixels[..., -1])
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def first_plane_warning(path: Path, extra: Mapping[str, int]) -> None:
    """Log that only the first plane of the non-spatial axes ``extra`` (name -> size) is read."""
    big = {name: size for name, size in extra.items() if size > 1}
    if big:
        sizes = ", ".join(f"{name}={size}" for name, size in big.items())
        logger.warning("%s: has extra axes (%s); reading only their first plane", path, sizes)


@dataclass(frozen=True, slots=True, eq=False)
class PixelLayout:
    """How the axes of a level's array map onto (y, x, samples), and samples onto output pixels."""

    axes: tuple[str, ...]
    """Upper-case axis names of each level's array, e.g. ``("Y", "X", "S")``, ``("C", "Y", "X")``
    or ``("T", "Z", "C", "Y", "X", "S")``; must include ``"Y"`` and ``"X"``."""
    sample_axis: str | None
    """The axis that holds colour samples (``"S"`` or a ``"C"``), or None for plain (Y, X)."""
    color: int
    """Colour samples kept: 1 (gray) or 3 (RGB). Palette images have 1 index sample and give 3."""
    alpha: str | None
    """``"associated"`` / ``"unassociated"`` when the sample after the colour ones is opacity."""
    palette: np.ndarray | None = None
    """(N, 3) uint8 colour table for palette images, else None."""
    invert: bool = False
    """True for MinIsWhite gray, whose values are inverted."""

    def selection(self, y: int, x: int, h: int, w: int, step: int = 1) -> tuple[int | slice, ...]:
        """Zarr selection of the box (every ``step``-th row and column of it, from its first),
        the first index of every non-spatial, non-sample axis."""
        spans = {"Y": slice(y, y + h, step), "X": slice(x, x + w, step)}
        if self.sample_axis is not None:
            spans[self.sample_axis] = slice(None)
        return tuple(spans.get(axis, 0) for axis in self.axes)

    @property
    def channels(self) -> int:
        """Channels of the output: 3 for palette or RGB, 1 for gray."""
        return 3 if self.palette is not None else self.color

    def to_output(self, raw: np.ndarray) -> np.ndarray:
        """(h, w, C) uint8 output from the selected array (its kept axes in file order)."""
        kept = [axis for axis in self.axes if axis in ("Y", "X", self.sample_axis)]
        order = [kept.index("Y"), kept.index("X")]
        if self.sample_axis is not None:
            order.append(kept.index(self.sample_axis))
        pixels = np.transpose(raw, order)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if self.palette is not None:
            return np.ascontiguousarray(self.palette[pixels[..., 0]])
        pixels = scale_to_uint8(pixels)
        color = pixels[..., : self.color]
        if self.invert:
            color = 255 - color
        if self.alpha == "unassociated":
            color = composite_on_white(color, pixels[..., self.color])
        elif self.alpha == "associated":
            # premultiplied: out = c + (1 - a) * white
            opacity = pixels[..., self.color, None].astype(np.int16)
            color = np.clip(color.astype(np.int16) + 255 - opacity, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(color, dtype=np.uint8)


class ArrayLevelsReader(ReaderBase):
    """Shared reading for backends whose levels are Zarr arrays (tifffile's Zarr store, Zarr).

    Subclasses set ``info``, ``path``, ``_arrays`` (one ``zarr.Array`` per level) and
    ``_layout`` (a :class:`PixelLayout`).
    """

    info: SlideInfo
    path: Path

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        selection = self._layout.selection(y, x, h, w)  # type: ignore[attr-defined]
        raw = read_selection(self._arrays[level], selection)  # type: ignore[attr-defined]
        return self._layout.to_output(raw)  # type: ignore[attr-defined]

    def decode_warnings(self) -> tuple[DecodeWarning, ...]:
        """Chunks that decoded only with warnings; none here (backends that check override)."""
        return ()

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of the box (y, x, h, w) of ``level`` as a C-contiguous (h, w, C) uint8 array.

        Raises
        ------
        ConfigError
            When the box is not inside the level.
        SlideReadError
            When a tile, strip or chunk of the box cannot be read or decoded (names the file and
            the box).
        """
        level, y, x, h, w = check_box(self.info, level, y, x, h, w)
        try:
            return self._read(level, y, x, h, w)
        except DECODE_ERRORS as exc:
            raise region_error(self.path, level, (y, x, h, w), exc) from exc

    def read_strided(self, level: int, y: int, x: int, step: int, /) -> np.ndarray:
        """Pixels (y + i * step, x + j * step) of ``level``, to its end: a bounded-memory thumbnail.

        See :class:`~tilesegment.io.base.StridedReader`. One strided Zarr selection: every
        chunk (TIFF tile or strip) is decoded once, its samples are copied out and the chunk is
        freed, so memory is the result plus the chunks being decoded, whatever the level's size.
        """
        height, width = self.info.level_shapes[level]
        level, y, x, h, w = check_box(self.info, level, y, x, height - y, width - x)
        if operator.index(step) < 1:
            raise ConfigError(f"`step` ({step}) must be >= 1 for {self.path}")
        selection = self._layout.selection(y, x, h, w, step)  # type: ignore[attr-defined]
        try:
            raw = read_selection(self._arrays[level], selection)  # type: ignore[attr-defined]
            return self._layout.to_output(raw)  # type: ignore[attr-defined]
        except DECODE_ERRORS as exc:
            raise region_error(self.path, level, (y, x, h, w), exc) from exc
