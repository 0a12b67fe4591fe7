"""The pyramid levels of an output: each level an array with the level-0 chunk and shard size
in px, and levels 1.. built from level 0 by 2 x 2 downsampling.

Level ``k`` is level ``k - 1`` halved (odd sizes round up), until
``max(h, w) <= PYRAMID_MAX_PX``. Probabilities take the mean of each 2 x 2 window (of the
pixels present at odd edges), computed in float32 (exact for uint8) from the stored level
``k - 1`` values and, for uint8, rounded to nearest with ties to even (:func:`numpy.rint`).
Labels take the top-left pixel of each window (``[::2, ::2]``). Each output chunk reads its
2 x 2 chunks of the level above; a sharded level is written one whole shard at a time
(:func:`~tilesegment.store.shards.write_chunks`). Where the level above is all 0 (no tissue
was computed there) nothing is computed or written: the chunk stays absent, which reads as 0,
the value downsampling would give.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.store.arrays import create_array, for_writing
from tilesegment.store.layout import FORMATS, NGFF_04, NGFF_05, stored_blocks
from tilesegment.store.ngff import DOWNSAMPLERS
from tilesegment.store.shards import shard_step, write_chunks

logger = logging.getLogger(__name__)

#: NGFF axis names of the probabilities (c, y, x); labels use the last two.
AXES = ("c", "y", "x")


def check_shards(
    format: str, shard_shape: tuple[int, int] | None, chunk: tuple[int, int]
) -> tuple[int, int] | None:
    """The level-0 shards of a new store (None: one file per chunk), or ConfigError."""
    if format not in FORMATS:
        raise ConfigError(f"`format` ({format!r}) must be one of {', '.join(FORMATS)}")
    if shard_shape is None or tuple(shard_shape) == tuple(chunk):
        return None
    if format == NGFF_04:
        raise ConfigError(f"`shard_shape` needs format {NGFF_05!r} (Zarr v3); {format} has none")
    sy, sx = (int(v) for v in shard_shape)
    if sy < 1 or sx < 1 or sy % chunk[0] or sx % chunk[1]:
        raise ConfigError(
            f"`shard_shape` ({shard_shape}) must be a positive whole number of chunks {chunk}"
        )
    return sy, sx


def create_level(
    group: zarr.Group,
    k: int,
    shape: tuple[int, int],
    dtype: str,
    *,
    chunk_shape: tuple[int, int],
    shard_shape: tuple[int, int] | None,
    lead: tuple[int, ...] = (),
) -> zarr.Array:
    """Array ``k`` of ``group``, (*lead, *shape), with chunks (and shards) of the level-0 size
    in px, the leading axes whole. An array with leading axes holds probabilities (values
    spread over the whole dtype); one without, a label (see :func:`create_array`)."""
    return create_array(
        group,
        str(k),
        (*lead, *shape),
        (*lead, *chunk_shape),
        dtype,
        shards=None if shard_shape is None else (*lead, *shard_shape),
        dimension_names=AXES[-len(lead) - 2 :],
        spread=bool(lead),
    )


def _stored(array: zarr.Array):
    """``has(ys, xs)``: whether any chunk (or shard) file of ``array`` overlaps those slices
    of its last two axes; None when its files cannot be listed (not a local folder, or laid
    out otherwise), where the caller reads instead."""
    root = getattr(array.store_path.store, "root", None)
    blocks = None if root is None else stored_blocks(Path(root) / array.store_path.path)
    if blocks is None:
        return None
    by, bx = shard_step(array) or (int(array.chunks[-2]), int(array.chunks[-1]))

    def has(ys: slice, xs: slice) -> bool:
        rows = range(ys.start // by, (ys.stop - 1) // by + 1)
        cols = range(xs.start // bx, (xs.stop - 1) // bx + 1)
        return any((i, j) in blocks for i in rows for j in cols)

    return has


def build_pyramid(
    group: zarr.Group,
    shapes: list[tuple[int, int]],
    method: Literal["mean", "nearest"],
    workers: int,
    *,
    chunk_shape: tuple[int, int],
    shard_shape: tuple[int, int] | None,
) -> None:
    """Write levels 1.. of ``group`` (of ``shapes``) from its level 0 on ``workers`` threads."""
    downsample = DOWNSAMPLERS[method]
    source = group["0"]
    lead = tuple(source.shape[:-2])
    for k in range(1, len(shapes)):
        target = create_level(
            group,
            k,
            shapes[k],
            str(source.dtype),
            chunk_shape=chunk_shape,
            shard_shape=shard_shape,
            lead=lead,
        )

        stored = _stored(source)

        def one(box: Box, source: zarr.Array = source, stored=stored) -> np.ndarray | None:
            ys = slice(2 * box.y, 2 * (box.y + box.h))
            xs = slice(2 * box.x, 2 * (box.x + box.w))
            # Nothing stored there (glass: no tissue computed) reads as 0 and downsamples to
            # 0, which the store holds without a write: the pyramid costs what was computed.
            if stored is not None and not stored(ys, xs):
                return None
            block = source[..., ys, xs]
            return downsample(block) if block.any() else None

        write_chunks(for_writing(target), one, workers)
        logger.debug("built %s level %d: %s", group.path or "/", k, target.shape)
        source = target
