"""The run: read → tile → predict → stitch into OME-Zarr, with bounded memory, resumable.

Work is planned as *chunks* (whole tile cores, one output chunk each, so a chunk has exactly
one writer) grouped into *units* (a block of neighbouring chunks whose tiles are read with one
``read_region``, so overlapping halos and JPEG tiles are decoded about once, not twice).

Two executors run the same per-unit code (:func:`stream_units`):

* in-process (the default on a CPU): reader threads read and mirror-pad tiles (decoding
  releases the GIL), the calling thread batches them through the
  :class:`~tilesegment.infer.predict.Predictor` with all torch threads, and a writer thread
  compresses finished chunks into the store;
* the worker pool (:mod:`tilesegment.infer.pool`, ``--devices cuda:0,cuda:1`` or
  ``--workers N``): one process per device runs :func:`stream_units` on the units it is sent
  and writes its chunks itself; the parent plans, dispatches, retries and records.

Either way the coordinating process records each chunk in the durable done log
(:mod:`tilesegment.infer.resume`) once its files are on disk, so a killed run resumes with
``resume=True`` and produces the same bytes. Queues and prefetch windows are bounded by a few
units, so memory does not grow with the slide.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from tilesegment import __version__
from tilesegment.errors import ConfigError, ModelError, SlideReadError, TilesegmentError
from tilesegment.geometry import Box, Tile, TileGrid, tile_grid, tile_indices
from tilesegment.infer.identity import IDENTITY_KEYS, SlideIdentity, check_identity, identify
from tilesegment.infer.predict import to_model_channels
from tilesegment.infer.resume import (
    DoneLog,
    RunLock,
    check_params,
    read_record,
    remove_partial_files,
    write_durably,
    write_params,
)
from tilesegment.io import SlideReader, open_slide
from tilesegment.model.checkpoint import (
    ModelSpec,
    checkpoint_paths,
    file_sha256,
    load_checkpoint,
)
from tilesegment.model.unet import UNet
from tilesegment.store import ClassSpec, OutputStore, is_complete

log = logging.getLogger(__name__)

#: Default input tile edge: the paper's 572 px (or the nearest valid size for other depths).
DEFAULT_TILE_SIZE = 572

#: The JSON run report written into the output at the end of every run (also failed ones).
REPORT_NAME = "tilesegment-report.json"


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a model over a slide. Defaults suit a CPU or a single GPU."""

    tile_size: int | None = None
    """Input tile edge in px (a valid U-Net input size); None picks the model's size nearest 572."""
    batch_size: int = 1
    """Tiles per forward pass (halved automatically on CUDA out-of-memory)."""
    level: int | None = None
    """Pyramid level to read; None picks the coarsest level at or finer than the model's µm/px."""
    mpp: float | None = None
    """The slide's µm/px, for files that lack it or state it wrongly; None trusts the file."""
    tissue: str = "auto"
    """``"auto"`` (detect on a thumbnail), ``"none"`` (process every tile) or a mask path."""
    preview: bool = True
    """Write ``OUT.preview.png`` (thumbnail with mask contours) next to the output."""
    overwrite: bool = False
    """Replace an existing output."""
    resume: bool = False
    """Continue an interrupted output (skipping its finished chunks), or start it if absent."""
    dtype: str = "uint8"
    """Stored probability dtype: ``"uint8"`` (0–255) or ``"float32"``."""
    device: str = "cpu"
    """Device(s): ``"cpu"``, ``"cuda:0"``, ``"cuda:0,cuda:1"`` (one worker process each) or
    ``"auto"`` (every visible GPU, else the CPU)."""
    workers: int | None = None
    """CPU worker processes (None: 1). One CPU worker runs in-process, several split the cores."""
    precision: str = "auto"
    """``"auto"`` (bf16 on CPUs with native bf16, else fp32; bf16 on CUDA where supported, else
    fp16), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only)."""
    compile: bool | None = None
    """``torch.compile`` the model in every worker. None (auto): when the run computes at least
    :data:`COMPILE_MIN_TILES` tiles, enough to repay the compilation (tens of seconds on a CPU;
    1.3x end to end on a 2-core CPU, see benchmarks/RESULTS.md). A model that fails to compile
    (no C++ compiler, an unsupported op) runs eagerly, with a warning."""
    read_threads: int = 2
    """Threads that read, decode and mirror-pad tiles (split between CPU workers)."""
    chunk_target_px: int = 1024
    """Aim for output chunks of about this edge; chunks are a whole number of tile strides."""
    read_block_px: int = 1536
    """Aim for read blocks (units of work) of about this edge; a whole number of chunks."""
    max_retries: int = 2
    """Times a unit of work is retried on another worker after its worker died or raised."""
    fsync: bool = True
    """fsync chunk files and the done log (durable across power cuts, not only crashes)."""
    in_process: bool | None = None
    """Force (True) or forbid (False) the in-process executor; None: in-process for one CPU
    worker, worker processes otherwise."""
    scheduler: str | None = None
    """Address of a dask scheduler (``tcp://host:8786``) whose workers compute the units of
    work (see :mod:`tilesegment.infer.distributed`); the output must be on a shared filesystem."""
    dask_workers: int | None = None
    """Start a local dask cluster of this many worker processes (one thread each) for the run."""
    progress: bool = True
    """Show a progress bar on stderr."""
    command: tuple[str, ...] | None = None
    """Command line recorded in the run report (None: ``sys.argv``)."""


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a finished run did."""

    output: Path
    tiles: int
    image_shape: tuple[int, int]
    tile_size: tuple[int, int]
    seconds: float
    megapixels: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mpx_per_s(self) -> float | None:
        """Computed (processed) Mpx per streaming second; None when no tile was computed.

        Not image Mpx: tiles skipped for lack of tissue or done before a resume cost nothing.
        """
        return self.extra.get("processed_mpx_per_s")


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after flushing its finished chunks; resumable.

    Still a :class:`KeyboardInterrupt`; its message says how far the run got.
    """


