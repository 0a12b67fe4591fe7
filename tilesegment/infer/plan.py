"""The plan of a run: tile size, tile grid, output chunks (whole tile cores, one writer each)
grouped into units (a block of neighbouring chunks read together; the unit of dispatch and retry).

Pure arithmetic on shapes (:mod:`tilesegment.geometry`): planning needs no model weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box, TileGrid, UNetGeometry, tile_grid
from tilesegment.infer.options import DEFAULT_TILE_SIZE, RunOptions
from tilesegment.store.layout import ChunkKey


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
    work_px: int = 0
    """Output pixels those tiles write (their cores): the tissue the whole run computes."""


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
    no_tissue = done_tiles = done_chunks = work = work_px = 0
    sy, sx = grid.stride
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
                    # a tile's core is a stride, clipped at the bottom and right edges
                    work_px += sum(min(sy, h - i * sy) * min(sx, w - j * sx) for i, j in keep)
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
        work_px=work_px,
    )


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
