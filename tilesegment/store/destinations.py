"""Where outputs go: check a destination before any work is done, and name what failed after.

A run takes minutes to hours; an output path that cannot be written (under a regular file, on a
read-only filesystem, in a folder without write permission) must stop it before the first tile,
with one line naming the path, not after the segmentation with a traceback. Only the standard
library is imported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from tilesegment.errors import ConfigError, ModelError, SlideReadError, StoreError

#: errno values that mean the filesystem is full: freeing space and resuming helps.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
#: errno values that mean the destination cannot be written at all: choose another one.
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST})


def prepare_destination(path: str | os.PathLike[str], *, option: str) -> Path:
    """Create the parent folders of the output ``path`` and check that files can be written
    there, before any work is done.

    Parameters
    ----------
    path : path-like
        A file or Zarr folder about to be written; it need not exist.
    option : str
        The option that named it (``-o``, ``--geojson``), for the message.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    StoreError
        One line naming ``path``, what is wrong and what to do: an ancestor is a regular file,
        or the folder cannot be created or written.
    """
    path = Path(path)
    prepare_folder(path.parent, option=option, named=path)
    return path


def prepare_folder(
    folder: str | os.PathLike[str], *, option: str, named: Path | None = None
) -> Path:
    """Create ``folder`` (and its parents) and check that files can be written in it, by
    creating and removing a hidden probe file: that is what counts, since ``os.access`` does
    not see every read-only mount and root passes permission checks.

    ``named`` is the path the user gave, when ``folder`` is its parent (for the message).
    Raises :class:`StoreError` as :func:`prepare_destination` does.
    """
    folder = Path(folder)
    shown = f"{option} {named if named is not None else folder}"
    for ancestor in [folder, *folder.parents]:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise StoreError(
                    f"{shown}: {ancestor} is a file, not a folder; choose a path in a folder"
                )
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tilesegment-probe-", dir=folder)
    except OSError as exc:
        raise StoreError(
            f"{shown}: cannot write in {folder} ({exc.strerror or exc}); choose a writable folder"
        ) from exc
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)
    return folder


def write_failure(exc: BaseException, destination: Path) -> tuple[str, str] | None:
    """What went wrong writing ``destination``, if ``exc`` (or its cause) says the filesystem
    is full or cannot be written: ``("no space" | "not writable", one-line message without
    advice)``; None for any other error.

    A full filesystem counts wherever it happened (the fix is the same: free space); a
    read-only or forbidden path only when it lies beside or inside ``destination`` and the
    error is not about an input (a slide or model that cannot be read, even when it sits in
    the output's folder, is reported as what it is).
    """
    if isinstance(exc, (SlideReadError, ModelError, ConfigError)):
        return None
    cause = os_error_in(exc)
    if cause is None:
        return None
    where = f" ({cause.filename})" if cause.filename else ""
    if cause.errno in NO_SPACE:
        return "no space", f"{destination}: no space left on device{where}"
    if cause.errno in NOT_WRITABLE and cause.filename is not None:
        folder = Path(destination).resolve().parent
        if Path(os.fsdecode(cause.filename)).resolve().is_relative_to(folder):
            return "not writable", f"{destination}: cannot write{where}: {cause.strerror}"
    return None


def os_error_in(exc: BaseException) -> OSError | None:
    """The first :class:`OSError` with an errno in ``exc`` or its causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None
