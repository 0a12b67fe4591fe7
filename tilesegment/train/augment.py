"""Seeded data augmentation: crops, scale jitter, flips/rotations, elastic deformation,
intensity, stain colour and blur.

The photometric and scale steps make a model trained on a few labs' slides hold on others'
(stain protocols, scanners' colour, focus and true µm/px differ): HED stain jitter after
Tellez et al. (2018), brightness/contrast/gamma, Gaussian blur, and a zoom around the model's
µm/px. :data:`HE_DEFAULTS` states the ranges used for H&E.

Every random choice is drawn from a :class:`numpy.random.Generator` passed in by the caller.
:func:`rng_for` makes that generator from ``(seed, epoch, index)``, so the augmentation of a
sample depends only on those three numbers, not on worker processes, batch order or what
was drawn before: a run can be reproduced, or resumed mid-epoch, sample by sample.

Arrays are numpy (y, x[, channel]) throughout. Label images are only ever moved, never
interpolated, so they keep their dtype and their set of values.

>>> import numpy as np
>>> rng = rng_for(0, 3, 17)
>>> image = np.zeros((64, 64), dtype=np.uint8)
>>> labels = np.zeros((64, 64), dtype=np.int32)
>>> out_image, out_labels, out_weights = elastic_deformation(image, labels, None, rng)
>>> out_image.dtype, out_labels.dtype, out_weights is None
(dtype('uint8'), dtype('int32'), True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.interpolate import CubicSpline

from tilesegment.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "HED_FROM_RGB",
    "HE_DEFAULTS",
    "RGB_FROM_HED",
    "PhotometricRanges",
    "colour_jitter",
    "elastic_deformation",
    "flip_rotate",
    "gaussian_blur",
    "intensity_jitter",
    "random_crop_box",
    "rng_for",
    "scale_crop",
]

#: scipy.ndimage boundary mode used when a warp samples outside the image: ``"reflect"`` is
#: numpy's ``"symmetric"`` (``dcba|abcd|dcba``, edge pixel repeated), the same mirror as the
#: padding of :mod:`tilesegment.geometry`.
WARP_MODE = "reflect"

#: Optical-density stain vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B) from
#: Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23 (2001), normalised to unit length.
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
#: Inverse of :data:`RGB_FROM_HED`: optical density (R, G, B) -> stain amounts (H, E, D).
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of ``epoch`` in a run seeded with ``seed``.

    Built from ``np.random.SeedSequence([seed, epoch, index])``, whose hashing makes streams
    for neighbouring triples statistically independent.

    >>> a = rng_for(1, 0, 5).integers(1 << 30)
    >>> b = rng_for(1, 0, 5).integers(1 << 30)
    >>> bool(a == b)
    True
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ConfigError(f"`{name}` ({value!r}) must be an integer >= 0")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def random_crop_box(
    image_shape: Sequence[int],
    crop_shape: Sequence[int],
    rng: np.random.Generator,
    *,
    align: int = 1,
) -> tuple[int, int]:
    """Top-left corner of a random crop whose origin is a multiple of ``align``.

    With ``align`` equal to the U-Net's pooling factor (``2**depth``, 16 for the paper's
    network) every crop has the same pooling phase: pixel ``(y, x)`` of the image falls at the
    same position modulo 16 in every crop. A valid-convolution U-Net is only equivariant to
    shifts by multiples of its pooling factor, and the tiled inference of
    :mod:`tilesegment.geometry` places tiles at multiples of it, so aligned crops train the
    network on the same phase it is run at. The price: when ``Y - h`` is not a multiple of
    ``align``, the last ``(Y - h) % align`` rows can never be the bottom row of a crop
    (likewise for columns); with ``Y - h < align`` the crop is always at row 0.

    Parameters
    ----------
    image_shape : sequence of int
        ``(Y, X)`` or ``(Y, X, C)``; only the first two are used.
    crop_shape : (int, int)
        ``(h, w)`` of the crop, at most the image size.
    rng : numpy.random.Generator
    align : int, optional
        Origins are multiples of this (1 = any position).

    Returns
    -------
    (y, x) : tuple of int
        The crop is ``image[y:y + h, x:x + w]``.

    Examples
    --------
    >>> y, x = random_crop_box((600, 700), (572, 572), rng_for(0, 0, 0), align=16)
    >>> y % 16, x % 16, 0 <= y <= 600 - 572, 0 <= x <= 700 - 572
    (0, 0, True, True)
    """
    if len(image_shape) < 2 or len(crop_shape) != 2:
        raise ConfigError(
            f"`image_shape` ({tuple(image_shape)}) needs (Y, X[, C]) and `crop_shape`"
            f" ({tuple(crop_shape)}) needs (h, w)"
        )
    if align < 1:
        raise ConfigError(f"`align` ({align}) must be >= 1")
    origin = []
    for axis, (size, crop) in enumerate(zip(image_shape[:2], crop_shape, strict=True)):
        if not 1 <= crop <= size:
            raise ConfigError(
                f"`crop_shape[{axis}]` ({crop}) must be between 1 and the image size ({size})"
            )
        positions = (size - crop) // align + 1
        origin.append(int(rng.integers(positions)) * align)
    return origin[0], origin[1]


def flip_rotate(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Apply one random element of the 8 symmetries of the square to every array.

    Draws ``k`` in 0..3 (rotation by ``k * 90`` degrees in the (y, x) plane, ``np.rot90``
    direction) and a coin for a left-right flip applied after the rotation; all 8 outcomes
    are equally likely. Arrays may be (Y, X) or (Y, X, C) and of any dtype; they must share
    (Y, X). Non-square arrays swap Y and X for odd ``k``.

    Parameters
    ----------
    arrays : sequence of (Y, X[, C]) ndarray
    rng : numpy.random.Generator

    Returns
    -------
    list of ndarray
        C-contiguous copies, in the input order.
    """
    arrays = [np.asarray(a) for a in arrays]
    shapes = {a.shape[:2] for a in arrays}
    if any(a.ndim not in (2, 3) for a in arrays) or len(shapes) > 1:
        raise ConfigError(
            f"`arrays` must all be (Y, X[, C]) with the same (Y, X), got"
            f" {[a.shape for a in arrays]}"
        )
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(0, 1))
        if flip:
            a = a[:, ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def _spline_matrix(n_nodes: int, length: int) -> np.ndarray:
    """(length, n_nodes) matrix mapping values at evenly spaced nodes to every pixel.

    The nodes sit at pixel 0, at pixel ``length - 1`` and evenly in between; column ``j`` is
    the natural cubic spline through the unit vector ``e_j`` (linear for 2 nodes).
    """
    positions = np.arange(length, dtype=np.float64)
    if n_nodes == 2 or length == 1:
        t = positions / max(length - 1, 1)
        return np.stack([1.0 - t, t], axis=1)
    nodes = np.linspace(0.0, length - 1.0, n_nodes)
    return CubicSpline(nodes, np.eye(n_nodes), bc_type="natural")(positions)


def _displacement_field(
    shape: tuple[int, int], rng: np.random.Generator, grid: int, sigma: float
) -> np.ndarray:
    """(2, Y, X) per-pixel displacement (dy, dx) in pixels, see :func:`elastic_deformation`."""
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    rows = _spline_matrix(grid, shape[0])  # (Y, grid)
    # (grid, X), made contiguous: OpenBLAS is ~100x slower on the transposed view here.
    cols_t = np.ascontiguousarray(_spline_matrix(grid, shape[1]).T)
    # Tensor-product spline: field[c] = rows @ coarse[c] @ cols.T
    return np.stack([(rows @ coarse[c]) @ cols_t for c in range(2)])


def _symmetric_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map integer indices onto ``0..size - 1`` by symmetric mirroring (``dcba|abcd|dcba``)."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


class _Sampler:
    """Bilinear and nearest-neighbour sampling of (Y, X[, C]) arrays at fixed positions.

    Built once per warp and shared by image, labels and weights: the four bilinear taps of
    every output pixel (mirrored into the source, see :data:`WARP_MODE`), their weights, and
    the nearest tap, which is always the tap with the largest bilinear weight. Hence wherever
    the four taps of the image agree, the warped label is exactly the label of that value.
    ``rows`` and ``cols`` have the output shape; ``shape`` is the source's (Y, X).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> None:
        height, width = shape
        y0 = np.floor(rows)
        x0 = np.floor(cols)
        fy = (rows - y0).astype(np.float32).ravel()
        fx = (cols - x0).astype(np.float32).ravel()
        y0 = y0.astype(np.intp).ravel()
        x0 = x0.astype(np.intp).ravel()
        # Mirror through small lookup tables over the range of floor indices: cheaper than
        # integer modulo on every pixel.
        y_lo, x_lo = int(y0.min()), int(x0.min())
        y_lut = _symmetric_index(np.arange(y_lo, int(y0.max()) + 2), height) * width
        x_lut = _symmetric_index(np.arange(x_lo, int(x0.max()) + 2), width)
        y0 -= y_lo
        x0 -= x_lo
        r0, r1 = y_lut[y0], y_lut[y0 + 1]
        c0, c1 = x_lut[x0], x_lut[x0 + 1]
        self.taps = np.stack([r0 + c0, r0 + c1, r1 + c0, r1 + c1])
        gy, gx = 1.0 - fy, 1.0 - fx
        self.weights = np.stack([gy * gx, gy * fx, fy * gx, fy * fx])
        self.nearest = np.where(fy < 0.5, r0, r1) + np.where(fx < 0.5, c0, c1)
        self.source = height * width
        self.shape = rows.shape

    def linear(self, array: np.ndarray) -> np.ndarray:
        """Bilinear samples of ``array`` as float32, shape (Y, X[, C])."""
        flat = array.reshape(self.source, -1)
        samples = np.take(flat, self.taps, axis=0).astype(np.float32, copy=False)
        out = np.einsum("knc,kn->nc", samples, self.weights)
        return out.reshape(self.shape + array.shape[2:])

    def nearest_neighbour(self, array: np.ndarray) -> np.ndarray:
        """Nearest-pixel samples of ``array``, same dtype, shape (Y, X[, C])."""
        flat = array.reshape(self.source, -1)
        return np.take(flat, self.nearest, axis=0).reshape(self.shape + array.shape[2:])


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip float samples into an integer dtype; plain cast for float dtypes."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype, copy=False)


def elastic_deformation(
    image: np.ndarray,
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    rng: np.random.Generator,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    image_order: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Random smooth elastic deformation of Ronneberger et al. (2015), section 3.1.

    Random displacement vectors ``(dy, dx)`` are drawn on a coarse ``grid x grid`` grid from a
    Gaussian with standard deviation ``sigma`` pixels (paper: 3 x 3, 10 px). The grid nodes
    lie on the image corners and evenly in between. Per-pixel displacements are their bicubic
    interpolation: the tensor product of natural cubic splines through the node values along
    y and along x (interpolating, C2, second derivative zero at the image edges). Each output
    pixel ``p`` samples the input at ``p + displacement(p)``; samples outside the image are
    mirrored (:data:`WARP_MODE`). All arrays share the same field, so labels stay aligned.

    * ``image`` is interpolated bilinearly (``image_order=1``; 0 = nearest; 3 = cubic
      spline via ``scipy.ndimage.map_coordinates``, clipped to the dtype range, or to the
      input range for floats); integer images are rounded back to their dtype.
    * ``labels`` take the nearest input pixel, which is always the bilinear tap with the
      largest weight: no new values, dtype kept, and wherever the four bilinear taps of the
      image agree the label is the label of that image value.
    * ``weights`` are interpolated bilinearly, returned as float32.

    Bilinear and nearest sampling share one precomputed set of taps (flat indices into the
    mirrored image) for all arrays: about 25 ms for a 572 x 572 RGB crop with labels and
    weights (20 ms for grey), 3-4 times faster than one ``map_coordinates`` call per array.

    Parameters
    ----------
    image : (Y, X) or (Y, X, C) ndarray
    labels : (Y, X) int ndarray or None
    weights : (Y, X) float ndarray or None
    rng : numpy.random.Generator
    grid : int, optional
        Nodes per axis of the coarse grid (>= 2).
    sigma : float, optional
        Standard deviation of the node displacements, in pixels.
    image_order : {0, 1, 3}, optional
        Spline order for the image.

    Returns
    -------
    image, labels, weights
        Warped copies with the input shapes and dtypes (``weights`` float32), ``None`` where
        ``None`` was passed.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ConfigError(f"`image` must be (Y, X) or (Y, X, C), got shape {image.shape}")
    shape = image.shape[:2]
    if 0 in shape:
        raise ConfigError(f"`image` must not be empty, got shape {image.shape}")
    for name, array in (("labels", labels), ("weights", weights)):
        if array is not None and np.shape(array) != shape:
            raise ConfigError(f"`{name}` shape {np.shape(array)} must equal image (Y, X) {shape}")
    if grid < 2:
        raise ConfigError(f"`grid` ({grid}) must be >= 2")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"`sigma` ({sigma}) must be a finite number >= 0")
    if image_order not in (0, 1, 3):
        raise ConfigError(f"`image_order` ({image_order}) must be 0, 1 or 3")

    field = _displacement_field(shape, rng, grid, sigma)
    rows = field[0] + np.arange(shape[0], dtype=np.float64)[:, None]
    cols = field[1] + np.arange(shape[1], dtype=np.float64)[None, :]
    sampler = _Sampler(rows, cols, shape)

    if image_order == 1:
        out_image = _to_dtype(sampler.linear(image), image.dtype)
    elif image_order == 0:
        out_image = sampler.nearest_neighbour(image)
    else:
        coordinates = np.stack([rows, cols])
        planes = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
        warped = [
            ndi.map_coordinates(p, coordinates, order=3, mode=WARP_MODE, output=np.float32)
            for p in planes
        ]
        out_image = warped[0] if image.ndim == 2 else np.stack(warped, axis=-1)
        if np.issubdtype(image.dtype, np.floating):
            out_image = np.clip(out_image, image.min(), image.max()) if image.size else out_image
        out_image = _to_dtype(out_image, image.dtype)
    out_labels = None
    if labels is not None:
        out_labels = sampler.nearest_neighbour(np.ascontiguousarray(labels))
    out_weights = None
    if weights is not None:
        out_weights = sampler.linear(np.asarray(weights, dtype=np.float32))
    return out_image, out_labels, out_weights


def _to_unit(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Image as float32 in [0, 1] and the scale that maps it back."""
    if np.issubdtype(image.dtype, np.integer):
        if np.iinfo(image.dtype).min != 0:
            raise ConfigError(f"`image` integer dtype must be unsigned, got {image.dtype}")
        scale = float(np.iinfo(image.dtype).max)
        return image.astype(np.float32) / scale, scale
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32), 1.0
    raise ConfigError(f"`image` must have an unsigned integer or float dtype, got {image.dtype}")