# ---------------------------------------------------------------------------------------------
# geometry of a run


#: Tiles a run must compute before ``compile=None`` (auto) compiles the model. Compiling the
#: default model takes ~20 s on a 2-core CPU and then saves ~16 ms per 572 px tile there
#: (50 -> 34 ms end to end), so it pays from ~1400 tiles (benchmarks/RESULTS.md).
COMPILE_MIN_TILES = 2000


def resolve_compile(compile: bool | None, tiles: int) -> bool:
    """Whether a run that computes ``tiles`` tiles compiles its model (see RunOptions)."""
    return tiles >= COMPILE_MIN_TILES if compile is None else bool(compile)


def resolve_tile_size(net: UNet, tile_size: int | None) -> int:
    """The input tile edge to use; raises :class:`ConfigError` naming valid sizes if invalid."""
    if tile_size is None:
        return net.nearest_valid_inputs(DEFAULT_TILE_SIZE)[0]
    net.check_input_size(tile_size, name="--tile-size")
    # Tiles advance by a multiple of the pooling factor and overlap by 4 px (ARCHITECTURE.md).
    smallest = next(s for s in net.valid_input_sizes(64) if net.output_size(s) >= net.pooling + 4)
    if tile_size < smallest:
        raise ConfigError(
            f"--tile-size {tile_size} px leaves a {net.output_size(tile_size)} px output, too "
            f"small for tiles to advance on the {net.pooling} px pooling grid; use at least "
            f"{smallest} (default {net.nearest_valid_inputs(DEFAULT_TILE_SIZE)[0]})"
        )
    return tile_size


def plan_grid(image_shape: tuple[int, int], net: UNet, tile_size: int) -> TileGrid:
    """The tile grid for an image: output tiles of the model, strides on the pooling grid."""
    return tile_grid(
        image_shape, halo=net.halo, output_tile=net.output_size(tile_size), pooling=net.pooling
    )


def tiles_per_chunk(grid: TileGrid, target_px: int) -> tuple[int, int]:
    """Whole tile strides per chunk so that chunks are about ``target_px`` on each side."""
    return tuple(max(1, round(target_px / s)) for s in grid.stride)  # type: ignore[return-value]


ChunkKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ChunkTask:
    """One output chunk to compute: small and picklable (workers rebuild tiles from the grid)."""

    unit: int
    """Index of the unit (read block) the chunk belongs to."""
    key: ChunkKey
    """(row, column) of the chunk in the store's chunk grid."""
    box: Box
    """The chunk in image coordinates (clipped to the image)."""
    tiles: tuple[tuple[int, int], ...]
    """Grid indices of the tiles to compute; their cores tile ``box`` exactly, except tiles
    skipped for lack of tissue, whose cores stay 0."""


Unit = tuple[ChunkTask, ...]
"""A block of neighbouring chunks read together; the unit of dispatch and retry."""


@dataclass(frozen=True, slots=True)
class WorkPlan:
    """Everything needed to process chunks of one run, picklable for worker processes."""

    grid: TileGrid
    chunk_shape: tuple[int, int]
    """Level-0 chunk size of the store; chunk (i, j) starts at (i * cy, j * cx)."""
    tiles_per_chunk: tuple[int, int]
    units: list[Unit]
    """Units still to compute, in row-major order of their blocks."""
    tiles_total: int
    tiles_no_tissue: int
    tiles_done_before: int
    chunks_done_before: int
    tiles_with_tissue: int = 0
    """Tiles the whole run computes (done before or not): the same for a run and its resumes."""


