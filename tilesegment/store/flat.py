"""Plain image files any program opens: a class mask PNG, instance and probability TIFFs, an RGB
PNG; written together, each file whole or absent.

What ``tilesegment predict`` writes for ordinary images (``tilesegment run`` writes OME-Zarr,
see :mod:`tilesegment.store.output`). :func:`write_together` writes every file of one image
under a temporary name in the target folder and renames them into place only when all of them
are written, so an image that fails (or a process that is killed) leaves no file that looks
like a finished result, only ``.*.partial`` names that the next write of the same file replaces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from tilesegment.errors import StoreError

#: ``write(path)`` writes one file at ``path`` (a temporary name chosen by write_together).
Writer = Callable[[Path], None]


def mask_png(mask: np.ndarray, colours: tuple[tuple[int, ...], ...]) -> Writer:
    """A writer of the class mask as a PNG.

    Parameters
    ----------
    mask : (H, W) uint8 ndarray
        Class ids 0..C-1.
    colours : sequence of (R, G, B[, A]) tuples, one per class
        The model's class colours.

    Returns
    -------
    Writer
        Two classes: an 8-bit gray PNG of 0 (class 0) and 255 (class 1). More classes: a
        palette PNG whose pixel values are the class ids and whose palette holds the class
        colours (alpha ignored; opened with Pillow, ``np.asarray`` gives the ids).
    """
    from PIL import Image

    if len(colours) == 2:
        image = Image.fromarray(mask.astype(np.uint8) * np.uint8(255))  # mode L
    else:
        if len(colours) > 256:
            raise StoreError(f"{len(colours)} classes do not fit a palette PNG (at most 256)")
        image = Image.fromarray(mask.astype(np.uint8))
        image.putpalette(  # L becomes P, the values stay the class ids
            [int(v) for c in colours for v in c[:3]], rawmode="RGB"
        )
    return lambda path: image.save(path, format="PNG", optimize=True)


def rgb_png(pixels: np.ndarray) -> Writer:
    """A writer of (H, W, 3) uint8 pixels as an RGB PNG."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))  # mode RGB
    return lambda path: image.save(path, format="PNG")


def array_tiff(array: np.ndarray, *, axes: str, mpp: float | None) -> Writer:
    """A writer of ``array`` (dtype kept) as a zlib-compressed TIFF.

    Parameters
    ----------
    array : ndarray
        (Y, X) or (C, Y, X); a (C, Y, X) array is C pages, read back whole by
        ``tifffile.imread``.
    axes : str
        ``"YX"`` or ``"CYX"``, recorded in the file's shaped metadata.
    mpp : float, optional
        µm/px, recorded as the resolution (pixels per centimetre) when known.
    """
    import tifffile

    if len(axes) != array.ndim:
        raise StoreError(f"`axes` {axes!r} does not match an array of shape {array.shape}")
    extra = {}
    if mpp is not None:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}

    def write(path: Path) -> None:
        tifffile.imwrite(
            path,
            array,
            photometric="minisblack",
            compression="zlib",
            metadata={"axes": axes},
            **extra,
        )

    return write


def partial_path(path: Path) -> Path:
    """The temporary name ``path`` is written under: ``.NAME.partial`` in the same folder."""
    return path.with_name(f".{path.name}.partial")


def write_together(files: Mapping[Path, Writer]) -> None:
    """Write every file of ``files`` (target path -> writer), all or none.

    Each writer writes to :func:`partial_path` of its target; once all have, each is renamed
    onto its target (an atomic replace within a folder). On any error the partial files are
    removed and the error propagates (an ``OSError`` as :class:`StoreError` naming the file).
    """
    written: list[Path] = []
    try:
        for target, write in files.items():
            partial = partial_path(target)
            written.append(partial)
            try:
                write(partial)
            except OSError as exc:
                raise StoreError(f"{target}: cannot write the file ({exc})") from exc
        for target in files:
            os.replace(partial_path(target), target)
    except BaseException:
        for partial in written:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        raise
