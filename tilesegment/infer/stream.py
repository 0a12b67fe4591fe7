"""What every executor runs for its units: read → batch → predict → assemble → write.

:func:`stream_units` reads the read blocks of its units ahead in reader threads (one
``read_region`` per block when that decodes little twice), batches tiles through a predictor
in the calling thread, assembles tile cores into whole chunks and hands finished chunks to one
writer thread, which writes them into the store and then reports them (``on_chunk``) for
recording. In a sharded store the writer gathers a unit's chunks (one shard) and writes the
shard whole once the last is in, then reports them all. Memory is bounded by a few read
blocks and one shard, whatever the slide size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tilesegment.geometry import Box, Tile, TileGrid, tile_indices
from tilesegment.infer.plan import ChunkTask, Unit, read_blocks
from tilesegment.infer.predict import to_model_channels
from tilesegment.io import SlideReader
from tilesegment.store.layout import TISSUE
from tilesegment.store.shards import ShardBuffer

log = logging.getLogger(__name__)


def read_tile(
    reader: SlideReader, level: int, tile: Tile, image_shape: tuple[int, int], channels: int
) -> np.ndarray:
    """Read a tile's source box and mirror it into the (h, w, C) uint8 model input."""
    s = tile.source
    block = reader.read_region(level, s.y, s.x, s.h, s.w)
    block = to_model_channels(block, channels)
    rows, cols = tile_indices(tile, image_shape)
    if tile.pad == ((0, 0), (0, 0)):
        return block
    return block[np.ix_(rows, cols)]


def _cut_tile(block: np.ndarray, origin: tuple[int, int], tile: Tile, shape) -> np.ndarray:
    """A tile's mirror-padded input from a block read at ``origin`` covering its source."""
    dy, dx = tile.source.y - origin[0], tile.source.x - origin[1]
    if tile.pad == ((0, 0), (0, 0)):
        return block[dy : dy + tile.source.h, dx : dx + tile.source.w]  # a view
    rows, cols = tile_indices(tile, shape)
    return block[np.ix_(rows + dy, cols + dx)]


def read_unit(
    reader: SlideReader, level: int, grid: TileGrid, unit: Unit, channels: int
) -> list[tuple[Tile, np.ndarray]]:
    """Every tile of ``unit`` with its (h, w, C) uint8 input, in chunk then tile order.

    Reads the bounding box of the tiles' sources once when that decodes at most twice the
    pixels that reading tile by tile would (neighbouring tiles share their halos, and a JPEG
    tile under two tile reads is decoded twice); sparse units are read tile by tile.
    """
    tiles = [grid.tile(i, j) for task in unit for (i, j) in task.tiles]
    shape = grid.image_shape
    y0 = min(t.source.y for t in tiles)
    x0 = min(t.source.x for t in tiles)
    y1 = max(t.source.y + t.source.h for t in tiles)
    x1 = max(t.source.x + t.source.w for t in tiles)
    tile_area = sum(t.source.h * t.source.w for t in tiles)
    if len(tiles) == 1 or (y1 - y0) * (x1 - x0) > 2 * tile_area:
        return [(t, read_tile(reader, level, t, shape, channels)) for t in tiles]
    block = to_model_channels(reader.read_region(level, y0, x0, y1 - y0, x1 - x0), channels)
    return [(t, _cut_tile(block, (y0, x0), t, shape)) for t in tiles]


