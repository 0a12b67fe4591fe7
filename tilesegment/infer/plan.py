"""The plan of a run: tile size, tile grid, output chunks (whole tile cores, one writer each)
grouped into units (neighbouring chunks; the unit of dispatch and retry) made of read blocks
(chunks whose pixels are read together).

With one file per chunk (NGFF 0.4) a unit is one read block of about ``read_block_px``. In a
sharded store (NGFF 0.5) a unit is every chunk of one shard still to compute, read block by
block: whoever computes the unit is the only writer of its shard, and writes it whole
(:mod:`tilesegment.store.shards`).

Pure arithmetic on shapes (:mod:`tilesegment.geometry`): planning needs no model weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box, TileGrid, UNetGeometry, tile_grid
from tilesegment.infer.options import DEFAULT_TILE_SIZE, RunOptions
from tilesegment.store.layout import NGFF_04, ChunkKey


def resolve_tile_size(geometry: UNetGeometry, tile_size: int | None) -> int:
    """The input tile edge to use; raises :class:`ConfigError` naming valid sizes if invalid."""
    if tile_size is None:
        return geometry.nearest_valid_inputs(DEFAULT_TILE_SIZE)[0]
    geometry.check_input_size(tile_size, name="--tile-size")
    # Tiles advance by a multiple of the pooling factor and overlap by 4 px (ARCHITECTURE.md).
    smallest = next(
        s for s in geometry.valid_input_sizes(64) if geometry.output_size(s) >= geometry.pooling + 4
    )
    if tile_size < smallest:
        raise ConfigError(
            f"--tile-size {tile_size} px leaves a {geometry.output_size(tile_size)} px output, "
            f"too small for tiles to advance on the {geometry.pooling} px pooling grid; use at "
            f"least {smallest} (default {geometry.nearest_valid_inputs(DEFAULT_TILE_SIZE)[0]})"
        )
    return tile_size


def plan_grid(image_shape: tuple[int, int], geometry: UNetGeometry, tile_size: int) -> TileGrid:
    """The tile grid for an image: output tiles of the model, strides on the pooling grid."""
    return tile_grid(
        image_shape,
        halo=geometry.halo,
        output_tile=geometry.output_size(tile_size),
        pooling=geometry.pooling,
    )


def tiles_per_chunk(grid: TileGrid, target_px: int) -> tuple[int, int]:
    """Whole tile strides per chunk so that chunks are about ``target_px`` on each side."""
    return tuple(max(1, round(target_px / s)) for s in grid.stride)  # type: ignore[return-value]


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
    block: int = 0
    """Index of the read block the chunk belongs to (the chunks of a unit are in block order;
    a unit is one block unless its store is sharded)."""


Unit = tuple[ChunkTask, ...]
"""Neighbouring chunks, the unit of dispatch and retry: one read block, or one shard."""


def shard_chunks(opts: RunOptions, chunk_shape: tuple[int, int]) -> tuple[int, int]:
    """Chunks per shard along (y, x): (1, 1) for NGFF 0.4, else about ``shard_target_px``."""
    if opts.format == NGFF_04:
        return 1, 1
    return tuple(max(1, round(opts.shard_target_px / c)) for c in chunk_shape)  # type: ignore[return-value]


def read_blocks(unit: Unit) -> list[Unit]:
    """The read blocks of ``unit``, in order."""
    blocks: list[list[ChunkTask]] = []
    for task in unit:
        if not blocks or blocks[-1][-1].block != task.block:
            blocks.append([])
        blocks[-1].append(task)
    return [tuple(b) for b in blocks]


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
    work_px: int = 0
    """Output pixels those tiles write (their cores): the tissue the whole run computes."""


def plan_work(
    grid: TileGrid,
    opts: RunOptions,
    *,
    tissue=None,
    done: set[ChunkKey] | frozenset[ChunkKey] = frozenset(),
    shards: tuple[int, int] = (1, 1),
) -> WorkPlan:
    """Chunks to compute (minus ``done`` ones and tissue-free tiles), grouped into units.

    ``shards``: chunks per shard of the store along (y, x); with more than one, each unit is
    the chunks of one shard. Tiles are built one at a time and kept only as indices, so
    planning an 80k² slide needs memory for the chunks that have tissue only.
    """
    ky, kx = tiles_per_chunk(grid, opts.chunk_target_px)
    cy, cx = ky * grid.stride[0], kx * grid.stride[1]
    h, w = grid.image_shape
    # Read blocks of whole chunks, about read_block_px on a side; units of a shard or a block.
    block = (max(1, round(opts.read_block_px / cy)), max(1, round(opts.read_block_px / cx)))
    unit_shape = block if shards == (1, 1) else shards
    counts = _Counts()
    units: list[Unit] = []
    for r0, c0, rows, cols in _blocks((0, 0, *grid_chunks(grid, ky, kx)), unit_shape):
        unit: list[ChunkTask] = []
        for b0, d0, brows, bcols in _blocks((r0, c0, rows, cols), block):
            counts.blocks += 1
            for r in range(b0, b0 + brows):
                for c in range(d0, d0 + bcols):
                    keep = counts.chunk(grid, (r, c), (ky, kx), tissue, done)
                    if keep:
                        y, x = r * cy, c * cx
                        box = Box(y, x, min(cy, h - y), min(cx, w - x))
                        unit.append(ChunkTask(len(units), (r, c), box, keep, counts.blocks))
        if unit:
            units.append(tuple(unit))
    return WorkPlan(
        grid=grid,
        chunk_shape=(min(cy, h), min(cx, w)),
        tiles_per_chunk=(ky, kx),
        units=units,
        tiles_total=len(grid),
        tiles_no_tissue=counts.no_tissue,
        tiles_done_before=counts.done_tiles,
        chunks_done_before=counts.done_chunks,
        tiles_with_tissue=counts.work,
        work_px=counts.work_px,
    )


def grid_chunks(grid: TileGrid, ky: int, kx: int) -> tuple[int, int]:
    """Rows and columns of the chunk grid, for chunks of ``ky x kx`` tiles."""
    gy, gx = grid.grid_shape
    return -(-gy // ky), -(-gx // kx)


def _blocks(area: tuple[int, int, int, int], step: tuple[int, int]):
    """(row, col, rows, cols) of the blocks of ``step`` chunks covering ``area`` (row, col,
    rows, cols), row-major, aligned to the area's origin and clipped to it."""
    r0, c0, rows, cols = area
    for r in range(r0, r0 + rows, step[0]):
        for c in range(c0, c0 + cols, step[1]):
            yield r, c, min(step[0], r0 + rows - r), min(step[1], c0 + cols - c)


