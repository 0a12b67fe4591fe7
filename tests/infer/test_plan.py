"""Planning and reading units of work: block reads give the same pixels as tile-by-tile reads,
done chunks and tissue-free tiles are left out, and the counts add up."""

from __future__ import annotations

import numpy as np

from tilesegment.geometry import Box
from tilesegment.infer.options import RunOptions
from tilesegment.infer.plan import plan_grid, plan_work
from tilesegment.infer.stream import ChunkAssembler, read_tile, read_unit
from tilesegment.io import open_slide
from tilesegment.model import UNet, UNetConfig

NET = UNet(UNetConfig(depth=4, base_channels=2))


def test_block_reads_equal_tile_reads_including_mirrored_borders(cmu_slide):
    with open_slide(cmu_slide) as reader:
        grid = plan_grid(reader.info.shape, NET, 252)  # stride 64: many tiles, many borders
        plan = plan_work(grid, RunOptions(read_block_px=700))
        assert len(plan.units) > 4
        for unit in (plan.units[0], plan.units[-1]):  # top-left and bottom-right corners
            got = read_unit(reader, 0, grid, unit, 3)
            assert [t.index for t, _ in got] == [ij for task in unit for ij in task.tiles]
            for tile, pixels in got:
                expected = read_tile(reader, 0, tile, grid.image_shape, 3)
                assert pixels.shape == (252, 252, 3)
                np.testing.assert_array_equal(pixels, expected)


def test_plan_leaves_out_done_chunks_and_tissue_free_tiles():
    grid = plan_grid((3000, 2000), NET, 572)  # 8 x 6 tiles of 384, one tile per chunk
    full = plan_work(grid, RunOptions(chunk_target_px=512))
    keys = [t.key for u in full.units for t in u]
    assert len(keys) == 48 and len(set(keys)) == 48
    assert full.chunk_shape == (384, 384)
    # Units are 4 x 4 blocks of chunks (1536 px), in row-major order.
    assert [len(u) for u in full.units] == [16, 8, 16, 8]

    class LeftHalf:
        def any_in(self, box: Box) -> bool:
            return box.x < 1000

    done = {(0, 0), (7, 5)}
    plan = plan_work(grid, RunOptions(chunk_target_px=512), tissue=LeftHalf(), done=done)
    kept = [ij for u in plan.units for t in u for ij in t.tiles]
    assert all(grid.tile(*ij).read.x < 1000 for ij in kept)
    assert plan.chunks_done_before == 2 and plan.tiles_done_before == 2
    assert len(kept) + plan.tiles_no_tissue + plan.tiles_done_before == plan.tiles_total == 48
    assert not {t.key for u in plan.units for t in u} & done
    # The whole run's work (what auto-compile decides on) does not change when resuming.
    fresh = plan_work(grid, RunOptions(chunk_target_px=512), tissue=LeftHalf())
    assert fresh.tiles_with_tissue == plan.tiles_with_tissue == len(kept) + 1  # (0, 0) done
    assert fresh.tiles_with_tissue == sum(len(t.tiles) for u in fresh.units for t in u)


def test_a_one_tile_chunk_is_handed_out_without_a_copy():
    grid = plan_grid((800, 800), NET, 572)
    tile = grid.tile(0, 0)
    out = np.random.default_rng(0).random((2, 388, 388), dtype=np.float32)
    assembler = ChunkAssembler((), 2)
    assembler.expect(tile.write, [tile.index])
    box, chunk = assembler.add(tile, out)
    assert box == tile.write and np.shares_memory(chunk, out)
    np.testing.assert_array_equal(chunk, out[:, :384, :384])
    assert assembler.open_chunks == 0