class ChunkAssembler:
    """Collects tile cores into chunk buffers and hands out each chunk once it is whole.

    Chunks are registered up front (``chunks``) or as they come (:meth:`expect`). Tiles
    skipped for lack of tissue are simply not expected; their cores stay 0.
    """

    def __init__(self, chunks: Iterable[tuple[Box, list[Tile]]], classes: int) -> None:
        self._classes = classes
        self._chunk_of: dict[tuple[int, int], Box] = {}
        self._remaining: dict[Box, int] = {}
        self._buffers: dict[Box, np.ndarray] = {}
        for box, tiles in chunks:
            self.expect(box, [t.index for t in tiles])

    def expect(self, box: Box, tiles: Iterable[tuple[int, int]]) -> None:
        """Register a chunk and the indices of the tiles that make it up."""
        n = 0
        for index in tiles:
            self._chunk_of[index] = box
            n += 1
        self._remaining[box] = n

    @property
    def open_chunks(self) -> int:
        return len(self._remaining)

    def discard_open(self) -> int:
        """Forget every partially assembled chunk (a stopped run); returns how many."""
        n = len(self._remaining)
        self._chunk_of.clear()
        self._remaining.clear()
        self._buffers.clear()
        return n

    def add(self, tile: Tile, output: np.ndarray) -> tuple[Box, np.ndarray] | None:
        """Place ``output`` (classes, oh, ow) of ``tile``; returns (box, chunk) when complete."""
        box = self._chunk_of.pop(tile.index)
        w, c = tile.write, tile.core
        if self._remaining[box] == 1 and box not in self._buffers and w == box:
            # A chunk that is one tile's core: hand out a view, no copy.
            del self._remaining[box]
            return box, output[:, c.y : c.y + c.h, c.x : c.x + c.w]
        buf = self._buffers.get(box)
        if buf is None:
            buf = np.zeros((self._classes, box.h, box.w), dtype=np.float32)
            self._buffers[box] = buf
        buf[:, w.y - box.y : w.y - box.y + w.h, w.x - box.x : w.x - box.x + w.w] = output[
            :, c.y : c.y + c.h, c.x : c.x + c.w
        ]
        self._remaining[box] -= 1
        if self._remaining[box] == 0:
            del self._remaining[box]
            return box, self._buffers.pop(box)
        return None


class ChunkSink(Protocol):
    """Where :func:`stream_units` writes finished chunks: an :class:`OutputStore`, or any object
    with its ``write_chunk`` (and, when a tissue map is given, ``write_label_chunk``). A sink
    whose ``sharded`` attribute is true (a sharded OutputStore) is written one whole shard at
    a time (its ``shard_box``, a :class:`~tilesegment.store.shards.ShardBuffer`)."""

    def write_chunk(self, box: Box, probabilities: np.ndarray) -> None:
        """Write the (classes, box.h, box.w) float32 probabilities of ``box``."""


def write_chunk(store: ChunkSink, task: ChunkTask, probabilities: np.ndarray, tissue) -> None:
    """Write a finished chunk: probabilities, mask and (with a tissue map) its tissue label."""
    store.write_chunk(task.box, probabilities)
    if tissue is not None:
        store.write_label_chunk(TISSUE, task.box, tissue.render(task.box))


class UnitSource(Protocol):
    """Where :func:`stream_units` takes its units from."""

    def next(self, *, block: bool) -> Unit | None:
        """The next unit; None when there is none (with ``block``: when there will be none)."""


class ListSource:
    """A fixed list of units."""

    def __init__(self, units: Iterable[Unit]) -> None:
        self._it = iter(units)

    def next(self, *, block: bool) -> Unit | None:
        return next(self._it, None)


@dataclass(frozen=True, slots=True)
class _Block:
    """One read block of a unit; ``first`` for the unit's first."""

    unit: Unit
    tasks: Unit
    first: bool


class _Blocks:
    """The read blocks of the units of a source, in order (a source of :class:`_Block`)."""

    def __init__(self, source: UnitSource) -> None:
        self._source = source
        self._queue: deque[_Block] = deque()

    def next(self, *, block: bool) -> _Block | None:
        if not self._queue:
            unit = self._source.next(block=block)
            if unit is None:
                return None
            parts = read_blocks(unit)
            self._queue.extend(_Block(unit, p, i == 0) for i, p in enumerate(parts))
        return self._queue.popleft()


