"""The reader protocol every slide backend implements, and the value object it describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class SlideInfo:
    """What a reader knows about an image, without reading its pixels."""

    path: Path
    """The file or directory that was opened."""
    backend: str
    """Name of the reader backend: ``"openslide"``, ``"tiff"``, ``"image"`` or ``"zarr"``."""
    vendor: str
    """Format or vendor as detected (``"aperio"``, ``"generic-tiff"``, ``"ome-tiff"``, ...)."""
    level_shapes: tuple[tuple[int, int], ...]
    """(height, width) of every pyramid level, level 0 (full resolution) first."""
    level_downsamples: tuple[float, ...]
    """Downsample factor of each level relative to level 0 (1.0 for level 0)."""
    mpp: tuple[float, float] | None
    """Micrometres per pixel of level 0 as (y, x), or None when the file does not say."""
    channels: int
    """Channels returned by ``read_region``: 3 for colour (RGBA is flattened to RGB), 1 for gray."""
    properties: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Backend-specific metadata, for display only."""

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return self.level_shapes[0]

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """Micrometres per pixel of ``level`` as (y, x), or None when unknown."""
        if self.mpp is None:
            return None
        d = self.level_downsamples[level]
        return self.mpp[0] * d, self.mpp[1] * d


@dataclass(frozen=True, slots=True)
class DecodeWarning:
    """A tile or strip that decoded only with the decoder's warnings: its pixels may be wrong."""

    level: int
    """Pyramid level of the segment."""
    segment: tuple[int, int]
    """(row, column) of the tile or strip in the level's grid of segments (strips: column 0)."""
    box: tuple[int, int, int, int]
    """(y, x, h, w) of the segment's pixels in the level, clipped to the level."""
    message: str
    """The decoder's message, e.g. ``Corrupt JPEG data: premature end of data segment``."""

    def describe(self) -> str:
        """One line for the log: which segment, where, what the decoder said."""
        y, x, h, w = self.box
        row, col = self.segment
        return (
            f"tile (row {row}, column {col}) of level {self.level}, pixels y={y}..{y + h - 1}, "
            f"x={x}..{x + w - 1}, is corrupt ({self.message}); it decodes, but its pixels are "
            "probably wrong"
        )

    def as_dict(self) -> dict[str, object]:
        """The JSON form used in the run report."""
        y, x, h, w = self.box
        return {
            "level": self.level,
            "row": self.segment[0],
            "column": self.segment[1],
            "y": y,
            "x": x,
            "h": h,
            "w": w,
            "message": self.message,
        }


@runtime_checkable
class SlideReader(Protocol):
    """A source of uint8 pixels at several pyramid levels.

    Lifecycle: open with :func:`tilesegment.io.open_slide`, use, then ``close()`` (readers are
    context managers). Thread-safety: ``read_region`` may be called from several threads at once.
    Picklability: readers are not pickled; workers receive the path and open their own reader.
    """

    info: SlideInfo

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of the box (y, x, h, w) of ``level``, in that level's coordinates.

        The box must lie inside the level (callers mirror-pad themselves). Returns a C-contiguous
        (h, w, C) uint8 array with C = ``info.channels``. Raises ``SlideReadError`` naming the file
        when the data cannot be decoded.
        """
        ...

    def decode_warnings(self) -> tuple[DecodeWarning, ...]:
        """Segments read so far that decoded only with warnings (corrupt data), oldest first.

        Each segment is reported once per reader, and logged as a warning when found.
        """
        ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideReader: ...

    def __exit__(self, *exc: object) -> None: ...


_R = TypeVar("_R", bound="ReaderBase")


class ReaderBase:
    """What every reader shares: ``with reader:`` closes it on exit, and a repr naming the file.

    Subclasses implement ``read_region`` and override :meth:`close` to release their handles.
    """

    def close(self) -> None:
        """Release what the reader holds; idempotent."""

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(getattr(self, 'path', '?'))!r})"


@runtime_checkable
class StridedReader(Protocol):
    """A reader that can sample a whole level on a regular grid in bounded memory (optional).

    Thumbnails of huge single-level images are built with it: the TIFF and Zarr backends decode
    one tile (chunk) at a time and keep only its samples, instead of whole regions.
    """

    def read_strided(self, level: int, y: int, x: int, step: int, /) -> np.ndarray:
        """Pixels (y + i * step, x + j * step) of ``level`` for every i, j inside the level: a
        C-contiguous (ceil((h - y) / step), ceil((w - x) / step), C) uint8 array.

        (y, x) must lie inside the level. Raises ``SlideReadError`` naming the file when the
        data cannot be decoded.
        """
        ...
