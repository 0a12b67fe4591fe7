"""The local run: read → tile → predict → stitch into OME-Zarr, with bounded memory.

Reader threads read and mirror-pad tiles (decoding releases the GIL), the calling thread batches
them through the :class:`~tilesegment.infer.predict.Predictor`, and a writer thread compresses
finished chunks into the store. Tiles are visited chunk by chunk, so only the chunks being
assembled and a bounded window of tiles are ever in memory, whatever the slide size.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilesegment import __version__
from tilesegment.errors import ConfigError, TilesegmentError
from tilesegment.geometry import Box, Tile, TileGrid, tile_grid, tile_indices
from tilesegment.infer.predict import Precision, Predictor, to_model_channels
from tilesegment.io import SlideReader, open_slide
from tilesegment.model.checkpoint import (
    ModelSpec,
    checkpoint_paths,
    file_sha256,
    load_checkpoint,
)
from tilesegment.model.unet import UNet
from tilesegment.store import ClassSpec, OutputStore

log = logging.getLogger(__name__)

#: Default input tile edge: the paper's 572 px (or the nearest valid size for other depths).
DEFAULT_TILE_SIZE = 572


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a model over a slide. Defaults suit a CPU or a single GPU."""

    tile_size: int | None = None
    """Input tile edge in px (a valid U-Net input size); None picks the model's size nearest 572."""
    batch_size: int = 1
    """Tiles per forward pass."""
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
    dtype: str = "uint8"
    """Stored probability dtype: ``"uint8"`` (0–255) or ``"float32"``."""
    device: str = "cpu"
    """torch device for the forward pass."""
    precision: Precision = "fp32"
    """Autocast precision (see :class:`Predictor`)."""
    read_threads: int = 2
    """Threads that read, decode and mirror-pad tiles."""
    chunk_target_px: int = 512
    """Aim for output chunks of about this edge; chunks are a whole number of tile strides."""
    progress: bool = True
    """Show a progress bar on stderr."""


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
    def mpx_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("nan")


def resolve_tile_size(net: UNet, tile_size: int | None) -> int:
    """The input tile edge to use; raises :class:`ConfigError` naming valid sizes if invalid."""
    if tile_size is None:
        return net.nearest_valid_inputs(DEFAULT_TILE_SIZE)[0]
    net.check_input_size(tile_size, name="--tile-size")
    return tile_size


def plan_grid(image_shape: tuple[int, int], net: UNet, tile_size: int) -> TileGrid:
    """The tile grid for an image: output tiles of the model, strides on the pooling grid."""
    return tile_grid(
        image_shape, halo=net.halo, output_tile=net.output_size(tile_size), pooling=net.pooling
    )


def tiles_per_chunk(grid: TileGrid, target_px: int) -> tuple[int, int]:
    """Whole tile strides per chunk so that chunks are about ``target_px`` on each side."""
    return tuple(max(1, round(target_px / s)) for s in grid.stride)  # type: ignore[return-value]


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


class ChunkAssembler:
    """Collects tile cores into chunk buffers and hands out each chunk once it is whole."""

    def __init__(self, chunks: list[tuple[Box, list[Tile]]], classes: int) -> None:
        self._classes = classes
        self._chunk_of: dict[tuple[int, int], int] = {}
        self._boxes = [box for box, _ in chunks]
        self._remaining = [len(tiles) for _, tiles in chunks]
        for ci, (_, tiles) in enumerate(chunks):
            for t in tiles:
                self._chunk_of[t.index] = ci
        self._buffers: dict[int, np.ndarray] = {}

    @property
    def open_chunks(self) -> int:
        return len(self._buffers)

    def add(self, tile: Tile, output: np.ndarray) -> tuple[Box, np.ndarray] | None:
        """Place ``output`` (classes, oh, ow) of ``tile``; returns (box, chunk) when complete."""
        ci = self._chunk_of[tile.index]
        box = self._boxes[ci]
        buf = self._buffers.get(ci)
        if buf is None:
            buf = np.zeros((self._classes, box.h, box.w), dtype=np.float32)
            self._buffers[ci] = buf
        w, c = tile.write, tile.core
        buf[:, w.y - box.y : w.y - box.y + w.h, w.x - box.x : w.x - box.x + w.w] = output[
            :, c.y : c.y + c.h, c.x : c.x + c.w
        ]
        self._remaining[ci] -= 1
        if self._remaining[ci] == 0:
            return box, self._buffers.pop(ci)
        return None