def plan_work(
    grid: TileGrid,
    opts: RunOptions,
    *,
    tissue=None,
    done: set[ChunkKey] | frozenset[ChunkKey] = frozenset(),
) -> WorkPlan:
    """Chunks to compute (minus ``done`` ones and tissue-free tiles), grouped into units.

    Tiles are built one at a time and kept only as indices, so planning an 80k² slide needs
    memory for the chunks that have tissue only.
    """
    ky, kx = tiles_per_chunk(grid, opts.chunk_target_px)
    gy, gx = grid.grid_shape
    cy, cx = ky * grid.stride[0], kx * grid.stride[1]
    h, w = grid.image_shape
    nrows, ncols = -(-gy // ky), -(-gx // kx)
    # Read blocks of whole chunks, about read_block_px on a side.
    by = max(1, round(opts.read_block_px / cy))
    bx = max(1, round(opts.read_block_px / cx))
    units: list[Unit] = []
    no_tissue = done_tiles = done_chunks = work = 0
    for r0 in range(0, nrows, by):
        for c0 in range(0, ncols, bx):
            unit: list[ChunkTask] = []
            for r in range(r0, min(r0 + by, nrows)):
                for c in range(c0, min(c0 + bx, ncols)):
                    rows = range(r * ky, min((r + 1) * ky, gy))
                    cols = range(c * kx, min((c + 1) * kx, gx))
                    keep = tuple(
                        (i, j)
                        for i in rows
                        for j in cols
                        if tissue is None or tissue.any_in(grid.tile(i, j).read)
                    )
                    work += len(keep)
                    if (r, c) in done:
                        done_chunks += 1
                        done_tiles += len(rows) * len(cols)
                        continue
                    no_tissue += len(rows) * len(cols) - len(keep)
                    if keep:
                        y, x = r * cy, c * cx
                        box = Box(y, x, min(cy, h - y), min(cx, w - x))
                        unit.append(ChunkTask(len(units), (r, c), box, keep))
            if unit:
                units.append(tuple(unit))
    return WorkPlan(
        grid=grid,
        chunk_shape=(min(cy, h), min(cx, w)),
        tiles_per_chunk=(ky, kx),
        units=units,
        tiles_total=len(grid),
        tiles_no_tissue=no_tissue,
        tiles_done_before=done_tiles,
        chunks_done_before=done_chunks,
        tiles_with_tissue=work,
    )


# ---------------------------------------------------------------------------------------------
# reading


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


# ---------------------------------------------------------------------------------------------
# assembling and writing chunks


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


def chunk_files(output: Path, key: ChunkKey, *, tissue: bool) -> tuple[Path, ...]:
    """The files one level-0 chunk occupies (Zarr v2 keys with '/' separators, see store)."""
    i, j = (str(v) for v in key)
    files = [output / "0" / "0" / i / j, output / "labels" / "mask" / "0" / i / j]
    if tissue:
        files.append(output / "labels" / "tissue" / "0" / i / j)
    return tuple(files)


def write_chunk(store: OutputStore, task: ChunkTask, probabilities: np.ndarray, tissue) -> None:
    """Write a finished chunk: probabilities, mask and (with a tissue map) its tissue label."""
    store.write_chunk(task.box, probabilities)
    if tissue is not None:
        store.write_label_chunk("tissue", task.box, tissue.render(task.box))


# ---------------------------------------------------------------------------------------------
# streaming units through a predictor


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


def _prefetch(
    source: UnitSource, load: Callable[[Unit], Any], pool: ThreadPoolExecutor, window: int
) -> Iterator[tuple[Unit, Any]]:
    """``(unit, load(unit))`` in order with at most ``window`` loads in flight.

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
    store: OutputStore,
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

    Reader threads read whole units ahead (at most ``read_threads + 1``); the calling thread
    runs the predictor; one writer thread writes finished chunks and then calls
    ``on_chunk(task)`` (from the writer thread). ``on_unit(unit)`` is called when the
    computation of a unit starts, ``on_batch(tiles, core_px)`` after each forward pass,
    ``on_tile`` before a tile enters a batch (a test hook). When ``stop``
    is set the stream ends after the current batch: finished chunks are written, partial ones
    dropped. An exception stops the stream the same way, then propagates.
    """
    assembler = ChunkAssembler((), classes)
    tasks: dict[Box, ChunkTask] = {}
    sizer = BatchSize(batch_size)
    stats = StreamStats(batch_size=batch_size)
    writes: deque[Future[None]] = deque()

    def load(unit: Unit) -> list[tuple[Tile, np.ndarray]]:
        return read_unit(reader, level, grid, unit, channels)

    def write(task: ChunkTask, probs: np.ndarray) -> None:
        write_chunk(store, task, probs, tissue)
        if on_chunk is not None:
            on_chunk(task)

    t0 = time.perf_counter()
    with (
        ThreadPoolExecutor(read_threads, thread_name_prefix="ts-read") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="ts-write") as writer,
    ):
        batch_tiles: list[Tile] = []
        batch_pixels: list[np.ndarray] = []

        def flush() -> None:
            probs = sizer.predict(predictor, np.stack(batch_pixels))
            px = 0
            for tile, out in zip(batch_tiles, probs, strict=True):
                finished = assembler.add(tile, out)
                if finished is not None:
                    box, chunk = finished
                    writes.append(writer.submit(write, tasks.pop(box), chunk))
                    stats.chunks += 1
                    while len(writes) > 2:
                        writes.popleft().result()
                px += tile.write.h * tile.write.w
            stats.tiles += len(batch_tiles)
            stats.core_px += px
            if on_batch is not None:
                on_batch(len(batch_tiles), px)
            batch_tiles.clear()
            batch_pixels.clear()

        try:
            for unit, tiles in _prefetch(source, load, readers, read_threads + 1):
                if on_unit is not None:
                    on_unit(unit)
                for task in unit:
                    assembler.expect(task.box, task.tiles)
                    tasks[task.box] = task
                for tile, pixels in tiles:
                    if on_tile is not None:
                        on_tile(tile)
                    batch_tiles.append(tile)
                    batch_pixels.append(pixels)
                    if len(batch_tiles) >= sizer.size:
                        flush()
                        if stop is not None and stop.is_set():
                            raise _Stop
                if batch_tiles:  # a unit's last chunk must not wait for the next unit
                    flush()
                if stop is not None and stop.is_set():
                    raise _Stop
        except _Stop:
            stats.stopped = True
        finally:
            dropped = assembler.discard_open()
            if dropped:
                log.debug("dropped %d partially computed chunks", dropped)
            # Finished chunks are written even when the stream stops or fails.
            while writes:
                writes.popleft().result()
    stats.seconds = time.perf_counter() - t0
    stats.batch_size = sizer.size
    return stats


class _Stop(Exception):
    """Internal: ``stop`` was set."""


# ---------------------------------------------------------------------------------------------
# sources, tissue, options


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="tile",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )


@dataclass(frozen=True, slots=True)
class Source:
    """The pixels a run segments: a reader view at the model's resolution."""

    reader: SlideReader
    """Reader to take tiles from (level ``level``); may be a resampled view."""
    level: int
    """Level of ``reader`` to read."""
    source_level: int
    """Pyramid level of the slide the pixels come from."""
    image_shape: tuple[int, int]
    """(h, w) of the segmented image."""
    mpp: tuple[float, float] | None
    """µm/px of the segmented image, None when unknown."""
    level0_per_px: float
    """Level-0 slide px per segmented px (for coordinates exported in level-0 frame)."""
    slide_mpp: float | None = None
    """The µm/px taken for the slide's level 0 (the file's, ``--mpp`` or the model's)."""


def open_source(reader: SlideReader, spec: ModelSpec, opts: RunOptions) -> Source:
    """Pick the level to read and, when the model declares a µm/px, resample to it."""
    from tilesegment.io.resample import MPP_TOLERANCE, ResampledReader, choose_level

    info = reader.info
    name = info.path.name
    if opts.level is not None and not 0 <= opts.level < info.level_count:
        raise ConfigError(
            f"--level {opts.level} out of range: {name} has levels 0..{info.level_count - 1}"
        )
    base = opts.mpp if opts.mpp is not None else (info.mpp[1] if info.mpp else None)
    if base is None and spec.mpp is not None:
        log.warning(
            "%s has no µm/px; taking it to be at the model's %.4g µm/px (pass --mpp to state it)",
            name,
            spec.mpp,
        )
        base = spec.mpp
    if spec.mpp is None or base is None:
        level = opts.level or 0
        ds = info.level_downsamples[level]
        mpp = None if base is None else (base * ds, base * ds)
        return Source(reader, level, level, info.level_shapes[level], mpp, ds, base)
    level = choose_level(info, spec.mpp, mpp=base) if opts.level is None else opts.level
    ds = info.level_downsamples[level]
    level_mpp = base * ds
    if abs(level_mpp / spec.mpp - 1) <= MPP_TOLERANCE:
        shape = info.level_shapes[level]
        return Source(reader, level, level, shape, (level_mpp, level_mpp), ds, base)
    view = ResampledReader(reader, level, source_mpp=level_mpp, target_mpp=spec.mpp)
    log.info(
        "%s: resampling level %d (%.4g µm/px) to the model's %.4g µm/px",
        name,
        level,
        level_mpp,
        spec.mpp,
    )
    return Source(view, 0, level, view.info.shape, (spec.mpp, spec.mpp), spec.mpp / base, base)


def _user_tissue_mask(reader: SlideReader, tissue: str):
    """The user's ``--tissue MASK`` (None for auto or none), checked against the slide's
    aspect ratio before the run takes its output."""
    from tilesegment.tissue import load_tissue_mask

    if tissue in ("auto", "none"):
        return None
    return load_tissue_mask(Path(tissue), reader.info)


def _tissue_map(job: _Job, run: _Run):
    """The tissue map for this run (None = process everything) and the thumbnail, read only
    when tissue detection or the preview needs it. Records how the map was made in ``run``
    and warns when it holds no tissue at all."""
    from tilesegment.tissue import TissueMap, auto_tissue, read_thumbnail

    tissue, reader = job.opts.tissue, job.reader
    thumbnail = read_thumbnail(reader)[0] if job.opts.preview or tissue == "auto" else None
    if tissue == "none":
        run.tissue = {"mode": "none", "how": "every tile is computed", "fraction": None}
        return None, thumbnail
    if tissue == "auto":
        mask, how = auto_tissue(thumbnail, reader.info.shape)
    else:
        mask, how = job.tissue_mask, f"the mask {Path(tissue).name}"
    tmap = TissueMap(mask, job.source.image_shape)
    run.tissue = {"mode": "auto" if tissue == "auto" else "mask", "how": how}
    run.tissue.update(fraction=round(tmap.fraction, 6), found=tmap.found)
    if not tmap.found:
        log.warning(
            "%s: NO TISSUE FOUND (%s): no tile is computed and the output is all background; "
            "pass --tissue none to segment every tile",
            job.slide.name,
            how,
        )
    return tmap, thumbnail


def _check_options(opts: RunOptions) -> None:
    if opts.batch_size < 1:
        raise ConfigError(f"`batch_size` ({opts.batch_size}) must be >= 1")
    if opts.tissue not in ("auto", "none") and not Path(opts.tissue).exists():
        raise ConfigError(f"--tissue {opts.tissue}: no such mask file; use auto, none or a path")
    if opts.resume and opts.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if opts.workers is not None and opts.workers < 1:
        raise ConfigError(f"`workers` ({opts.workers}) must be >= 1")
    if opts.max_retries < 0:
        raise ConfigError(f"`max_retries` ({opts.max_retries}) must be >= 0")
    if opts.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {opts.precision!r} must be auto, fp32, bf16 or fp16")
    if opts.scheduler is not None or opts.dask_workers is not None:
        _check_dask_options(opts)


def _check_dask_options(opts: RunOptions) -> None:
    from tilesegment.infer.distributed import require_distributed

    if opts.scheduler is not None and opts.dask_workers is not None:
        raise ConfigError("--scheduler and --dask-workers contradict each other; pass one of them")
    if opts.dask_workers is not None and opts.dask_workers < 1:
        raise ConfigError(f"`dask_workers` ({opts.dask_workers}) must be >= 1")
    if opts.workers is not None:
        raise ConfigError(
            "--workers sets local worker processes; with --scheduler or --dask-workers the dask "
            "workers compute (drop --workers)"
        )
    if opts.in_process:
        raise ConfigError("`in_process=True` contradicts a dask run (scheduler or dask_workers)")
    require_distributed()


