"""Segment a numpy, Zarr or dask image lazily: :func:`segment` returns dask arrays.

The image is split into blocks whose cores are a whole number of pooling cells
(``2**depth`` px) and :func:`dask.array.map_overlap` adds the model's context around each
block, mirroring at the image border with ``boundary="reflect"``, which is numpy's
``"symmetric"`` (:data:`tilesegment.geometry.PAD_MODE`): the edge pixel is repeated. Each
block is then exactly the window a whole-image pass (:func:`tilesegment.infer.predict.
predict_image`) would feed the network for those pixels:

* its origin lies ``halo`` px before its core, at a multiple of the pooling factor in the
  whole image's padded frame, so it sees the same pooling phase;
* a core of ``L`` px needs ``halo + e`` px of context after it, where ``e = (residue - L)
  mod pooling`` brings the block to a valid input size. The last ``e`` of those rows feed
  the last pooling cell of the core, so they must be the image (or its mirror), not
  arbitrary padding. The overlap depth is therefore ``halo + max(e)`` and each block drops
  what it does not use before the forward pass.

An axis that fits in one block is not overlapped; the block is mirror-padded in numpy,
exactly as :func:`~tilesegment.geometry.whole_image_padding` pads the whole image.

Tasks carry the checkpoint *path*, never a model: the first block a process computes loads
the weights through :func:`tilesegment.infer.executors.cache.cached_predictor`, later blocks reuse
them. The result equals a whole-image pass to float rounding (identical when the forward
passes run with the same number of torch threads), on any dask scheduler.

>>> import numpy as np
>>> from tilesegment.dask import segment
>>> image = np.zeros((600, 500, 3), dtype=np.uint8)
>>> probabilities = segment(image, "nuclei-he")  # doctest: +SKIP
>>> probabilities.shape, probabilities.dtype  # doctest: +SKIP
((2, 600, 500), dtype('float32'))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.geometry import PAD_MODE, tta_symmetries

if TYPE_CHECKING:
    import dask.array

__all__ = ["BlockGeometry", "block_geometry", "segment"]

log = logging.getLogger(__name__)

Output = Literal["probabilities", "mask", "both"]

_OUTPUTS = ("probabilities", "mask", "both")
_DTYPES = ("float32", "uint8")


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """How :func:`segment` splits one image for one model: pure numbers, no pixels."""

    halo: int
    """Context the model consumes on each side (``input = output + 2 * halo``)."""
    pooling: int
    """The model's pooling factor ``2**depth``; block cores start at multiples of it."""
    residue: int
    """Valid output sizes are ``residue`` mod ``pooling`` (4 for the paper's U-Net)."""
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    """Core sizes of the blocks along y and x; all but the last are multiples of
    ``pooling``."""
    depth: tuple[int, int]
    """``map_overlap`` depth along y and x; 0 for an axis that is one block (padded in numpy
    instead)."""


