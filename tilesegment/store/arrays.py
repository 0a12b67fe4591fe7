"""Zarr plumbing of the output store: arrays with the house codec, groups opened fresh from
disk, attribute merges, values as stored, and making room for a new store safely."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr

from tilesegment.errors import StoreError
from tilesegment.geometry import Box
from tilesegment.store.layout import ATTR_KEY, read_attrs, zarr_format_of

logger = logging.getLogger(__name__)


def quantise(probabilities: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Probabilities in [0, 1] as stored: uint8 ``rint(p * 255)`` or float32."""
    if dtype == np.uint8:  # in place on one float32 copy: half the time of chained temporaries
        scaled = np.multiply(probabilities, 255.0, dtype=np.result_type(probabilities, np.float32))
        np.clip(scaled, 0.0, 255.0, out=scaled)
        return np.rint(scaled, out=scaled).astype(np.uint8)
    return probabilities.astype(dtype, copy=False)


def stored_probabilities(
    probabilities: np.ndarray, box: Box, classes: int, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) probabilities of ``box`` as a store keeps them, and their class map; raises
    StoreError unless they are ``classes`` float probabilities of the box's size."""
    expected = (classes, box.h, box.w)
    p = np.asarray(probabilities)
    if p.shape != expected:
        raise StoreError(f"`probabilities` has shape {p.shape}, expected {expected} for {box}")
    if not np.issubdtype(p.dtype, np.floating):
        raise StoreError(f"`probabilities` must be a float array, got {p.dtype}")
    lo, hi = float(p.min()), float(p.max())
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
        raise StoreError(
            f"`probabilities` must lie in [0, 1], got values in [{lo}, {hi}] for {box}; "
            "pass softmax outputs, not logits"
        )
    return quantise(p, np.dtype(dtype)), class_map(p)


def stored_label(data: np.ndarray, box: Box, dtype: np.dtype, name: str) -> np.ndarray:
    """(h, w) label values of ``box`` in the label's ``dtype``; raises StoreError unless they
    are integers (or booleans) of the box's size that fit it."""
    data = np.asarray(data)
    if data.shape != box.shape:
        raise StoreError(f"label data has shape {data.shape}, expected {box.shape} for {box}")
    if data.dtype != dtype:
        info = np.iinfo(dtype)
        if not (np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_):
            raise StoreError(f"label data must be integer, got {data.dtype}")
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise StoreError(
                f"label values in [{data.min()}, {data.max()}] do not fit {dtype} of label {name!r}"
            )
        data = data.astype(dtype)
    return data


def check_aligned(box: Box, image_shape: tuple[int, int], chunks: tuple[int, int]) -> None:
    """Raise StoreError unless ``box`` covers a whole number of chunks of the image."""
    for name, start, size, n, c in (
        ("y", box.y, box.h, image_shape[0], chunks[0]),
        ("x", box.x, box.w, image_shape[1], chunks[1]),
    ):
        stop = start + size
        if not (0 <= start < n and size > 0 and stop <= n):
            raise StoreError(f"box {box} lies outside the image of shape {image_shape}")
        if start % c or (stop % c and stop != n):
            raise StoreError(
                f"box {box} is not chunk-aligned along {name}: it must start at a multiple of "
                f"the chunk size ({c}) and end at one or at the image edge ({n})"
            )


# ---------------------------------------------------------------------------------------------
# filesystem helpers


