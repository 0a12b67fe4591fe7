"""Segment ordinary images (PNG, JPEG, BMP, TIFF...) in memory, one after the other, with one
model loaded once: what ``tilesegment predict`` runs.

Not a second inference path: an image is read through :func:`~tilesegment.io.open_slide`, put at
the model's µm/px (or shrunk by its downsample) by
:func:`~tilesegment.infer.source.open_source`, cut into the tiles of
:func:`~tilesegment.infer.plan.plan_grid` and :func:`~tilesegment.infer.plan.plan_work` and run
through :func:`~tilesegment.infer.stream.stream_units`, exactly as the in-process executor of
``tilesegment run`` does with ``--tissue none``. Only the sink differs: finished chunks land in a
numpy array (:class:`ArraySink`) instead of the OME-Zarr store, so the probabilities and the
class map equal those a run stores, bit for bit. When the image was resampled (or read from a
coarser pyramid level), the probabilities are brought back to the image's own level-0 grid with
the same kernel (:func:`~tilesegment.io.resample.resample_array`) and the class map is their
argmax.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.infer.devices import resolve_devices, resolve_precision
from tilesegment.infer.options import RunOptions, default_read_threads
from tilesegment.infer.plan import plan_grid, plan_work, resolve_tile_size
from tilesegment.infer.predict import make_predictor, to_model_channels
from tilesegment.infer.source import Source, mpp_note, open_source
from tilesegment.infer.stream import ListSource, stream_units
from tilesegment.io import open_slide
from tilesegment.io.resample import resample_probabilities
from tilesegment.machine import usable_cores
from tilesegment.model.checkpoint import load_checkpoint
from tilesegment.store import class_map

log = logging.getLogger(__name__)


class ArraySink:
    """A :class:`~tilesegment.infer.stream.ChunkSink` that keeps chunks in one float32 array.

    Not thread-safe across sinks sharing an array; :func:`stream_units` writes from one thread.
    """

    def __init__(self, classes: int, image_shape: tuple[int, int]) -> None:
        self.probabilities = np.zeros((classes, *image_shape), dtype=np.float32)
        """(C, H, W) float32 class probabilities; chunks not written stay 0."""

    def write_chunk(self, box: Box, probabilities: np.ndarray) -> None:
        self.probabilities[(slice(None), *box.slices)] = probabilities


@dataclass(frozen=True, slots=True)
class ImagePrediction:
    """What :meth:`ImageSegmenter.segment` computed for one image, on the image's own grid."""

    path: Path
    """The image file."""
    probabilities: np.ndarray
    """(C, H, W) float32 softmax probabilities."""
    mask: np.ndarray
    """(H, W) uint8 class ids: the argmax of ``probabilities`` (first class wins ties)."""
    pixels: np.ndarray
    """(H, W, 3) uint8 RGB pixels of the image as read (alpha composited on white)."""
    mpp: float | None
    """µm/px of the image (the file's, ``--mpp`` or, when neither, the model's)."""
    mpp_assumed: bool
    """True when the image had no µm/px and was taken to be at the model's."""
    model_shape: tuple[int, int]
    """(h, w) of the image at the model's µm/px or downsample (the grid the network ran on)."""
    tiles: int
    """Tiles computed."""
    seconds: float
    """Wall time of reading and predicting."""


class ImageSegmenter:
    """One model on one device, for many images; not thread-safe, not picklable.

    Parameters
    ----------
    model : path
        Checkpoint path (``NAME``, ``NAME.json`` or ``NAME.safetensors``), loaded once here.
    options : RunOptions
        ``tile_size``, ``batch_size``, ``mpp``, ``device`` (one device), ``precision``,
        ``tta`` and ``read_threads`` apply as in ``tilesegment run``; tissue detection does
        not (every pixel of an image is segmented), nor do the store and worker options.
    """

    def __init__(self, model: str | Path, options: RunOptions) -> None:
        devices = resolve_devices(options.device)
        if len(devices) != 1:
            raise ConfigError(f"--device {options.device}: predict uses one device")
        self.device = devices[0]
        self.precision = resolve_precision(options.precision, self.device)
        net, spec = load_checkpoint(model, device="cpu")
        self.net, self.spec = net, spec
        self.tile_size = resolve_tile_size(net.geometry, options.tile_size)
        threads = options.read_threads or default_read_threads(usable_cores())
        self.options = replace(options, tissue="none", level=None, read_threads=threads)
        self.predictor = make_predictor(net, spec, self.device, self.precision, tta=options.tta)
        if (note := mpp_note(spec, options.mpp)) is not None:
            log.warning("%s", note)  # once for all the images

    def segment(self, path: str | Path) -> ImagePrediction:
        """Probabilities and class map of the image at ``path``, on its own level-0 grid.

        Raises
        ------
        SlideReadError
            The file cannot be opened or decoded.
        ConfigError
            The image cannot be converted to the model's input.
        """
        t0 = time.perf_counter()
        path = Path(path)
        with open_slide(path) as reader:
            opts, assumed = self.options, False
            if opts.mpp is None and reader.info.mpp is None and self.spec.mpp is not None:
                # Taken at the model's µm/px, as open_source does; said once per batch instead
                # of once per image.
                opts, assumed = replace(opts, mpp=self.spec.mpp), True
            source = open_source(reader, self.spec, opts)
            probabilities, tiles = self._predict(source)
            shape = reader.info.level_shapes[0]
            pixels = to_model_channels(reader.read_region(0, 0, 0, *shape), 3)
        model_shape = source.image_shape
        if model_shape != shape or source.level0_per_px != 1:
            probabilities = resample_probabilities(probabilities, shape, 1.0 / source.level0_per_px)
        mpp = None if source.slide_mpp is None else float(source.slide_mpp)
        return ImagePrediction(
            path=path,
            probabilities=probabilities,
            mask=class_map(probabilities),
            pixels=pixels,
            mpp=mpp,
            mpp_assumed=assumed,
            model_shape=model_shape,
            tiles=tiles,
            seconds=time.perf_counter() - t0,
        )

    def _predict(self, source: Source) -> tuple[np.ndarray, int]:
        """(C, h, w) probabilities on the model's grid and the number of tiles, as a run."""
        grid = plan_grid(source.image_shape, self.net.geometry, self.tile_size)
        plan = plan_work(grid, self.options)
        sink = ArraySink(self.spec.unet.classes, source.image_shape)
        stats = stream_units(
            ListSource(plan.units),
            reader=source.reader,
            level=source.level,
            grid=grid,
            predictor=self.predictor,
            classes=self.spec.unet.classes,
            channels=self.spec.unet.in_channels,
            store=sink,
            batch_size=self.options.batch_size,
            read_threads=self.options.read_threads,
        )
        return sink.probabilities, stats.tiles