def _axis_chunks(
    n: int, core_px: int, halo: int, pooling: int, residue: int
) -> tuple[tuple[int, ...], int]:
    """(chunks, depth) along one axis of ``n`` px with cores of ``core_px`` (see module)."""
    if n <= core_px:
        return (n,), 0
    chunks = [core_px] * (n // core_px)
    if n % core_px:
        chunks.append(n % core_px)

    def depth_for(sizes: list[int]) -> int:
        return halo + max((residue - c) % pooling for c in sizes)

    if chunks[-1] < depth_for(chunks):
        # dask overlaps (and reflects) only from blocks at least ``depth`` long; merging
        # the short last block into its neighbour keeps every other block aligned.
        last = chunks.pop()
        chunks[-1] += last
    if len(chunks) == 1:
        return (n,), 0
    return tuple(chunks), depth_for(chunks)


def block_geometry(
    image_shape: tuple[int, int],
    *,
    halo: int,
    pooling: int,
    residue: int,
    tile_size: int,
) -> BlockGeometry:
    """Blocks for an image of ``image_shape`` (H, W) px and forward passes of ``tile_size``.

    Block cores are ``tile_size - 2 * halo`` rounded down to a multiple of ``pooling`` (the
    run's tile stride, so an interior block's input is exactly ``tile_size``), but at least
    ``halo + pooling`` so that every block can lend its neighbours their context.

    >>> g = block_geometry((1000, 300), halo=92, pooling=16, residue=4, tile_size=572)
    >>> g.chunks, g.depth
    (((384, 384, 232), (300,)), (104, 0))
    """
    out = tile_size - 2 * halo
    core = max(out - out % pooling, pooling * math.ceil((halo + pooling) / pooling))
    (cy, dy), (cx, dx) = (_axis_chunks(n, core, halo, pooling, residue) for n in image_shape)
    return BlockGeometry(halo, pooling, residue, (cy, cx), (dy, dx))


def _crop_or_pad(n: int, depth: int, g: BlockGeometry) -> tuple[slice, tuple[int, int], int]:
    """For one axis of a block of ``n`` px (overlap included): the slice to keep, the numpy
    padding to add, and the core length."""
    if depth == 0:  # the whole axis: mirror-pad like the whole-image pass
        extra = (g.residue - n) % g.pooling
        return slice(None), (g.halo, g.halo + extra), n
    core = n - 2 * depth
    extra = (g.residue - core) % g.pooling
    return slice(depth - g.halo, depth + core + g.halo + extra), (0, 0), core


def _predict_block(
    block: np.ndarray,
    *,
    model: str,
    device: str,
    precision: str,
    tta: str,
    geometry: BlockGeometry,
) -> np.ndarray:
    """(C, core_h, core_w) float32 probabilities of one overlapped (h, w, c) uint8 block."""
    from tilesegment.infer.executors.cache import cached_predictor
    from tilesegment.infer.predict import to_model_channels

    predictor = cached_predictor(model, device, precision, tta=tta)
    (sy, py, ly), (sx, px, lx) = (
        _crop_or_pad(n, d, geometry) for n, d in zip(block.shape[:2], geometry.depth, strict=True)
    )
    pixels = to_model_channels(block[sy, sx], predictor.spec.unet.in_channels)
    if py != (0, 0) or px != (0, 0):
        pixels = np.pad(pixels, (py, px, (0, 0)), mode=PAD_MODE)
    probabilities = predictor(pixels[None])[0]
    return np.ascontiguousarray(probabilities[:, :ly, :lx])


def _quantise(probabilities: np.ndarray) -> np.ndarray:
    from tilesegment.store import quantise

    return quantise(probabilities, np.dtype(np.uint8))


def _argmax(probabilities: np.ndarray) -> np.ndarray:
    from tilesegment.store import class_map

    return class_map(probabilities)


def _model_geometry(path: Path, tile_size: int | None) -> tuple[Any, int, int, int, int]:
    """(spec, halo, pooling, residue, tile size) of a checkpoint, without loading weights."""
    from tilesegment.geometry import UNetGeometry
    from tilesegment.infer.plan import resolve_tile_size
    from tilesegment.model.checkpoint import load_spec

    spec = load_spec(path)
    geometry = UNetGeometry.of(spec.unet.depth, spec.unet.upsampling)  # no weights needed
    if tile_size is not None:
        geometry.check_input_size(tile_size, name="`tile_size`")
    tile_size = resolve_tile_size(geometry, tile_size)
    residue = geometry.output_size(tile_size) % geometry.pooling
    return spec, geometry.halo, geometry.pooling, residue, tile_size


def _check_image(image: Any) -> tuple[int, int, int]:
    """(H, W, C) of a (Y, X) or (Y, X, C) uint8 array-like; :class:`ConfigError` otherwise."""
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise ConfigError(
            f"`image` must be a numpy, Zarr or dask array, got {type(image).__name__}"
        )
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise ConfigError(
            f"`image` must be (Y, X) or (Y, X, C) with C 1 or 3, got shape {tuple(image.shape)}"
        )
    if np.dtype(image.dtype) != np.uint8:
        raise ConfigError(f"`image` must be uint8 (0-255), got {image.dtype}")
    if min(shape[:2]) < 1:
        raise ConfigError(f"`image` is empty: shape {tuple(image.shape)}")
    return shape  # type: ignore[return-value]


def _as_dask(image: Any, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> dask.array.Array:
    """``image`` as a (Y, X, C) dask array with ``chunks`` on (Y, X); numpy and Zarr arrays
    are read block by block, never loaded whole."""
    import dask.array as da

    if isinstance(image, da.Array):
        image = image.rechunk(chunks + ((-1,) if image.ndim == 3 else ()))
    else:
        image = da.from_array(image, chunks=chunks + ((-1,) if image.ndim == 3 else ()))
    return image[..., None] if image.ndim == 2 else image


def segment(
    image: Any,
    model: str | Path = "nuclei-he",
    *,
    output: Output = "probabilities",
    dtype: Literal["float32", "uint8"] = "float32",
    tile_size: int | None = None,
    precision: str = "auto",
    device: str = "cpu",
    tta: str = "none",
) -> dask.array.Array | tuple[dask.array.Array, dask.array.Array]:
    """Lazily segment an image with a valid U-Net: nothing runs until you compute.

    Parameters
    ----------
    image : (Y, X, C) or (Y, X) uint8 array
        numpy, Zarr or dask array; C is 1 or 3 (converted to the model's channels as in
        ``tilesegment run``). Pixels are taken as they are: no resampling to the model's
        µm/px, nor shrinking by its downsample (a warning says so).
    model : str or path
        A shipped model name (see ``tilesegment models``) or a checkpoint path
        (``NAME``, ``NAME.json`` or ``NAME.safetensors``).
    output : {"probabilities", "mask", "both"}
        What to return: class probabilities, the argmax class map, or both (a tuple sharing
        one computation when computed together, e.g. with ``dask.compute``).
    dtype : {"float32", "uint8"}
        Probabilities as computed (float32) or as ``tilesegment run`` stores them by default
        (uint8 ``rint(p * 255)``). The mask is always the argmax of the float32 values.
    tile_size : int, optional
        Input size of an interior block's forward pass, a valid U-Net input size (default:
        the model's size nearest 572 px, as in ``tilesegment run``). Larger blocks mean fewer,
        heavier tasks; the result does not depend on it (beyond float rounding).
    precision : {"auto", "fp32", "bf16", "fp16"}
        As ``tilesegment run --precision``; ``auto`` is bf16 on CPUs with native bf16, fp32
        on other CPUs (pass ``"fp32"`` for the reference arithmetic).
    device : str
        Torch device every worker runs the model on, e.g. ``"cpu"`` or ``"cuda:0"``.
    tta : {"none", "flips", "d4"}
        Test-time augmentation, as ``tilesegment run --tta`` (each block's padded input is
        transformed; :data:`tilesegment.geometry.TTA_MODES` says why blocks still agree).

    Returns
    -------
    probabilities : (C, Y, X) float32 or uint8 dask array
        With ``output="probabilities"``; chunks ``(C, core, core)`` (see
        :func:`block_geometry`).
    mask : (Y, X) uint8 dask array
        With ``output="mask"``.
    (probabilities, mask) : tuple
        With ``output="both"``.

    Raises
    ------
    ConfigError
        The image is not (Y, X[, C]) uint8, or an option is invalid.
    ModelError
        The checkpoint cannot be found or read.

    Notes
    -----
    Each process loads the model once (on its first block) and keeps it: with
    ``dask.distributed`` every worker holds one copy. A predictor is used by one thread at a
    time, so give workers one thread each and let torch use the cores.
    """
    import dask.array as da

    from tilesegment.infer.devices import resolve_precision
    from tilesegment.model.registry import resolve_model

    if output not in _OUTPUTS:
        raise ConfigError(f"`output` ({output!r}) must be one of {', '.join(_OUTPUTS)}")
    if dtype not in _DTYPES:
        raise ConfigError(f"`dtype` ({dtype!r}) must be float32 or uint8")
    resolve_precision(precision, device)  # validates; each worker resolves for itself
    tta_symmetries(tta)  # validates
    h, w, _ = _check_image(image)
    path = resolve_model(model)
    spec, halo, pooling, residue, tile_size = _model_geometry(path, tile_size)
    if spec.downsample is not None:
        log.warning(
            "model %r declares downsample %g: segment() takes the pixels as they are; shrink "
            "the image by %g first (or use `tilesegment run`/`predict`, which do)",
            spec.name,
            spec.downsample,
            spec.downsample,
        )
    geometry = block_geometry(
        (h, w), halo=halo, pooling=pooling, residue=residue, tile_size=tile_size
    )
    image = _as_dask(image, geometry.chunks)
    classes = spec.unet.classes
    probabilities = da.map_overlap(
        _predict_block,
        image,
        depth={0: geometry.depth[0], 1: geometry.depth[1], 2: 0},
        boundary={0: "reflect", 1: "reflect", 2: "none"},
        trim=False,  # blocks return their cores
        drop_axis=2,
        new_axis=0,
        chunks=((classes,), *geometry.chunks),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        token="tilesegment-segment",
        model=str(path),
        device=device,
        precision=precision,
        tta=tta,
        geometry=geometry,
    )
    mask = None
    if output != "probabilities":
        mask = probabilities.map_blocks(
            _argmax, drop_axis=0, dtype=np.uint8, meta=np.empty((0, 0), np.uint8)
        )
    if output == "mask":
        return mask
    if dtype == "uint8":
        probabilities = probabilities.map_blocks(
            _quantise, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8)
        )
    return probabilities if mask is None else (probabilities, mask)