def clear_path(path: Path, overwrite: bool) -> None:
    """Make room for a new store at ``path``, deleting only what is safe to delete."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise StoreError(
            f"{path} already exists; pass --overwrite to replace it, or choose another output path"
        )
    if path.is_symlink() or not path.is_dir():
        raise StoreError(
            f"{path} exists and is not a directory; refusing to replace it, remove it yourself"
        )
    if not any(path.iterdir()):
        return
    attrs = read_attrs(path)
    if attrs is None or not isinstance(attrs.get(ATTR_KEY), dict):
        raise StoreError(
            f"{path} exists and is not a tilesegment output store (no Zarr group with a "
            f"'{ATTR_KEY}' attribute); refusing to delete it with --overwrite. "
            "Remove it yourself or choose another output path"
        )
    logger.info("removing existing output store %s", path)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        raise StoreError(f"cannot remove the existing output store {path}: {exc}") from exc


def open_group(path: Path, mode: Literal["r", "r+"]) -> zarr.Group:
    """The root or a sub-group of a store (Zarr v2 or v3), read fresh from disk."""
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=zarr_format_of(path) or 2)
    except FileNotFoundError as exc:  # includes zarr's GroupNotFoundError
        raise StoreError(f"{path} is not a Zarr group") from exc


def update_attrs(path: Path, update: Mapping[str, Any]) -> None:
    """Merge ``update`` into the attributes of the group at ``path`` as they are on disk now.

    The group is re-opened so that a stale in-memory copy never overwrites keys written by
    another process.
    """
    open_group(path, "r+").attrs.update(dict(update))


def class_map(probabilities: np.ndarray) -> np.ndarray:
    """The argmax over axis 0 of (C, h, w) probabilities as uint8; the first class wins ties.

    Equal to ``np.argmax(p, axis=0)`` but made of contiguous element-wise passes instead of a
    strided reduction (much faster, see docs/architecture.md, Measured choices): per class one
    comparison with the running maximum and one select, no masked copies (2.3 ms instead of
    6.1 ms for a 3-class 512² chunk on one core).
    """
    c = probabilities.shape[0]
    if c == 1:
        return np.zeros(probabilities.shape[1:], dtype=np.uint8)
    out = np.greater(probabilities[1], probabilities[0]).view(np.uint8)
    if c == 2:
        return out
    best = np.maximum(probabilities[0], probabilities[1])
    for k in range(2, c):
        out = np.where(np.greater(probabilities[k], best), np.uint8(k), out)
        if k < c - 1:
            np.maximum(best, probabilities[k], out=best)
    return out


def for_writing(array: zarr.Array) -> zarr.Array:
    """``array`` writing every chunk it is given, without zarr's check for chunks that equal
    the fill value.

    The writers already skip what holds nothing (glass is never computed, empty pyramid blocks
    are not written), so the check would only find the rare all-background chunk of tissue,
    and it costs ~4 ms per 3 × 512² uint8 chunk (``np.array_equal`` against a broadcast fill
    value) where a whole chunk's compression costs about as much.
    """
    return array.with_config({"write_empty_chunks": True})


#: Blosc zstd level of every array: nearly the ratio of higher levels at a fraction of the CPU
#: time the writer would take from the forward pass (docs/architecture.md, Measured choices).
ZSTD_LEVEL = 1


def create_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    *,
    shards: tuple[int, ...] | None = None,
    dimension_names: tuple[str, ...] | None = None,
    spread: bool = False,
) -> zarr.Array:
    """A new array of the store with the house codec (Blosc zstd), fill 0.

    Labels (few values) have their bytes bit-shuffled (multi-byte items: byte-shuffled).
    ``spread`` marks 1-byte values that use the whole byte, such as stored probabilities: they
    are compressed as they are, since bit-shuffling them gains no ratio and costs time (on the
    shipped model's CMU-1-Small-Region output: ratio 4.67 against 4.72, compression 17 % and
    decompression 34 % less CPU; docs/architecture.md, Measured choices).

    In a Zarr v2 group: ``/``-separated chunk keys, as NGFF 0.4 requires. In a Zarr v3 group:
    the ``dimension_names`` NGFF 0.5 requires and, with ``shards``, one file per shard of
    whole chunks (``shards`` is clipped to the whole chunks that cover ``shape``).
    """
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape, strict=True))
    itemsize = np.dtype(dtype).itemsize
    if group.metadata.zarr_format == 2:
        shuffle = {
            (1, False): numcodecs.Blosc.BITSHUFFLE,
            (1, True): numcodecs.Blosc.NOSHUFFLE,
        }.get((itemsize, spread), numcodecs.Blosc.SHUFFLE)
        return group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=0,
            compressors=numcodecs.Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=shuffle),
            chunk_key_encoding={"name": "v2", "separator": "/"},
            overwrite=True,
        )
    from zarr.codecs import BloscCodec

    if shards is not None:
        shards = tuple(
            c * min(-(-s // c), -(-n // c)) for s, c, n in zip(shards, chunks, shape, strict=True)
        )
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        fill_value=0,
        compressors=BloscCodec(
            cname="zstd",
            clevel=ZSTD_LEVEL,
            shuffle={(1, False): "bitshuffle", (1, True): "noshuffle"}.get(
                (itemsize, spread), "shuffle"
            ),
        ),
        chunk_key_encoding={"name": "default", "separator": "/"},
        dimension_names=dimension_names,
        overwrite=True,
    )