def preview_path(output: str | Path) -> Path:
    """``OUT.preview.png`` beside ``OUT.zarr``."""
    out = Path(output)
    return out.with_name(out.name.removesuffix(".zarr") + ".preview.png")


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class _Run:
    """Mutable bookkeeping of one run, for the report."""

    started: str
    t0: float
    resumed: bool = False
    tiles_processed: int = 0
    core_px: int = 0
    chunks_written: int = 0
    stream_seconds: float = 0.0
    devices: list[dict[str, Any]] = field(default_factory=list)
    failed_tiles: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    worker_peak_rss_mb: float = 0.0
    compiled: bool = False
    tissue: dict[str, Any] = field(default_factory=dict)
    """How the tissue map was made (mode, how, fraction, found), for the report."""
    reader: SlideReader | None = None
    """The run's own reader (thumbnail, in-process tiles): its decode warnings go in the report."""
    decode_warnings: dict[tuple[int, int, int], dict[str, Any]] = field(default_factory=dict)
    """Corrupt-but-decodable segments reported by worker readers, by (level, row, column)."""


def add_decode_warnings(run: _Run, warnings: Iterable[Mapping[str, Any]]) -> None:
    """Merge :meth:`DecodeWarning.as_dict` records into ``run`` (each segment once)."""
    for w in warnings:
        run.decode_warnings.setdefault((w["level"], w["row"], w["column"]), dict(w))


def _decode_warnings_doc(run: _Run) -> dict[str, Any]:
    """The report's ``decode_warnings``: tiles/strips of the slide that decoded with errors."""
    if run.reader is not None:
        add_decode_warnings(run, (w.as_dict() for w in run.reader.decode_warnings()))
    tiles = [run.decode_warnings[k] for k in sorted(run.decode_warnings)]
    return {"count": len(tiles), "tiles": tiles}


def run_slide(
    slide: str | Path,
    output: str | Path,
    model: str | Path,
    options: RunOptions | None = None,
) -> RunSummary:
    """Segment ``slide`` with the checkpoint ``model`` into the OME-Zarr ``output``.

    The output is marked complete only after every chunk, pyramid level and metadata document is
    written; any failure leaves it visibly incomplete (see :mod:`tilesegment.store`) and
    resumable with ``resume=True``. A JSON report is written into the output either way.

    Raises
    ------
    StoreError
        Another run holds ``output`` (its lock names it), or the output cannot be written.
    RunInterrupted
        SIGINT (KeyboardInterrupt) arrived; finished chunks were flushed and recorded.
    WorkerError
        Tiles still failed after ``max_retries`` retries on the worker pool.
    """
    from tilesegment.infer.pool import (
        reset_peak_rss,
        resolve_devices,
        resolve_precision,
        tune_malloc,
    )

    opts = options or RunOptions()
    _check_options(opts)
    tune_malloc()  # flat peak RSS whatever the slide size (see the function)
    reset_peak_rss()  # the report's peak is this run's, not an earlier run's in this process
    run = _Run(started=_now(), t0=time.perf_counter())
    net, spec = load_checkpoint(model, device="cpu")
    tile_size = resolve_tile_size(net, opts.tile_size)
    devices = resolve_devices(opts.device, opts.workers)
    precisions = sorted({resolve_precision(opts.precision, d) for d in devices})
    in_process = devices == ["cpu"] if opts.in_process is None else opts.in_process
    if in_process and len(devices) > 1:
        raise ConfigError("several devices or workers need worker processes (in_process=False)")
    with open_slide(slide) as reader:
        source = open_source(reader, spec, opts)
        grid = plan_grid(source.image_shape, net, tile_size)
        tissue_mask = _user_tissue_mask(reader, opts.tissue)
        # Inputs are valid: take the output before reading anything slow.
        with RunLock(output):
            job = _Job(
                slide=Path(slide),
                model=Path(model),
                output=Path(output),
                opts=opts,
                reader=reader,
                source=source,
                grid=grid,
                net=net,
                spec=spec,
                devices=devices,
                precisions=precisions,
                in_process=in_process,
                tissue_mask=tissue_mask,
            )
            return _run_locked(job, run)


@dataclass(frozen=True, slots=True)
class _Job:
    """The validated inputs of a run."""

    slide: Path
    model: Path
    output: Path
    opts: RunOptions
    reader: SlideReader
    source: Source
    grid: TileGrid
    net: UNet
    spec: ModelSpec
    devices: list[str]
    precisions: list[str]
    in_process: bool
    tissue_mask: Any = None
    """The user's ``--tissue MASK`` as a boolean array (None for auto or none)."""


