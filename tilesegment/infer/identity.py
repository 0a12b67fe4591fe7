"""Which slide a run reads: a content fingerprint cheap enough for a 5 GB file on a network FS.

``--resume`` continues an output only with the slide it was started from, and a resumed batch
skips a complete output only if its slide is still the same. A file name and byte size do not
tell two slides apart (a re-scan, or ``A/slide.tif`` and ``B/slide.tif`` of a fixed-size
format), so each run records a fingerprint of the slide's content in its run parameters
(``run.json`` and the report) and every resume compares it.

What the fingerprint covers (scheme ``fp1``): the SHA-256 of

* the file size;
* the first :data:`HEAD_BYTES` (1 MiB): the TIFF header and first IFDs, and for scanner formats
  the image description (scanner, date, time, file name);
* for TIFF-family files (TIFF, BigTIFF, SVS, NDPI, OME-TIFF...), the level-0 tile (or strip)
  offsets and byte counts, read with tifffile. For compressed tiles each byte count depends on
  the tile's pixels, so two different scans practically never share the whole table;
* :data:`SAMPLES` blocks of :data:`BLOCK_BYTES` (64 KiB) spread evenly over the rest of the
  file, and its last block.

Files up to :data:`WHOLE_FILE_BYTES` (about 2 MiB) are hashed whole, so their fingerprint is
exact. Larger ones cost about 2.1 MiB of reads in 18 requests plus the offsets table, whatever
their size: a few milliseconds from a local disk, a few tens over a network file system.

Limits, stated plainly: the fingerprint samples the file, it does not hash it whole. Two files
of equal size whose differences all lie outside the sampled bytes share a fingerprint: e.g. an
uncompressed slide with a few pixels edited, or one JPEG tile re-encoded to the same length.
It is an accident detector, not a security measure (a file can be forged to match). A
directory slide (a Zarr store) has no fingerprint: it is matched by name only, with a warning.
The modification time is recorded as a hint only: copying a slide keeps its fingerprint, and a
changed mtime with an unchanged fingerprint is merely logged.

Outputs written before fingerprints were recorded have none: they resume when the slide's name
and size match, with a warning that the slide could not be verified by content.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilesegment.errors import ConfigError

log = logging.getLogger(__name__)

#: Version of the fingerprint recipe, the prefix of every fingerprint. Fingerprints of another
#: scheme cannot be compared: such outputs are matched like those that have none.
SCHEME = "fp1"

HEAD_BYTES = 1 << 20
"""Bytes hashed from the start of the file (header, first IFDs, image description)."""
BLOCK_BYTES = 1 << 16
"""Size of each sampled block and of the tail block."""
SAMPLES = 16
"""Blocks sampled evenly between the head and the tail."""
WHOLE_FILE_BYTES = HEAD_BYTES + (SAMPLES + 1) * BLOCK_BYTES
"""Files up to this size are hashed whole."""

#: The run parameters that identify the slide; :func:`check_identity` compares them, the
#: generic parameter check leaves them out.
IDENTITY_KEYS = ("slide", "slide_bytes", "slide_fingerprint")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True, slots=True)
class SlideIdentity:
    """What a run records about its slide to recognise it on resume."""

    path: Path
    """The slide as given, made absolute (symbolic links are not resolved: the name counts)."""
    size: int | None
    """Bytes of the file; None when it is not a regular file (a Zarr directory)."""
    fingerprint: str | None
    """``fp1:<sha256 hex>`` of the sampled content (module docstring); None for a directory."""
    mtime: str | None
    """Modification time, ISO 8601 UTC: a hint only, never compared strictly."""
    bytes_read: int = 0
    """Bytes read to compute :attr:`fingerprint`."""

    @property
    def name(self) -> str:
        return self.path.name

    def params(self) -> dict[str, Any]:
        """The run parameters (:data:`IDENTITY_KEYS`) that record this slide."""
        return {"slide": self.name, "slide_bytes": self.size, "slide_fingerprint": self.fingerprint}

    def describe(self) -> str:
        return describe(str(self.path), self.params())


def identify(path: str | os.PathLike[str]) -> SlideIdentity:
    """The identity of the slide at ``path``: size, content fingerprint and mtime.

    Only regular files are fingerprinted (never read: a directory, FIFO or device, which
    could block or be endless). Raises :class:`OSError` when the path cannot be read.
    """
    path = Path(os.path.abspath(path))
    st = path.stat()
    mtime = _dt.datetime.fromtimestamp(st.st_mtime, _dt.UTC).isoformat(timespec="microseconds")
    if not stat.S_ISREG(st.st_mode):
        return SlideIdentity(path=path, size=None, fingerprint=None, mtime=mtime)
    digest, size, bytes_read = _fingerprint(path)
    return SlideIdentity(
        path=path, size=size, fingerprint=digest, mtime=mtime, bytes_read=bytes_read
    )


def _fingerprint(path: Path) -> tuple[str, int, int]:
    """(fingerprint, file size, bytes read) of a regular file; see the module docstring."""
    h = hashlib.sha256(SCHEME.encode())
    read = 0

    def part(label: str, data: bytes) -> None:
        nonlocal read
        read += len(data)
        h.update(f"\n{label} {len(data)}\n".encode())
        h.update(data)

    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(f"\nsize {size}".encode())
        if size <= WHOLE_FILE_BYTES:
            part("whole", fh.read())
            return f"{SCHEME}:{h.hexdigest()}", size, read
        head = os.pread(fh.fileno(), HEAD_BYTES, 0)
        part("head", head)
        if head[:4] in _TIFF_MAGIC:
            part("tiff-level0-tables", _tiff_tables(path))
        middle = size - BLOCK_BYTES - HEAD_BYTES  # >= SAMPLES * BLOCK_BYTES here
        for i in range(SAMPLES):
            offset = HEAD_BYTES + i * (middle - BLOCK_BYTES) // (SAMPLES - 1)
            part(f"block@{offset}", os.pread(fh.fileno(), BLOCK_BYTES, offset))
        part("tail", os.pread(fh.fileno(), BLOCK_BYTES, size - BLOCK_BYTES))
    return f"{SCHEME}:{h.hexdigest()}", size, read


def _tiff_tables(path: Path) -> bytes:
    """The first page's data offsets and byte counts as little-endian uint64 (tifffile).

    A TIFF that tifffile cannot parse contributes a fixed marker, so that it still has a
    stable fingerprint (its head and sampled blocks).
    """
    import numpy as np
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            offsets, counts = page.dataoffsets, page.databytecounts
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        log.debug("%s: no TIFF offsets table for the fingerprint (%s)", path, exc)
        return b"unreadable"
    return np.asarray([*offsets, *counts], dtype="<u8").tobytes()


# ---------------------------------------------------------------------------------------------
# comparing a recorded identity with a slide


def _comparable(stored: Any, current: str | None) -> bool:
    """Whether two fingerprints can be compared: both recorded, by the same scheme."""
    return (
        isinstance(stored, str)
        and current is not None
        and stored.split(":", 1)[0] == current.split(":", 1)[0]
    )


def differences(stored: Mapping[str, Any], current: SlideIdentity) -> tuple[list[str], bool]:
    """How the slide recorded in run parameters ``stored`` differs from ``current``.

    Returns
    -------
    diffs : list of str
        Among ``"name"``, ``"size"`` and ``"content"``; empty when they match.
    verified : bool
        Whether the content was compared (both have fingerprints of the same scheme). When
        False, an empty ``diffs`` means only that the name and size match.
    """
    diffs = []
    if stored.get("slide") != current.name:
        diffs.append("name")
    if stored.get("slide_bytes") != current.size:
        diffs.append("size")
    verified = _comparable(stored.get("slide_fingerprint"), current.fingerprint)
    if verified and stored.get("slide_fingerprint") != current.fingerprint:
        diffs.append("content")
    return diffs, verified


def describe(path: str, params: Mapping[str, Any]) -> str:
    """``PATH (N bytes, content fp1:0123456789ab)`` for messages."""
    fingerprint = params.get("slide_fingerprint")
    content = "content not recorded" if fingerprint is None else f"content {fingerprint[:16]}"
    size = params.get("slide_bytes")
    return f"{path} ({'not a regular file' if size is None else f'{size} bytes'}, {content})"


def check_identity(
    stored: Mapping[str, Any],
    current: SlideIdentity,
    *,
    output: Path,
    stored_path: str | None = None,
    stored_mtime: str | None = None,
) -> None:
    """Refuse to resume ``output`` from another slide than the one it was started from.

    Parameters
    ----------
    stored : mapping
        The output's recorded run parameters (:data:`IDENTITY_KEYS` are read).
    current : SlideIdentity
        The slide given now.
    output : path
        The output, for the message.
    stored_path : str, optional
        Where the recorded slide was (the output's attributes); its name when unknown.
    stored_mtime : str, optional
        The recorded slide's modification time: a changed one is logged, nothing more.

    Raises
    ------
    ConfigError
        One line naming both slides, what differs and what to do.
    """
    diffs, verified = differences(stored, current)
    if diffs:
        raise ConfigError(
            f"cannot resume {output}: it was started from "
            f"{describe(stored_path or str(stored.get('slide')), stored)}, but the slide given "
            f"now, {current.describe()}, differs in {' and '.join(diffs)}; give the original "
            f"slide, or use --overwrite to start {output} again from this one"
        )
    if not verified:
        log.warning(
            "%s: the identity of %s could not be verified by content (%s); it matches by name "
            "and size only",
            output,
            current.path,
            "a slide that is not a regular file has no fingerprint"
            if current.fingerprint is None
            else "the output was written before slide fingerprints were recorded",
        )
    elif stored_mtime is not None and stored_mtime != current.mtime:
        log.info(
            "%s was modified (%s, was %s) but its content fingerprint is unchanged",
            current.path,
            current.mtime,
            stored_mtime,
        )


def same_slide(stored: Mapping[str, Any], path: Path, *, output: Path) -> bool:
    """Whether ``path`` is the slide recorded in run parameters ``stored`` (for batch skips).

    Name and size are compared first (from a ``stat``); the slide's content is read only when
    they match and a fingerprint was recorded. Outputs without one match by name and size,
    with the warning of :func:`check_identity`.
    """
    try:
        st = path.stat()
    except OSError:
        return False
    size = st.st_size if stat.S_ISREG(st.st_mode) else None
    if stored.get("slide") != path.name or stored.get("slide_bytes") != size:
        return False
    try:
        current = identify(path)
    except OSError:
        return False
    try:
        check_identity(stored, current, output=output)
    except ConfigError:
        return False
    return True


__all__ = [
    "IDENTITY_KEYS",
    "SCHEME",
    "SlideIdentity",
    "check_identity",
    "describe",
    "differences",
    "identify",
    "same_slide",
]
