"""The pyramid levels of an output: each level an array with the level-0 chunk and shard size
in px, and levels 1.. built from level 0 by 2 x 2 downsampling.

Level ``k`` is level ``k - 1`` halved (odd sizes round up), until
``max(h, w) <= PYRAMID_MAX_PX``. Probabilities take the mean of each 2 x 2 window (of the
pixels present at odd edges), computed in float32 (exact for uint8) from the stored level
``k - 1`` values and, for uint8, rounded to nearest with ties to even (:func:`numpy.rint`).
Labels take the top-left pixel of each window (``[::2, ::2]``). Each output chunk reads its
2 x 2 chunks of the level above; a sharded level is written one whole shard at a time
(:func:`~tilesegment.store.shards.write_chunks`).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import zarr

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.store.arrays import create_array
from tilesegment.store.layout import FORMATS, NGFF_04, NGFF_05
from tilesegment.store.ngff import DOWNSAMPLERS
from tilesegment.store.shards import write_chunks

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
    in px, the leading axes whole."""
    return create_array(
        group,
        str(k),
        (*lead, *shape),
        (*lead, *chunk_shape),
        dtype,
        shards=None if shard_shape is None else (*lead, *shard_shape),
        dimension_names=AXES[-len(lead) - 2 :],
    )


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

        def one(box: Box, source: zarr.Array = source) -> np.ndarray:
            ys = slice(2 * box.y, 2 * (box.y + box.h))
            xs = slice(2 * box.x, 2 * (box.x + box.w))
            return downsample(source[..., ys, xs])

        write_chunks(target, one, workers)
        logger.debug("built %s level %d: %s", group.path or "/", k, target.shape)
        source = target