def _run_locked(job: _Job, run: _Run) -> RunSummary:
    """Create or reopen the output, compute what is missing, finalise, report."""
    opts, source, grid, output = job.opts, job.source, job.grid, job.output
    run.reader = job.reader
    tissue, thumbnail = _tissue_map(job, run)
    model_sha = file_sha256(checkpoint_paths(job.model)[0])
    ky, kx = tiles_per_chunk(grid, opts.chunk_target_px)
    chunk_shape = (ky * grid.stride[0], kx * grid.stride[1])
    slide = _identify(job.slide)
    params = {
        **slide.params(),  # name, bytes and content fingerprint: checked on --resume
        "image_shape": list(source.image_shape),
        "level": source.source_level,
        "mpp": None if source.mpp is None else list(source.mpp),
        "model_sha256": model_sha,
        "tile_size": list(grid.input_shape),
        "stride": list(grid.stride),
        "halo": grid.halo,
        "chunk_shape": list(chunk_shape),
        "tissue": _tissue_param(opts.tissue),
        "dtype": opts.dtype,
        "precision": ",".join(job.precisions),
    }
    attrs = {
        "tilesegment_version": __version__,
        "slide": str(job.slide.resolve()),
        "level": source.source_level,
        "level0_per_px": source.level0_per_px,
        "model": job.spec.name,
        "model_sha256": model_sha,
        "tile_size": list(grid.input_shape),
        "stride": list(grid.stride),
        "halo": grid.halo,
        "tissue": opts.tissue,
    }
    info = {
        "command": list(opts.command or sys.argv),
        "batch_size": opts.batch_size,
        "devices": job.devices,
        "created": run.started,
        "slide_mtime": slide.mtime,  # a hint only (see tilesegment.infer.identity)
    }
    store, finished = _open_output(
        output, opts, slide, params, info, attrs, source, job.spec, chunk_shape, tissue is not None
    )
    if finished:
        summary = _summary(output, grid, source, tissue, run, None)
        summary.extra["already_complete"] = True
        return summary
    run.resumed = opts.resume
    with DoneLog(output, fsync=opts.fsync) as done_log:
        plan = plan_work(grid, opts, tissue=tissue, done=done_log.done)
        # Decided on the run's whole work, done or not, so that a resumed run compiles (or not)
        # like the interrupted one and writes the same bytes.
        run.compiled = resolve_compile(opts.compile, plan.tiles_with_tissue)
        context = _Context(
            slide=job.slide,
            model=job.model,
            output=output,
            options=replace(
                opts, level=source.source_level, mpp=source.slide_mpp, compile=run.compiled
            ),
            spec=job.spec,
            tissue=tissue,
        )
        try:
            if opts.scheduler is not None or opts.dask_workers is not None:
                from tilesegment.infer.distributed import run_on_dask

                run_on_dask(context, plan, job.devices[0], job.precisions[0], done_log, run)
            elif job.in_process:
                _run_in_process(
                    context, plan, source, job.net, job.devices[0], job.precisions[0], done_log, run
                )
            else:
                _run_pool(context, plan, job.devices, done_log, run)
        except TilesegmentError as exc:
            _finish_failed(done_log, output, plan, run, opts, params, "failed", exc)
            # The same public error class (so the same exit code), plus where the output is;
            # --resume is advised only where it can help (not for a corrupt slide or model).
            public = next(c for c in type(exc).__mro__ if c.__module__ == "tilesegment.errors")
            advice = (
                "running it again will fail the same way"
                if isinstance(exc, (SlideReadError, ConfigError, ModelError))
                else "resume with --resume"
            )
            raise public(f"{exc}; {output} was left incomplete ({advice})") from exc
        except Exception as exc:
            _finish_failed(done_log, output, plan, run, opts, params, "failed", exc)
            raise
        except KeyboardInterrupt as exc:
            _finish_failed(done_log, output, plan, run, opts, params, "interrupted", exc)
            left = plan.tiles_total - plan.tiles_no_tissue - plan.tiles_done_before
            raise RunInterrupted(
                f"interrupted after {run.tiles_processed} of {left} tiles; finished chunks "
                "are recorded: resume with --resume"
            ) from None
    t_final = time.perf_counter()
    store.finalize()
    finalize_s = time.perf_counter() - t_final
    preview = None
    if thumbnail is not None and opts.preview:
        from tilesegment.preview import write_preview

        preview = write_preview(store, thumbnail, preview_path(output), source=source)
    summary = _summary(output, grid, source, tissue, run, preview, plan=plan)
    report = _report(output, opts, params, plan, run, "complete", finalize_s=finalize_s)
    summary.extra["report"] = report
    summary.extra["report_path"] = str(_write_report(output, report))
    return summary


def _tissue_param(tissue: str) -> str:
    if tissue in ("auto", "none"):
        return tissue
    path = Path(tissue)
    if path.is_file():
        return "mask sha256 " + file_sha256(path)
    return "mask " + path.name  # a Zarr folder: its name


def _identify(slide: Path) -> SlideIdentity:
    try:
        return identify(slide)
    except OSError as exc:
        raise SlideReadError(f"{slide}: cannot read it to fingerprint its content ({exc})") from exc


def _open_output(
    output: Path,
    opts: RunOptions,
    slide: SlideIdentity,
    params: dict[str, Any],
    info: dict[str, Any],
    attrs: dict[str, Any],
    source: Source,
    spec: ModelSpec,
    chunk_shape: tuple[int, int],
    with_tissue: bool,
) -> tuple[OutputStore, bool]:
    """Create the output, or reopen it to resume; (store, already complete)."""
    if opts.resume and output.exists():
        record = read_record(output)
        if record is not None:
            stored, stored_info = record
            store = OutputStore.open(output, mode="r+")
            check_identity(
                stored,
                slide,
                output=output,
                stored_path=store.attrs.get("slide"),
                stored_mtime=stored_info.get("slide_mtime"),
            )
            check_params(stored, params, output=output, ignore=IDENTITY_KEYS)
            if store.is_complete():
                log.info("%s is already complete; nothing to resume", output)
                return store, True
            removed = remove_partial_files(output)
            if removed:
                log.info("removed %d partial chunk files left by the interrupted run", removed)
            log.info("resuming %s", output)
            return store, False
        if is_complete(output):
            log.warning("%s is complete but has no run record to check; leaving it", output)
            return OutputStore.open(output, mode="r+"), True
        log.warning("%s has no run record (killed while being created); starting again", output)
    store = OutputStore.create(
        output,
        image_shape=source.image_shape,
        classes=ClassSpec(spec.class_names, spec.class_colours),
        chunk_shape=chunk_shape,
        mpp=source.mpp,
        dtype=opts.dtype,
        overwrite=opts.overwrite or opts.resume,
        attrs=attrs,
    )
    if with_tissue:
        store.create_label("tissue", dtype="uint8", colours={1: (60, 180, 75, 128)})
    # Last: the record that makes the output resumable.
    write_params(output, params, info)
    return store, False


