"""Integrity of TIFF input: truncated files, and JPEG tiles that decode although corrupt.

Two faults that tifffile and imagecodecs let through without a word:

Truncated or damaged structure
    tifffile logs ``invalid offset to first page N`` or ``invalid page offset N`` on its own
    logger (without the file name) and stops walking the IFD chain, so a file cut short reads as
    a TIFF with fewer pages, or none. :func:`tifffile_messages` collects those records while a
    file is opened (and keeps them off the console), and :func:`structure_problem` turns them
    into one sentence that names the file size. :func:`truncated_segments` finds tile or strip
    data that runs past the end of the file (files whose IFDs come before their data).

Corrupt JPEG entropy data
    libjpeg-turbo recovers from corrupt entropy-coded data (the rest of the tile comes out grey or
    garbled) and reports it as a *warning* ("Corrupt JPEG data: premature end of data segment",
    "... extraneous bytes before marker 0xd9"). imagecodecs 2026.3.6, which tifffile decodes
    with, discards libjpeg's warnings (its ``output_message`` does nothing and the warning count
    is never read): no exception, no Python warning, no log record, only wrong pixels.
    OpenSlide, by contrast, raises such warnings as errors. :class:`JpegChecker` decodes each
    JPEG tile or strip a second time through simplejpeg (libjpeg-turbo's TurboJPEG API) with
    ``strict=True``, which raises ``ValueError`` on exactly these warnings, at 1/8 scale (the
    entropy decoding where corruption shows is the same; the inverse DCT is cheaper). Each segment
    is checked once per reader; the check costs about one more JPEG decode of the pixels read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import tifffile

from tilesegment.io.base import DecodeWarning

logger = logging.getLogger(__name__)

__all__ = [
    "JpegChecker",
    "structure_problem",
    "tifffile_messages",
    "truncated_segments",
]

_JPEG = 7  # TIFF Compression: "new-style" JPEG, the one tifffile decodes with imagecodecs
_REPR = re.compile(r"^<tifffile\.\w+ @\d+>\s*")  # tifffile prefixes messages with an object repr
_OUTPUT_COLORSPACE = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}  # anything else: RGB
_BAD_OFFSET = re.compile(r"invalid (?:page )?offset|invalid offset to")


class _Collector(logging.Filter):
    """Takes the records of one thread off the ``tifffile`` logger and keeps their text."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.messages.append(_REPR.sub("", record.getMessage()))
        return False


@contextlib.contextmanager
def tifffile_messages() -> Iterator[list[str]]:
    """Collect what tifffile logs in this thread inside the block, instead of printing it.

    Yields the list the messages are appended to (tifffile's object repr prefix removed).
    Records from other threads pass through unchanged.
    """
    collector = _Collector()
    source = logging.getLogger("tifffile")
    source.addFilter(collector)
    try:
        yield collector.messages
    finally:
        source.removeFilter(collector)


def structure_problem(messages: list[str], file_size: int) -> str | None:
    """One sentence about a truncated or damaged IFD chain, or None if ``messages`` show none.

    Examples
    --------
    >>> structure_problem(["invalid page offset 1850194"], 1745059)
    'the TIFF looks truncated or corrupt: tifffile found invalid page offset 1850194 in a file \
of 1745059 bytes'
    >>> structure_problem(["some harmless note"], 10) is None
    True
    """
    bad = [m for m in messages if _BAD_OFFSET.search(m)]
    if not bad:
        return None
    return (
        f"the TIFF looks truncated or corrupt: tifffile found {'; '.join(bad)} in a file of "
        f"{file_size} bytes"
    )


def truncated_segments(page: tifffile.TiffPage, file_size: int) -> tuple[int, int] | None:
    """(segments, end byte) when tile or strip data of ``page`` runs past ``file_size``.

    Sparse segments (offset or byte count 0) are allowed by TIFF and are not counted.
    """
    ends = [
        offset + count
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
        if offset and count
    ]
    past = [end for end in ends if end > file_size]
    return (len(past), max(past)) if past else None


class JpegChecker:
    """Finds the JPEG tiles or strips of a TIFF page that decode only with libjpeg warnings.

    Parameters
    ----------
    path : Path
        The file, for messages.
    level : int
        The pyramid level ``page`` is, for messages and records.
    page : tifffile.TiffPage
        The page read for that level (its first plane).
    filehandle : tifffile.FileHandle
        The open file; read under its lock (call ``set_lock(True)`` first when threads share it).

    Notes
    -----
    Thread-safety: :meth:`check` may be called from several threads; each segment is checked
    once. Only 8-bit, chunky, 2-D JPEG pages are checked (:meth:`applies`).
    """

    def __init__(
        self, path: Path, level: int, page: tifffile.TiffPage, filehandle: tifffile.FileHandle
    ) -> None:
        self.path = path
        self.level = level
        self._page = page
        self._fh = filehandle
        self._rows, self._cols = int(page.chunked[0]), int(page.chunked[1])
        self._tile_h, self._tile_w = int(page.chunks[0]), int(page.chunks[1])
        self._height, self._width = int(page.imagelength), int(page.imagewidth)
        tables = page.jpegtables
        self._tables = bytes(tables[:-2]) if tables else None  # without its EOI marker
        self._checked: set[int] = set()
        self._lock = threading.Lock()
        self.warnings: list[DecodeWarning] = []

    @staticmethod
    def applies(page: tifffile.TiffPage) -> bool:
        """Whether ``page`` holds JPEG segments this checker can decode independently."""
        return (
            int(page.compression) == _JPEG
            and page.bitspersample == 8
            and page.imagedepth == 1
            and int(page.planarconfig) == 1
            and getattr(page, "jpegheader", None) is None  # NDPI-style streams: not segments
        )

    def check(self, y: int, x: int, h: int, w: int) -> list[DecodeWarning]:
        """Check every not yet checked segment overlapping the box; return the new warnings."""
        rows = range(y // self._tile_h, (y + h - 1) // self._tile_h + 1)
        cols = range(x // self._tile_w, (x + w - 1) // self._tile_w + 1)
        todo = []
        with self._lock:
            for row in rows:
                for col in cols:
                    index = row * self._cols + col
                    if index not in self._checked:
                        self._checked.add(index)
                        todo.append((row, col, index))
        found = [w for w in (self._check_segment(*t) for t in todo) if w is not None]
        if found:
            with self._lock:
                self.warnings.extend(found)
        return found

    def _check_segment(self, row: int, col: int, index: int) -> DecodeWarning | None:
        import simplejpeg

        offset, count = self._page.dataoffsets[index], self._page.databytecounts[index]
        if not offset or not count:
            return None  # sparse: tifffile fills it, nothing to decode
        with self._fh.lock:
            self._fh.seek(offset)
            data = self._fh.read(count)
        if self._tables is not None and data[:2] == b"\xff\xd8":
            data = self._tables + data[2:]  # abbreviated stream: splice in the shared tables
        try:
            source = simplejpeg.decode_jpeg_header(data)[2]
            simplejpeg.decode_jpeg(
                data, colorspace=_OUTPUT_COLORSPACE.get(source, "RGB"), strict=True, min_factor=8
            )
        except ValueError as exc:
            message = " ".join(str(exc).split())
        else:
            return None
        y, x = row * self._tile_h, col * self._tile_w
        box = (y, x, min(self._tile_h, self._height - y), min(self._tile_w, self._width - x))
        warning = DecodeWarning(self.level, (row, col), box, message)
        logger.warning("%s: %s", self.path, warning.describe())
        return warning
