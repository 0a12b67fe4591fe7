"""Whole-shard writes: how a sharded (NGFF 0.5) store is written without races or rewrites.

A shard is one file holding many chunks, and zarr rewrites all of it to change any part of it
(read the file, merge, write it back). Two writers of one shard would lose each other's
chunks, and writing its chunks one by one would rewrite the file once per chunk. So every
shard is gathered in memory and written once, by its only writer:

* a run makes each unit of work exactly the chunks of one shard
  (:func:`tilesegment.infer.plan.plan_work`), so the worker computing a unit is the shard's
  only writer; its writer thread gathers the unit's chunks in a :class:`ShardBuffer` and
  writes the shard when the unit's last chunk is in;
* ``finalize`` (pyramid levels) and ``export`` (instance labels) compute the chunks of one
  shard at a time, on several threads, into an :class:`ArrayShard` (:func:`write_chunks`).

A chunk of the shard that was not written keeps what the store holds (read back chunk by
chunk when the shard is written): chunks without tissue stay 0, and a resumed run whose
shard was partly recorded keeps the recorded chunks. Memory: one shard of stored values
(``itemsize`` bytes per px and channel of each array gathered).

Arrays without shards (NGFF 0.4) have one file per chunk: :func:`write_chunks` writes each
chunk directly, in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import zarr

from tilesegment.errors import StoreError
from tilesegment.geometry import Box
from tilesegment.store.arrays import check_aligned
from tilesegment.store.layout import MASK

if TYPE_CHECKING:
    from tilesegment.store.output import OutputStore


def grid_boxes(
    shape: tuple[int, int], step: tuple[int, int], within: Box | None = None
) -> Iterator[Box]:
    """Boxes of a regular grid of ``step`` px over an image of ``shape`` (clipped to it),
    row-major; with ``within``, only those inside that (grid-aligned) box."""
    (h, w), (sy, sx) = shape, step
    area = within or Box(0, 0, h, w)
    for y in range(area.y, area.y + area.h, sy):
        for x in range(area.x, area.x + area.w, sx):
            yield Box(y, x, min(sy, h - y), min(sx, w - x))


def shard_step(array: zarr.Array) -> tuple[int, int] | None:
    """(y, x) px of the shards of ``array``, None when it has none (one file per chunk)."""
    shards = array.shards
    return None if shards is None else (int(shards[-2]), int(shards[-1]))


class ArrayShard:
    """The values of one shard of one array, gathered in memory and written whole.

    Lifecycle: construct, :meth:`put` chunk-aligned boxes inside ``box`` (from several threads
    at once when they are disjoint), then :meth:`flush` once. Not picklable.

    Parameters
    ----------
    array : zarr.Array
        (..., H, W); the leading axes (the classes of the probabilities) are written whole.
    box : Box
        The shard, in the last two axes, clipped to the array.
    """

    def __init__(self, array: zarr.Array, box: Box) -> None:
        self.array = array
        self.box = box
        self._values = np.zeros((*array.shape[:-2], box.h, box.w), dtype=array.dtype)
        self._chunk = (int(array.chunks[-2]), int(array.chunks[-1]))
        self._put: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def _local(self, box: Box) -> tuple[slice, slice]:
        y, x = box.y - self.box.y, box.x - self.box.x
        return slice(y, y + box.h), slice(x, x + box.w)

    def put(self, box: Box, values: np.ndarray) -> None:
        """Place ``values`` (..., box.h, box.w), already in the array's dtype, at ``box``."""
        shape = (int(self.array.shape[-2]), int(self.array.shape[-1]))
        check_aligned(box, shape, self._chunk)
        inside = (
            self.box.y <= box.y
            and box.y + box.h <= self.box.y + self.box.h
            and self.box.x <= box.x
            and box.x + box.w <= self.box.x + self.box.w
        )
        if not inside:
            raise StoreError(f"box {box} lies outside the shard {self.box}")
        self._values[(..., *self._local(box))] = values
        with self._lock:
            self._put.add((box.y, box.x))

    @property
    def nbytes(self) -> int:
        return self._values.nbytes

    def flush(self) -> None:
        """Write the shard in one piece (chunks never put keep the values stored now), then
        free the values."""
        shape = (int(self.array.shape[-2]), int(self.array.shape[-1]))
        for box in grid_boxes(shape, self._chunk, within=self.box):
            if (box.y, box.x) not in self._put:
                self._values[(..., *self._local(box))] = self.array[(..., *box.slices)]
        self.array[(..., *self.box.slices)] = self._values
        self._values = np.empty((0,) * self._values.ndim, dtype=self._values.dtype)  # freed


def write_chunks(
    array: zarr.Array, compute: Callable[[Box], np.ndarray | None], threads: int
) -> None:
    """Write ``compute(box)`` into every chunk ``box`` of ``array`` (last two axes); a chunk
    for which it returns None keeps what the store holds (nothing is written).

    Without shards, chunks are computed and written in parallel on ``threads`` threads. With
    shards, one shard at a time: its chunks are computed in parallel into an
    :class:`ArrayShard`, which is then written whole (memory: one shard); a shard none of
    whose chunks was computed is not written at all.
    """
    shape = (int(array.shape[-2]), int(array.shape[-1]))
    chunk = (int(array.chunks[-2]), int(array.chunks[-1]))
    step = shard_step(array)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        if step is None:

            def direct(box: Box) -> None:
                values = compute(box)
                if values is not None:
                    array[(..., *box.slices)] = values

            for _ in pool.map(direct, grid_boxes(shape, chunk)):
                pass
            return
        for shard_box in grid_boxes(shape, step):
            shard = ArrayShard(array, shard_box)

            def gather(box: Box, shard: ArrayShard = shard) -> bool:
                values = compute(box)
                if values is not None:
                    shard.put(box, values)
                return values is not None

            if any(list(pool.map(gather, grid_boxes(shape, chunk, within=shard_box)))):
                shard.flush()


class ShardBuffer:
    """One level-0 shard of an :class:`~tilesegment.store.output.OutputStore`: probabilities,
    mask and labels gathered chunk by chunk, then written whole by :meth:`flush`.

    Has the store's ``write_chunk`` and ``write_label_chunk`` (same checks, same stored
    values), so a stream writes into it as into the store. Lifecycle: construct with the
    store and the shard's box (:meth:`OutputStore.shard_box`), write its chunks from one
    thread (or several, on disjoint chunks), :meth:`flush` once. Not picklable.
    """

    def __init__(self, store: OutputStore, box: Box) -> None:
        self.store = store
        self.box = box
        self._arrays: dict[str | None, ArrayShard] = {}

    def _shard(self, name: str | None) -> ArrayShard:
        if name not in self._arrays:
            array = self.store.probabilities if name is None else self.store.label(name)
            self._arrays[name] = ArrayShard(array, self.box)
        return self._arrays[name]

    def write_chunk(self, box: Box, probabilities: np.ndarray) -> None:
        """As :meth:`OutputStore.write_chunk`, into this buffer."""
        stored, mask = self.store.chunk_values(box, probabilities)
        self._shard(None).put(box, stored)
        self._shard(MASK).put(box, mask)

    def write_label_chunk(self, name: str, box: Box, data: np.ndarray) -> None:
        """As :meth:`OutputStore.write_label_chunk`, into this buffer."""
        self._shard(name).put(box, self.store.label_values(name, box, data))

    def flush(self) -> None:
        """Write every array gathered, each as one whole shard, smallest first: each is freed
        once written, so the largest is written with only itself in memory."""
        for name in sorted(self._arrays, key=lambda n: self._arrays[n].nbytes):
            self._arrays.pop(name).flush()