@dataclass(frozen=True, slots=True)
class _Context:
    """What every executor needs besides the plan; picklable (paths, options, small arrays)."""

    slide: Path
    model: Path
    output: Path
    options: RunOptions
    """With ``level`` and ``mpp`` resolved, so that every worker reads the same pixels."""
    spec: ModelSpec
    tissue: Any
    """The run's :class:`~tilesegment.tissue.TissueMap` or None."""


def _run_in_process(
    ctx: _Context,
    plan: WorkPlan,
    source: Source,
    net: UNet,
    device: str,
    precision: str,
    done_log: DoneLog,
    run: _Run,
) -> None:
    import torch

    from tilesegment.infer.pool import make_predictor

    opts = ctx.options
    predictor = make_predictor(net, ctx.spec, device, precision, compile=opts.compile)
    store = OutputStore.open(ctx.output, mode="r+")
    todo = sum(len(t.tiles) for u in plan.units for t in u)
    with _progress(todo, opts.progress) as bar:

        def on_batch(tiles: int, px: int) -> None:
            run.tiles_processed += tiles
            run.core_px += px
            bar.update(tiles)
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{run.core_px / 1e6 / max(elapsed, 1e-9):.2f} Mpx/s")

        def on_chunk(task: ChunkTask) -> None:
            run.chunks_written += 1
            done_log.add(task.key, chunk_files(ctx.output, task.key, tissue=ctx.tissue is not None))

        t0 = time.perf_counter()
        try:
            stream_units(
                ListSource(plan.units),
                reader=source.reader,
                level=source.level,
                grid=plan.grid,
                predictor=predictor,
                classes=ctx.spec.unet.classes,
                channels=ctx.spec.unet.in_channels,
                store=store,
                tissue=ctx.tissue,
                batch_size=opts.batch_size,
                read_threads=opts.read_threads,
                on_chunk=on_chunk,
                on_batch=on_batch,
            )
        finally:
            run.stream_seconds = time.perf_counter() - t0
            run.devices = [
                {
                    "worker": "in-process",
                    "device": device,
                    "threads": torch.get_num_threads(),
                    "precision": precision,
                    "tiles": run.tiles_processed,
                    "megapixels": run.core_px / 1e6,
                    "busy_seconds": run.stream_seconds,
                    "mpx_per_s": run.core_px / 1e6 / max(run.stream_seconds, 1e-9),
                    "restarts": 0,
                }
            ]


def _run_pool(
    ctx: _Context, plan: WorkPlan, devices: list[str], done_log: DoneLog, run: _Run
) -> None:
    from tilesegment.infer.pool import WorkerPool

    opts = ctx.options
    todo = sum(len(t.tiles) for u in plan.units for t in u)
    with _progress(todo, opts.progress) as bar:
        t0 = time.perf_counter()

        def on_chunk(task: ChunkTask, slot: int) -> None:
            run.chunks_written += 1
            run.tiles_processed += len(task.tiles)
            px = _core_px(plan.grid, task)
            run.core_px += px
            done_log.add(task.key, chunk_files(ctx.output, task.key, tissue=ctx.tissue is not None))
            bar.update(len(task.tiles))
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{run.core_px / 1e6 / max(elapsed, 1e-9):.2f} Mpx/s")

        pool = WorkerPool(ctx, plan, devices)
        try:
            result = pool.run(on_chunk)
        finally:
            run.stream_seconds = time.perf_counter() - t0
            run.devices = pool.device_stats()
            run.worker_peak_rss_mb = pool.peak_rss_mb()
            run.errors.extend(pool.errors)
            add_decode_warnings(run, pool.decode_warnings)
    if pool.errors:
        remove_worker_leftovers(ctx.output)
    if result.failed:
        raise_failed_tiles(
            run,
            [task for uid in result.failed for task in result.failed[uid]],
            opts.max_retries,
            pool.errors[-1] if pool.errors else "unknown",
        )


def remove_worker_leftovers(output: Path) -> None:
    """Delete the temporary files of workers killed mid-write (their chunks were written again
    since, by the retry)."""
    removed = remove_partial_files(output)
    if removed:
        log.info("removed %d temporary files left by workers that died", removed)


def raise_failed_tiles(
    run: _Run, tasks: Iterable[ChunkTask], max_retries: int, last_error: str, where: str = ""
) -> NoReturn:
    """Record the tiles of ``tasks`` as failed in ``run`` and raise the run's WorkerError."""
    from tilesegment.errors import WorkerError

    run.failed_tiles = sorted(ij for task in tasks for ij in task.tiles)
    shown = ", ".join(f"({i}, {j})" for i, j in run.failed_tiles[:8])
    more = f" and {len(run.failed_tiles) - 8} more" if len(run.failed_tiles) > 8 else ""
    attempts = "1 attempt" if max_retries == 0 else f"{max_retries + 1} attempts"
    raise WorkerError(
        f"{len(run.failed_tiles)} tiles failed after {attempts}{where} "
        f"(tiles {shown}{more}); last error: {last_error}"
    )


def _core_px(grid: TileGrid, task: ChunkTask) -> int:
    total = 0
    for i, j in task.tiles:
        w = grid.tile(i, j).write
        total += w.h * w.w
    return total