class _ChunkWriter:
    """Writes finished chunks from the writer thread, then reports them (``on_chunk``).

    A sharded store's chunks are gathered per shard (a :class:`ShardBuffer`); the shard is
    written, then its chunks reported, once the last chunk expected of it is in (or when the
    stream ends, with the chunks it has: a stopped stream still writes what it finished).
    """

    def __init__(self, store: ChunkSink, tissue, on_chunk) -> None:
        self.store, self.tissue, self.on_chunk = store, tissue, on_chunk
        self.sharded = bool(getattr(store, "sharded", False))
        self._expected: dict[Box, int] = {}
        self._open: dict[Box, tuple[ShardBuffer, list[ChunkTask]]] = {}
        self._lock = threading.Lock()

    def expect(self, unit: Unit) -> None:
        """Count the chunks of ``unit`` its shards wait for (calling thread)."""
        if not self.sharded:
            return
        with self._lock:
            for task in unit:
                shard = self.store.shard_box(task.box)  # type: ignore[attr-defined]
                self._expected[shard] = self._expected.get(shard, 0) + 1

    def write(self, task: ChunkTask, probabilities: np.ndarray) -> None:
        """Write (or gather) a finished chunk (writer thread)."""
        if not self.sharded:
            write_chunk(self.store, task, probabilities, self.tissue)
            self._report([task])
            return
        shard = self.store.shard_box(task.box)  # type: ignore[attr-defined]
        if shard not in self._open:
            self._open[shard] = (ShardBuffer(self.store, shard), [])  # type: ignore[arg-type]
        buffer, gathered = self._open[shard]
        write_chunk(buffer, task, probabilities, self.tissue)
        gathered.append(task)
        with self._lock:
            self._expected[shard] -= 1
            complete = self._expected[shard] == 0
        if complete:
            self._flush(shard)

    def _flush(self, shard: Box) -> None:
        buffer, gathered = self._open.pop(shard)
        buffer.flush()
        with self._lock:
            self._expected.pop(shard, None)
        self._report(gathered)

    def _report(self, tasks: list[ChunkTask]) -> None:
        if self.on_chunk is not None:
            for task in tasks:
                self.on_chunk(task)

    def close(self) -> None:
        """Write the shards still gathering (a stopped or failed stream); no writes pending."""
        for shard in list(self._open):
            self._flush(shard)


def _prefetch(
    source: Any, load: Callable[[Any], Any], pool: ThreadPoolExecutor, window: int
) -> Iterator[tuple[Any, Any]]:
    """``(item, load(item))`` of a source's items in order, at most ``window`` loads in flight.

    Tops up without blocking, so a worker whose next unit has not arrived yet keeps
    computing the ones it has; blocks only when nothing is pending.
    """
    pending: deque[tuple[Unit, Future]] = deque()
    while True:
        while len(pending) < window:
            unit = source.next(block=not pending)
            if unit is None:
                break
            pending.append((unit, pool.submit(load, unit)))
        if not pending:
            return
        unit, fut = pending.popleft()
        yield unit, fut.result()