def _from_unit(unit: np.ndarray, scale: float, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`_to_unit`, clipping to [0, 1] and rounding integer dtypes."""
    unit = np.clip(unit, 0.0, 1.0)
    if np.issubdtype(dtype, np.integer):
        return np.rint(unit * scale).astype(dtype)
    return unit.astype(dtype, copy=False)


def intensity_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float = 0.1,
    contrast: float = 0.1,
    gamma: float = 0.1,
) -> np.ndarray:
    """Mild random gamma, contrast and brightness change, the same for every channel.

    On the image scaled to [0, 1] (unsigned ints by their dtype maximum, floats taken as
    already in [0, 1]): ``v <- v ** g`` with ``g = exp(U(-gamma, gamma))``, then
    ``v <- mean + c * (v - mean)`` with ``c = 1 + U(-contrast, contrast)`` and ``mean`` the
    image mean after the gamma step, then ``v <- v + U(-brightness, brightness)``; finally
    clipped to [0, 1] and converted back (uint8 in, uint8 out).

    Parameters
    ----------
    image : (Y, X) or (Y, X, C) unsigned int or float ndarray
    rng : numpy.random.Generator
    brightness, contrast, gamma : float, optional
        Half-widths of the uniform ranges; 0 disables that step.

    Returns
    -------
    image : ndarray, same shape and dtype
    """
    image = np.asarray(image)
    for name, value in (("brightness", brightness), ("contrast", contrast), ("gamma", gamma)):
        if not (math.isfinite(value) and 0 <= value < 1):
            raise ConfigError(f"`{name}` ({value}) must be in [0, 1)")
    g = math.exp(rng.uniform(-gamma, gamma))
    c = 1.0 + rng.uniform(-contrast, contrast)
    b = rng.uniform(-brightness, brightness)
    unit, scale = _to_unit(image)
    unit = np.power(np.clip(unit, 0.0, 1.0), np.float32(g))
    mean = np.float32(unit.mean()) if unit.size else np.float32(0.0)
    unit = (unit - mean) * np.float32(c) + mean + np.float32(b)
    return _from_unit(unit, scale, image.dtype)


def colour_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    sigma: float = 0.05,
    bias: float = 0.05,
) -> np.ndarray:
    """Mild random stain variation of an H&E RGB image in haematoxylin-eosin-DAB space.

    Colour deconvolution after Ruifrok & Johnston (2001): optical density
    ``od = -ln((v + 1) / (max + 1))`` per RGB channel (``max`` = 255 for uint8), stain amounts
    ``s = od @ HED_FROM_RGB``; each stain channel ``i`` is perturbed as
    ``s_i <- s_i * U(1 - sigma, 1 + sigma) + U(-bias, bias)`` (bias in optical-density units;
    typical H&E pixels have ``od`` between 0.1 and 2), and the image is rebuilt with
    ``RGB_FROM_HED``. This is the HED augmentation of Tellez et al. (2018) with mild defaults.
    With ``sigma = bias = 0`` the image is returned unchanged (``skimage.color.rgb2hed`` /
    ``hed2rgb`` clip negative stain amounts: their round trip moves 4-19 % of the pixels of
    MoNuSeg/TNBC tiles by more than 2 levels, up to 89, before any jitter).

    Parameters
    ----------
    image : (Y, X, 3) uint8 (or other unsigned int, or float in [0, 1]) ndarray
        RGB.
    rng : numpy.random.Generator
    sigma : float, optional
        Half-width of the multiplicative range.
    bias : float, optional
        Half-width of the additive range, in optical density.

    Returns
    -------
    image : (Y, X, 3) ndarray, same dtype
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"`image` must be (Y, X, 3) RGB, got shape {image.shape}")
    if not (math.isfinite(sigma) and 0 <= sigma < 1):
        raise ConfigError(f"`sigma` ({sigma}) must be in [0, 1)")
    if not (math.isfinite(bias) and bias >= 0):
        raise ConfigError(f"`bias` ({bias}) must be a finite number >= 0")
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3)
    if np.issubdtype(image.dtype, np.integer):
        if np.iinfo(image.dtype).min != 0:
            raise ConfigError(f"`image` integer dtype must be unsigned, got {image.dtype}")
        top = float(np.iinfo(image.dtype).max)
        values = image.astype(np.float64)
    elif np.issubdtype(image.dtype, np.floating):
        top = 255.0
        values = np.clip(image.astype(np.float64), 0.0, 1.0) * top
    else:
        raise ConfigError(
            f"`image` must have an unsigned integer or float dtype, got {image.dtype}"
        )
    density = -np.log((values + 1.0) / (top + 1.0))
    # One 3x3 matrix does deconvolution, per-stain scaling and reconstruction at once.
    mixing = HED_FROM_RGB @ np.diag(alpha) @ RGB_FROM_HED
    density = density @ mixing + beta @ RGB_FROM_HED
    values = np.exp(-density) * (top + 1.0) - 1.0
    values = np.clip(values, 0.0, top)
    if np.issubdtype(image.dtype, np.integer):
        return np.rint(values).astype(image.dtype)
    return (values / top).astype(image.dtype)


