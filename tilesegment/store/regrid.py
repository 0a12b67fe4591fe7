"""Bringing a store's level 0 onto another grid: what a run of a downsample model does once the
network's grid is computed, so that its output lies on the image's own pixels.

Each chunk of the new store is resampled from the old store's level-0 probabilities with the
kernel of :mod:`tilesegment.io.resample` evaluated at global pixel coordinates
(:func:`~tilesegment.io.resample.resample_region`), so a chunk's values do not depend on the
chunk size, and equal those of :func:`~tilesegment.io.resample.resample_probabilities` on the
whole array (what ``predict`` does), bit for bit. The class map is the argmax of the float
values, as every writer of the store computes it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tilesegment.errors import StoreError
from tilesegment.geometry import Box
from tilesegment.io.resample import resample_region
from tilesegment.store.layout import TISSUE, replaced_store_path
from tilesegment.store.output import OutputStore
from tilesegment.store.shards import ShardBuffer, grid_boxes

log = logging.getLogger(__name__)


def regrid_level0(
    source: OutputStore,
    target: OutputStore,
    scale: float,
    *,
    tissue: Callable[[Box], np.ndarray] | None = None,
) -> None:
    """Write every chunk of ``target``'s level 0 from ``source``'s level 0 resampled.

    Parameters
    ----------
    source : OutputStore
        The store to read (probabilities in float32, or uint8 read as ``value / 255``).
    target : OutputStore
        A new store, writable, not finalised, with the same classes.
    scale : float
        ``source`` px per ``target`` px (below 1 when ``target`` is the finer grid).
    tissue : callable, optional
        ``tissue(box)``: the (h, w) uint8 tissue label of a ``target`` box, written into
        ``labels/tissue`` (which ``target`` must have).

    Notes
    -----
    One shard of ``target`` is gathered at a time (a :class:`ShardBuffer`, NGFF 0.5) or each
    chunk written directly (NGFF 0.4); memory: one shard of stored values plus one chunk of
    float64 work arrays.
    """
    probabilities = source.probabilities
    quantised = source.dtype == "uint8"

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        block = np.asarray(probabilities[:, y : y + h, x : x + w]).transpose(1, 2, 0)
        return block / 255.0 if quantised else block

    for shard in grid_boxes(target.image_shape, target.shard_shape):
        sink = ShardBuffer(target, shard) if target.sharded else target
        for box in grid_boxes(target.image_shape, target.chunk_shape, within=shard):
            values = resample_region(read, source.image_shape, (box.y, box.x, box.h, box.w), scale)
            sink.write_chunk(box, np.ascontiguousarray(values.transpose(2, 0, 1), np.float32))
            if tissue is not None:
                sink.write_label_chunk(TISSUE, box, tissue(box))
        if isinstance(sink, ShardBuffer):
            sink.flush()
    log.info(
        "brought %s (%d x %d px) onto %s (%d x %d px)",
        source.path.name,
        *source.image_shape,
        target.path.name,
        *target.image_shape,
    )


def swap_in(staged: Path, output: str | os.PathLike[str]) -> None:
    """Put the complete store ``staged`` in the place of the store at ``output`` and delete
    the replaced one. Two renames in the state folder's file system: a crash between them
    leaves no ``output`` (a ``--resume`` then starts the run again), never a mixed store.
    """
    output = Path(output)
    old = replaced_store_path(output)
    try:
        if old.exists():
            shutil.rmtree(old)
        os.replace(output, old)
        os.replace(staged, output)
        shutil.rmtree(old)
    except OSError as exc:
        raise StoreError(f"cannot put {staged} in the place of {output}: {exc}") from exc