class BatchSize:
    """The batch size of a stream, halved for good when the device runs out of memory."""

    def __init__(self, size: int) -> None:
        self.size = size

    def predict(self, predictor: Callable[[np.ndarray], np.ndarray], batch: np.ndarray):
        """``predictor(batch)``, splitting the batch in halves on ``torch.OutOfMemoryError``.

        The halves run one after the other and are concatenated in order, so the result is
        that of the whole batch. A batch of one that does not fit re-raises.
        """
        import torch

        try:
            return predictor(batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = (len(batch) + 1) // 2
            if half < self.size:
                log.warning(
                    "out of device memory with %d tiles per batch; continuing with %d",
                    len(batch),
                    half,
                )
                self.size = half
            return np.concatenate(
                [self.predict(predictor, batch[:half]), self.predict(predictor, batch[half:])]
            )


@dataclass(slots=True)
class StreamStats:
    """What :func:`stream_units` did."""

    tiles: int = 0
    core_px: int = 0
    chunks: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    """Wall seconds inside the predictor (the forward passes, compilation included)."""
    first_batch_seconds: float = 0.0
    """Wall seconds of the first forward pass (with ``torch.compile``: the compilation)."""
    stopped: bool = False
    batch_size: int = 0


def stream_units(
    source: UnitSource,
    *,
    reader: SlideReader,
    level: int,
    grid: TileGrid,
    predictor: Callable[[np.ndarray], np.ndarray],
    classes: int,
    channels: int,
    store: ChunkSink,
    tissue=None,
    batch_size: int = 1,
    read_threads: int = 2,
    on_chunk: Callable[[ChunkTask], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_tile: Callable[[Tile], None] | None = None,
    on_unit: Callable[[Unit], None] | None = None,
    stop: threading.Event | None = None,
) -> StreamStats:
    """Compute and write every chunk of the units ``source`` yields.

    Reader threads read read blocks ahead (at most ``read_threads + 1``); the calling thread
    runs the predictor; one writer thread writes finished chunks and then calls
    ``on_chunk(task)`` (from the writer thread; in a sharded store once the chunk's shard is
    written). ``on_unit(unit)`` is called when the computation of a unit starts,
    ``on_batch(tiles, core_px)`` after each forward pass, ``on_tile`` before a tile enters a
    batch (a test hook). When ``stop`` is set the stream ends after the current batch:
    finished chunks are written (with the shards they are in), partial ones
    dropped. An exception stops the stream the same way, then propagates.
    """
    assembler = ChunkAssembler((), classes)
    tasks: dict[Box, ChunkTask] = {}
    sizer = BatchSize(batch_size)
    stats = StreamStats(batch_size=batch_size)

    def load(item: _Block) -> list[tuple[Tile, np.ndarray]]:
        return read_unit(reader, level, grid, item.tasks, channels)

    chunks = _ChunkWriter(store, tissue, on_chunk)

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    t0 = time.perf_counter()
    with (
        ThreadPoolExecutor(read_threads, thread_name_prefix="ts-read") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="ts-write") as writer,
    ):
        batch = _Batch(predictor, sizer, assembler, tasks, stats, on_batch, writer, chunks.write)
        try:
            for item, tiles in _prefetch(_Blocks(source), load, readers, read_threads + 1):
                if item.first:
                    chunks.expect(item.unit)
                    if on_unit is not None:
                        on_unit(item.unit)
                for task in item.tasks:
                    assembler.expect(task.box, task.tiles)
                    tasks[task.box] = task
                for tile, pixels in tiles:
                    if on_tile is not None:
                        on_tile(tile)
                    if batch.add(tile, pixels):
                        batch.flush()
                        if stopped():
                            raise _Stop
                if batch.tiles:  # a block's last chunk must not wait for the next block
                    batch.flush()
                if stopped():
                    raise _Stop
        except _Stop:
            stats.stopped = True
        finally:
            dropped = assembler.discard_open()
            if dropped:
                log.debug("dropped %d partially computed chunks", dropped)
            # Finished chunks are written even when the stream stops or fails.
            batch.wait_for_writes(0)
            chunks.close()
    stats.seconds = time.perf_counter() - t0
    stats.batch_size = sizer.size
    return stats


class _Batch:
    """The tiles waiting for the next forward pass of :func:`stream_units`; a pass places their
    outputs and hands every chunk they complete to the writer (at most 2 writes pending)."""

    def __init__(
        self,
        predictor: Callable[[np.ndarray], np.ndarray],
        sizer: BatchSize,
        assembler: ChunkAssembler,
        tasks: dict[Box, ChunkTask],
        stats: StreamStats,
        on_batch: Callable[[int, int], None] | None,
        writer: ThreadPoolExecutor,
        write: Callable[[ChunkTask, np.ndarray], None],
    ) -> None:
        self.predictor, self.sizer, self.assembler, self.tasks = predictor, sizer, assembler, tasks
        self.stats, self.on_batch, self.writer, self.write = stats, on_batch, writer, write
        self.tiles: list[Tile] = []
        self.pixels: list[np.ndarray] = []
        self.writes: deque[Future[None]] = deque()

    def add(self, tile: Tile, pixels: np.ndarray) -> bool:
        """Queue a tile; True when the batch is full."""
        self.tiles.append(tile)
        self.pixels.append(pixels)
        return len(self.tiles) >= self.sizer.size

    def flush(self) -> None:
        """Predict the queued tiles, place them, write the chunks they complete."""
        batch = np.stack(self.pixels)
        t0 = time.perf_counter()
        probs = self.sizer.predict(self.predictor, batch)
        seconds = time.perf_counter() - t0
        if not self.stats.tiles:
            self.stats.first_batch_seconds = seconds
        self.stats.forward_seconds += seconds
        px = 0
        for tile, out in zip(self.tiles, probs, strict=True):
            finished = self.assembler.add(tile, out)
            if finished is not None:
                box, chunk = finished
                self.writes.append(self.writer.submit(self.write, self.tasks.pop(box), chunk))
                self.stats.chunks += 1
                self.wait_for_writes(2)
            px += tile.write.h * tile.write.w
        self.stats.tiles += len(self.tiles)
        self.stats.core_px += px
        if self.on_batch is not None:
            self.on_batch(len(self.tiles), px)
        self.tiles.clear()
        self.pixels.clear()

    def wait_for_writes(self, pending: int) -> None:
        """Wait until at most ``pending`` chunk writes are pending (raising their errors)."""
        while len(self.writes) > pending:
            self.writes.popleft().result()


class _Stop(Exception):
    """Internal: ``stop`` was set."""