def scale_crop(
    image: np.ndarray,
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    origin: tuple[int, int],
    size: int,
    rng: np.random.Generator,
    *,
    max_scale: float = 0.1,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A ``size x size`` crop at ``origin`` zoomed about its centre by a random factor.

    The factor ``f = exp(U(-ln(1 + max_scale), ln(1 + max_scale)))`` (so ``1 / (1 +
    max_scale) <= f <= 1 + max_scale``, log-uniform) makes objects ``f`` times larger, as if the
    slide had been scanned at ``mpp / f`` instead of the model's µm/px. Output pixel ``i``
    samples the source at ``c + (i - c') / f`` with ``c`` the crop centre in the source and
    ``c' = (size - 1) / 2``; positions outside the source are mirrored like the halo padding
    (:data:`WARP_MODE`), so a zoomed-out crop sees real neighbouring pixels. The image and
    weights are sampled bilinearly, labels by their nearest pixel (no new values). With
    ``max_scale = 0`` the crop is the mirror-indexed crop itself.

    Parameters
    ----------
    image : (Y, X) or (Y, X, C) ndarray
        The whole source image.
    labels : (Y, X) int ndarray or None
    weights : (Y, X) float ndarray or None
    origin : (int, int)
        Top-left (y, x) of the unzoomed crop in the source; may be negative or run past it.
    size : int
        Crop edge in px.
    rng : numpy.random.Generator
    max_scale : float, optional
        In [0, 1).

    Returns
    -------
    image, labels, weights
        (size, size[, C]) crops, dtypes kept (``weights`` float32), None where None was given.
    """
    if not (math.isfinite(max_scale) and 0 <= max_scale < 1):
        raise ConfigError(f"`max_scale` ({max_scale}) must be in [0, 1)")
    if size < 1:
        raise ConfigError(f"`size` ({size}) must be >= 1")
    limit = math.log1p(max_scale)
    factor = math.exp(rng.uniform(-limit, limit))
    offsets = (np.arange(size, dtype=np.float64) - (size - 1) / 2) / factor
    rows = (origin[0] + (size - 1) / 2 + offsets)[:, None] + np.zeros((1, size))
    cols = np.zeros((size, 1)) + (origin[1] + (size - 1) / 2 + offsets)[None, :]
    sampler = _Sampler(rows, cols, np.shape(image)[:2])
    out_image = _to_dtype(sampler.linear(np.asarray(image)), np.asarray(image).dtype)
    out_labels = None if labels is None else sampler.nearest_neighbour(np.asarray(labels))
    out_weights = None
    if weights is not None:
        out_weights = sampler.linear(np.asarray(weights, dtype=np.float32))
    return out_image, out_labels, out_weights


def gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, *, max_sigma: float = 1.0, p: float = 0.5
) -> np.ndarray:
    """With probability ``p``, a Gaussian blur of standard deviation ``U(0, max_sigma)`` px.

    Focus and optics differ between scanners; a 20x slide resampled to a 40x model is softer.
    The filter is :func:`scipy.ndimage.gaussian_filter` over (y, x) only, mirrored at the
    edges (:data:`WARP_MODE`), truncated at 4 sigma; integer images are rounded back.
    """
    if not (math.isfinite(max_sigma) and max_sigma >= 0):
        raise ConfigError(f"`max_sigma` ({max_sigma}) must be a finite number >= 0")
    if not 0 <= p <= 1:
        raise ConfigError(f"`p` ({p}) must be in [0, 1]")
    apply, sigma = rng.random() < p, rng.uniform(0.0, max_sigma)
    image = np.asarray(image)
    if not apply or sigma == 0:
        return image
    sigmas = (sigma, sigma) + (0,) * (image.ndim - 2)
    blurred = ndi.gaussian_filter(image.astype(np.float32), sigmas, mode=WARP_MODE)
    return _to_dtype(blurred, image.dtype)


@dataclass(frozen=True, slots=True)
class PhotometricRanges:
    """Half-widths of the colour, intensity and blur jitter (0 disables a step)."""

    hed_scale: float = 0.1
    """Each stain amount (H, E, D) is scaled by ``U(1 - hed_scale, 1 + hed_scale)``."""
    hed_shift: float = 0.05
    """...and shifted by ``U(-hed_shift, hed_shift)`` optical density."""
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.1
    """See :func:`intensity_jitter`."""
    blur_sigma: float = 1.0
    """Largest Gaussian blur sigma in px (applied to half the samples)."""

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stain jitter (RGB only), then intensity jitter, then blur."""
        if image.ndim == 3 and image.shape[2] == 3:
            image = colour_jitter(image, rng, sigma=self.hed_scale, bias=self.hed_shift)
        image = intensity_jitter(
            image, rng, brightness=self.brightness, contrast=self.contrast, gamma=self.gamma
        )
        return gaussian_blur(image, rng, max_sigma=self.blur_sigma)


#: Ranges for H&E: stain amounts +-10 % and +-0.05 OD (between the "light" and "strong" HED
#: jitter of Tellez et al. 2018/2019), brightness/contrast/gamma +-10 %, blur up to 1 px.
HE_DEFAULTS = PhotometricRanges()