def _bounded_map(
    fn: Callable[[Tile], np.ndarray], tiles: list[Tile], pool: ThreadPoolExecutor, window: int
) -> Iterator[tuple[Tile, np.ndarray]]:
    """``(tile, fn(tile))`` in order, with at most ``window`` calls in flight."""
    pending: deque[tuple[Tile, Future[np.ndarray]]] = deque()
    it = iter(tiles)
    for tile in it:
        pending.append((tile, pool.submit(fn, tile)))
        if len(pending) >= window:
            break
    while pending:
        tile, fut = pending.popleft()
        yield tile, fut.result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(fn, nxt)))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
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
        return Source(reader, level, level, info.level_shapes[level], mpp, ds)
    level = choose_level(info, spec.mpp, mpp=base) if opts.level is None else opts.level
    ds = info.level_downsamples[level]
    level_mpp = base * ds
    if abs(level_mpp / spec.mpp - 1) <= MPP_TOLERANCE:
        shape = info.level_shapes[level]
        return Source(reader, level, level, shape, (level_mpp, level_mpp), ds)
    view = ResampledReader(reader, level, source_mpp=level_mpp, target_mpp=spec.mpp)
    log.info(
        "%s: resampling level %d (%.4g µm/px) to the model's %.4g µm/px",
        name,
        level,
        level_mpp,
        spec.mpp,
    )
    return Source(view, 0, level, view.info.shape, (spec.mpp, spec.mpp), spec.mpp / base)


def _tissue_map(reader: SlideReader, source: Source, tissue: str, preview: bool):
    """The tissue map for this run (None = process everything) and the thumbnail, read only
    when tissue detection or the preview needs it."""
    from tilesegment.tissue import TissueMap, detect_tissue, load_tissue_mask, read_thumbnail

    thumbnail = read_thumbnail(reader)[0] if preview or tissue == "auto" else None
    if tissue == "none":
        return None, thumbnail
    mask = detect_tissue(thumbnail) if tissue == "auto" else load_tissue_mask(Path(tissue))
    return TissueMap(mask, source.image_shape), thumbnail


def run_slide(
    slide: str | Path,
    output: str | Path,
    model: str | Path,
    options: RunOptions | None = None,
) -> RunSummary:
    """Segment ``slide`` with the checkpoint ``model`` into the OME-Zarr ``output``.

    The output is marked complete only after every chunk, pyramid level and metadata document is
    written; any failure leaves it visibly incomplete (see :mod:`tilesegment.store`).
    """
    opts = options or RunOptions()
    if opts.batch_size < 1:
        raise ConfigError(f"`batch_size` ({opts.batch_size}) must be >= 1")
    if opts.tissue not in ("auto", "none") and not Path(opts.tissue).exists():
        raise ConfigError(f"--tissue {opts.tissue}: no such mask file; use auto, none or a path")
    net, spec = load_checkpoint(model, device="cpu")
    tile_size = resolve_tile_size(net, opts.tile_size)
    with open_slide(slide) as reader:
        source = open_source(reader, spec, opts)
        grid = plan_grid(source.image_shape, net, tile_size)
        chunks = grid.chunks(tiles_per_chunk(grid, opts.chunk_target_px))
        tissue, thumbnail = _tissue_map(reader, source, opts.tissue, opts.preview)
        weights, _ = checkpoint_paths(model)
        attrs = {
            "tilesegment_version": __version__,
            "slide": str(Path(slide).resolve()),
            "level": source.source_level,
            "level0_per_px": source.level0_per_px,
            "model": spec.name,
            "model_sha256": file_sha256(weights),
            "tile_size": list(grid.input_shape),
            "stride": list(grid.stride),
            "halo": net.halo,
            "tissue": opts.tissue,
        }
        store = OutputStore.create(
            output,
            image_shape=source.image_shape,
            classes=ClassSpec(spec.class_names, spec.class_colours),
            chunk_shape=chunks[0][0].shape,
            mpp=source.mpp,
            dtype=opts.dtype,
            overwrite=opts.overwrite,
            attrs=attrs,
        )
        predictor = Predictor(net, spec, device=opts.device, precision=opts.precision)
        try:
            if tissue is not None:
                _write_tissue(store, tissue, chunks)
            seconds, processed = _stream(source, grid, chunks, predictor, store, tissue, opts)
        except TilesegmentError as exc:
            # The same public error class (so the same exit code), plus where the output is.
            public = next(c for c in type(exc).__mro__ if c.__module__ == "tilesegment.errors")
            raise public(f"{exc}; {output} was left incomplete") from exc
        store.finalize()
        preview = None
        if thumbnail is not None and opts.preview:
            from tilesegment.preview import write_preview

            preview = write_preview(store, thumbnail, preview_path(output), source=source)
    h, w = source.image_shape
    return RunSummary(
        output=Path(output),
        tiles=len(grid),
        image_shape=source.image_shape,
        tile_size=grid.input_shape,
        seconds=seconds,
        megapixels=h * w / 1e6,
        extra={
            "tiles_processed": processed,
            "tiles_skipped": len(grid) - processed,
            "tissue_fraction": None if tissue is None else tissue.fraction,
            "mpp": None if source.mpp is None else source.mpp[0],
            "level": source.source_level,
            "preview": None if preview is None else str(preview),
        },
    )