@dataclass(slots=True)
class _Counts:
    """What :func:`plan_work` has counted so far."""

    no_tissue: int = 0
    done_tiles: int = 0
    done_chunks: int = 0
    work: int = 0
    work_px: int = 0
    """Output px of the tiles with tissue (their cores, clipped at the image edges)."""
    blocks: int = 0

    def chunk(self, grid, key, tiles_per_chunk, tissue, done) -> tuple[tuple[int, int], ...]:
        """Count chunk ``key``; the tiles it still has to compute (none when done)."""
        (ky, kx), (gy, gx) = tiles_per_chunk, grid.grid_shape
        rows = range(key[0] * ky, min((key[0] + 1) * ky, gy))
        cols = range(key[1] * kx, min((key[1] + 1) * kx, gx))
        keep = tuple(
            (i, j)
            for i in rows
            for j in cols
            if tissue is None or tissue.any_in(grid.tile(i, j).read)
        )
        self.work += len(keep)
        (sy, sx), (h, w) = grid.stride, grid.image_shape
        self.work_px += sum(min(sy, h - i * sy) * min(sx, w - j * sx) for i, j in keep)
        if key in done:
            self.done_chunks += 1
            self.done_tiles += len(rows) * len(cols)
            return ()
        self.no_tissue += len(rows) * len(cols) - len(keep)
        return keep


def core_px(grid: TileGrid, task: ChunkTask) -> int:
    """Output pixels the tiles of ``task`` write (their cores)."""
    total = 0
    for i, j in task.tiles:
        w = grid.tile(i, j).write
        total += w.h * w.w
    return total


def tiles_to_compute(plan: WorkPlan) -> int:
    """Tiles the units of ``plan`` compute (the progress bar's total)."""
    return sum(len(t.tiles) for u in plan.units for t in u)
