"""Slide readers: one protocol, one module per backend, and :func:`open_slide` to pick one.

The backend is chosen from the file's *content* (magic bytes, or the metadata files of a
directory), never from its extension alone:

=========================================  ===================================================
input                                      backend
=========================================  ===================================================
directory with ``.zarray``/``.zgroup``/    :class:`~tilesegment.io.zarr.ZarrReader`
``zarr.json``
TIFF header, OpenSlide detects a vendor    :class:`~tilesegment.io.openslide.OpenSlideReader`;
other than ``generic-tiff`` (svs, ndpi,    if OpenSlide then cannot open it (damaged), a
scn, bif, philips...)                      warning and :class:`~tilesegment.io.tiff.TiffReader`
any other TIFF                             :class:`~tilesegment.io.tiff.TiffReader`, falling
                                           back to OpenSlide (when it detects the file) if
                                           tifffile cannot open or decode it
anything else OpenSlide detects (mrxs,     :class:`~tilesegment.io.openslide.OpenSlideReader`
vms, vmu, dicom...)
PNG, JPEG, BMP, GIF or WebP header         :class:`~tilesegment.io.image.ImageReader`
anything else                              :class:`~tilesegment.errors.SlideReadError`
=========================================  ===================================================

A TIFF cut short (a truncated copy) is not detected by OpenSlide at all; tifffile reads the
pages that are intact, with a warning that says the file looks truncated, or refuses it with an
error that says so (see :mod:`tilesegment.io.integrity`).

Probe on open: the tiff and zarr backends decode the top-left chunk of level 0 while opening
(one tile or strip, skipped when it is over 64 MiB decoded), and check that a decoder exists
for every TIFF level, so an unsupported compression fails here rather than mid-run. OpenSlide
validates its formats when opening and is not probed further: a slide whose tiles are corrupt
opens, and ``read_region`` raises ``SlideReadError`` naming the region. Image files are decoded
on first read.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from tilesegment.io.base import DecodeWarning, SlideInfo, SlideReader
from tilesegment.io.common import EXPECTED_INPUT, DamagedFileError, ReaderError, slide_error

logger = logging.getLogger(__name__)

__all__ = [
    "DecodeWarning",
    "SlideInfo",
    "SlideReader",
    "check_slide_path",
    "open_slide",
    "sniff_format",
]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"BM": "bmp",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}
_HEADER_BYTES = 512


def sniff_format(header: bytes) -> str | None:
    """The container format of a file from its first bytes, or None when not recognised.

    Returns ``"tiff"``, ``"png"``, ``"jpeg"``, ``"bmp"``, ``"gif"`` or ``"webp"``.

    Examples
    --------
    >>> sniff_format(b"II*\\x00\\x08\\x00\\x00\\x00")
    'tiff'
    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n....")
    'png'
    >>> sniff_format(b"hello") is None
    True
    """
    if header[:4] in _TIFF_MAGIC:
        return "tiff"
    for magic, name in _IMAGE_MAGIC.items():
        if header.startswith(magic):
            return name
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "webp"
    return None


def _looks_like_text(header: bytes) -> bool:
    if b"\x00" in header:
        return False
    try:
        header.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut at the end of the header is still text
        return exc.start >= len(header) - 3
    return True


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_slide_path(path: str | os.PathLike[str], /) -> None:
    """Refuse a slide path that does not exist or is not a regular file or a directory.

    Only looks at the path's ``stat`` (following symlinks): it never opens the path, so a FIFO,
    a device or a socket is refused at once instead of blocking the first read forever.

    Raises
    ------
    SlideReadError
        One line naming the path, what it is and what to pass instead.

    Examples
    --------
    >>> check_slide_path("/dev/null")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tilesegment.io.common.ReaderError: /dev/null: not a regular file but a character device; ...
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise slide_error(
            path, "no such file or directory", "check the path and the working directory"
        ) from None
    except OSError as exc:
        raise slide_error(
            path, f"cannot inspect the path ({exc.strerror or exc})", "check its permissions"
        ) from exc
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    raise slide_error(
        path,
        f"not a regular file but {kind}",
        "pass a slide or image file, or the folder of a Zarr store",
    )


def _open_tiff(path: Path) -> SlideReader:
    from tilesegment.io.openslide import OpenSlideReader, detect_vendor
    from tilesegment.io.tiff import TiffReader

    vendor = detect_vendor(path)
    if vendor is not None and vendor != "generic-tiff":
        try:
            return OpenSlideReader(path)
        except ReaderError as openslide_error:
            # Detected from its header but not openable: truncated or damaged. tifffile reads
            # what is intact (and the Aperio mpp), or says why it cannot.
            logger.warning("%s: %s; reading it with tifffile instead", path, openslide_error.cause)
            try:
                return TiffReader(path)
            except ReaderError as tiff_error:
                raise slide_error(
                    path,
                    f"the file looks truncated or corrupt: {openslide_error.cause}; nor can "
                    f"tifffile ({tiff_error.cause})",
                    "the copy is incomplete or the file is damaged; copy or export it again",
                ) from tiff_error
    try:
        return TiffReader(path)
    except ReaderError as tiff_error:
        if vendor is None or isinstance(tiff_error, DamagedFileError):
            raise
        logger.info("%s: tifffile failed (%s); trying OpenSlide", path, tiff_error.cause)
        try:
            return OpenSlideReader(path)
        except ReaderError as openslide_error:
            cause = f"{tiff_error.cause}; {openslide_error.cause}"
            raise slide_error(path, cause, tiff_error.hint) from openslide_error


def open_slide(path: str | os.PathLike[str], /) -> SlideReader:
    """Open a slide, image or Zarr store with the backend its content calls for.

    Parameters
    ----------
    path : str or path-like
        A file (svs, ndpi, mrxs, TIFF/OME-TIFF, PNG, JPEG...) or a Zarr/OME-Zarr directory.

    Returns
    -------
    SlideReader
        An open reader; close it (or use it as a context manager) when done.

    Raises
    ------
    SlideReadError
        When the path does not exist, is empty, is not an image format we read, or cannot be
        decoded. The message is one line naming the path, the cause and what to do.

    Notes
    -----
    See the module docstring for the order in which backends are tried and what is probed.
    """
    path = Path(path)
    check_slide_path(path)
    if path.is_dir():
        from tilesegment.io.zarr import ZarrReader, is_zarr_directory

        if is_zarr_directory(path):
            return ZarrReader(path)
        raise slide_error(
            path,
            "a directory without Zarr metadata (.zarray, .zgroup or zarr.json)",
            "pass a slide file, or the root directory of a Zarr array or OME-Zarr image",
        )
    try:
        with path.open("rb") as file:
            header = file.read(_HEADER_BYTES)
    except OSError as exc:
        raise slide_error(
            path, f"cannot read the file ({exc.strerror or exc})", "check its permissions"
        ) from exc
    if not header:
        raise slide_error(
            path, "empty file (0 bytes)", "the copy or export is incomplete; copy it again"
        )
    kind = sniff_format(header)
    if kind == "tiff":
        return _open_tiff(path)
    from tilesegment.io.openslide import OpenSlideReader, detect_vendor

    if detect_vendor(path) is not None:
        # before the image check: a MIRAX .mrxs may itself start like a JPEG
        return OpenSlideReader(path)
    if kind is not None:
        from tilesegment.io.image import ImageReader

        return ImageReader(path)
    what = "unrecognised file header"
    if _looks_like_text(header):
        what += ", the file holds text"
    raise slide_error(path, f"not a readable slide or image ({what})", EXPECTED_INPUT)