def preview_path(output: str | Path) -> Path:
    """``OUT.preview.png`` beside ``OUT.zarr``."""
    out = Path(output)
    return out.with_name(out.name.removesuffix(".zarr") + ".preview.png")


def _write_tissue(store: OutputStore, tissue, chunks: list[tuple[Box, list[Tile]]]) -> None:
    store.create_label("tissue", dtype="uint8", colours={1: (60, 180, 75, 128)})
    for box, _ in chunks:
        store.write_label_chunk("tissue", box, tissue.render(box))


def _stream(
    source: Source,
    grid: TileGrid,
    chunks: list[tuple[Box, list[Tile]]],
    predictor: Predictor,
    store: OutputStore,
    tissue,
    opts: RunOptions,
) -> tuple[float, int]:
    """Run every tile with tissue through the model and write every chunk that has one.

    Returns wall seconds and the number of tiles processed. Tiles without tissue in their input
    window are skipped; their cores stay zero, and chunks with no processed tile are not written
    at all (they read as the store's fill value).
    """
    if tissue is not None:
        chunks = [(box, [t for t in ts if tissue.any_in(t.read)]) for box, ts in chunks]
        chunks = [(box, ts) for box, ts in chunks if ts]
    tiles = [t for _, ts in chunks for t in ts]
    assembler = ChunkAssembler(chunks, predictor.spec.unet.classes)
    channels = predictor.spec.unet.in_channels
    reader, level = source.reader, source.level

    def load(tile: Tile) -> np.ndarray:
        return read_tile(reader, level, tile, grid.image_shape, channels)

    window = max(2 * opts.batch_size, opts.read_threads * 2)
    t0 = time.perf_counter()
    done_px = 0
    writes: deque[Future[None]] = deque()
    with (
        ThreadPoolExecutor(opts.read_threads, thread_name_prefix="ts-read") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="ts-write") as writer,
        _progress(len(tiles), opts.progress) as bar,
    ):
        batch_tiles: list[Tile] = []
        batch_pixels: list[np.ndarray] = []

        def flush() -> None:
            nonlocal done_px
            probs = predictor(np.stack(batch_pixels))
            for tile, out in zip(batch_tiles, probs, strict=True):
                finished = assembler.add(tile, out)
                if finished is not None:
                    writes.append(writer.submit(store.write_chunk, *finished))
                    while len(writes) > 2:
                        writes.popleft().result()
                done_px += tile.write.h * tile.write.w
            bar.update(len(batch_tiles))
            bar.set_postfix_str(f"{done_px / 1e6 / (time.perf_counter() - t0):.2f} Mpx/s")
            batch_tiles.clear()
            batch_pixels.clear()

        for tile, pixels in _bounded_map(load, tiles, readers, window):
            batch_tiles.append(tile)
            batch_pixels.append(pixels)
            if len(batch_tiles) == opts.batch_size:
                flush()
        if batch_tiles:
            flush()
        while writes:
            writes.popleft().result()
    if assembler.open_chunks:
        raise RuntimeError(f"{assembler.open_chunks} chunks were left incomplete (bug)")
    return time.perf_counter() - t0, len(tiles)