def _finish_failed(
    done_log: DoneLog,
    output: Path,
    plan: WorkPlan,
    run: _Run,
    opts: RunOptions,
    params: dict[str, Any],
    status: str,
    exc: BaseException,
) -> None:
    """Flush the done log and write the report of a run that did not complete."""
    try:
        done_log.flush()
    except TilesegmentError as flush_exc:
        run.errors.append(str(flush_exc))
    if str(exc):
        run.errors.append(f"{type(exc).__name__}: {exc}")
    report = _report(output, opts, params, plan, run, status)
    try:
        _write_report(output, report)
    except OSError as write_exc:
        log.warning("could not write the run report into %s: %s", output, write_exc)


def _summary(
    output: Path,
    grid: TileGrid,
    source: Source,
    tissue,
    run: _Run,
    preview: Path | None,
    *,
    plan: WorkPlan | None = None,
) -> RunSummary:
    h, w = source.image_shape
    return RunSummary(
        output=output,
        tiles=len(grid),
        image_shape=source.image_shape,
        tile_size=grid.input_shape,
        seconds=run.stream_seconds,
        megapixels=h * w / 1e6,
        extra={
            "tiles_processed": run.tiles_processed,
            "tiles_skipped": 0 if plan is None else plan.tiles_no_tissue,
            "tiles_resumed": 0 if plan is None else plan.tiles_done_before,
            "tissue_fraction": None if tissue is None else tissue.fraction,
            "tissue_found": None if tissue is None else tissue.found,
            "mpp": None if source.mpp is None else source.mpp[0],
            "level": source.source_level,
            "preview": None if preview is None else str(preview),
            "devices": run.devices,
            "resumed": run.resumed,
            "compiled": run.compiled,
            "processed_megapixels": run.core_px / 1e6,
            "processed_mpx_per_s": _processed_rate(run),
            "peak_rss_mb": _peak_rss_mb(run),
        },
    )


# ---------------------------------------------------------------------------------------------
# the report


def _now() -> str:
    from tilesegment.infer.resume import now_iso

    return now_iso()


def _processed_rate(run: _Run) -> float | None:
    """Computed Mpx per streaming second, None when no tile was computed (a rate over no
    pixels, or over a stream that did not run, means nothing)."""
    if run.core_px == 0 or run.stream_seconds <= 0:
        return None
    return run.core_px / 1e6 / run.stream_seconds


def _peak_rss_mb(run: _Run) -> dict[str, float]:
    from tilesegment.infer.pool import peak_rss_mb

    return {"main": round(peak_rss_mb(), 1), "workers": round(run.worker_peak_rss_mb, 1)}


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import zarr

    return {
        "tilesegment": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "platform": platform.platform(),
    }


def _report(
    output: Path,
    opts: RunOptions,
    params: dict[str, Any],
    plan: WorkPlan,
    run: _Run,
    status: str,
    *,
    finalize_s: float | None = None,
) -> dict[str, Any]:
    to_do = plan.tiles_total - plan.tiles_no_tissue - plan.tiles_done_before
    h, w = params["image_shape"]
    doc: dict[str, Any] = {
        "status": status,
        "output": str(output),
        "started": run.started,
        "finished": _now(),
        "host": platform.node(),
        "pid": os.getpid(),
        "command": list(opts.command or sys.argv),
        "resumed": run.resumed,
        "params": params,
        "options": {k: v for k, v in asdict(opts).items() if k != "command"},
        "compiled": run.compiled,
        "tiles": {
            "total": plan.tiles_total,
            "processed": run.tiles_processed,
            "skipped_no_tissue": plan.tiles_no_tissue,
            "done_before": plan.tiles_done_before,
            "failed": len(run.failed_tiles),
            "not_done": max(0, to_do - run.tiles_processed),
            "failed_tiles": [list(t) for t in run.failed_tiles],
        },
        "chunks": {
            "written": run.chunks_written,
            "done_before": plan.chunks_done_before,
        },
        "megapixels": {"image": h * w / 1e6, "processed": run.core_px / 1e6},
        "seconds": {
            "total": round(time.perf_counter() - run.t0, 3),
            "stream": round(run.stream_seconds, 3),
            "finalize": None if finalize_s is None else round(finalize_s, 3),
        },
        "mpx_per_s": None if (rate := _processed_rate(run)) is None else round(rate, 4),
        "tissue": run.tissue,
        "devices": run.devices,
        "peak_rss_mb": _peak_rss_mb(run),
        "versions": _versions(),
        "errors": run.errors,
        "decode_warnings": _decode_warnings_doc(run),
    }
    # Earlier attempts on this output (interrupted or failed runs), oldest first.
    doc["history"] = []
    previous = _read_report(output)
    if previous is not None:
        keep = ("status", "started", "finished", "command", "tiles", "seconds")
        doc["history"] = [*previous.get("history", []), {k: previous.get(k) for k in keep}]
    return doc


def _read_report(output: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((output / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_report(output: Path, report: dict[str, Any]) -> Path:
    path = output / REPORT_NAME
    write_durably(path, json.dumps(report, indent=2) + "\n")
    return path


__all__ = [
    "REPORT_NAME",
    "ChunkAssembler",
    "ChunkTask",
    "RunInterrupted",
    "RunOptions",
    "RunSummary",
    "Source",
    "WorkPlan",
    "add_decode_warnings",
    "is_complete",
    "open_source",
    "plan_grid",
    "plan_work",
    "read_tile",
    "read_unit",
    "run_slide",
    "stream_units",
]
