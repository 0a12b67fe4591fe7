"""Label semantics: what a label image means and how to turn one kind into another.

Three kinds of label image appear in training and evaluation (see :func:`detect_label_kind`):

``"binary"``
    Two values, ``{0, 1}`` or ``{0, 255}`` (or a bool mask): foreground versus background.
    The ISBI 2012 labels are binary, with 255 = cell interior and 0 = membrane.
``"classes"``
    A few small non-negative integers, one per semantic class (0 usually background).
``"instances"``
    One id per object, 0 = background, ids need not be consecutive (MoNuSeg nuclei).

All functions here are pure numpy/scipy and work on (Y, X) arrays.

>>> import numpy as np
>>> b = np.array([[1, 1, 1, 2, 2, 2]] * 2)
>>> separate_touching(b)
array([[1, 1, 0, 0, 2, 2],
       [1, 1, 0, 0, 2, 2]])
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from tilesegment.errors import ConfigError

logger = logging.getLogger(__name__)

LabelKind = Literal["binary", "classes", "instances"]

#: Values ``< DEFAULT_MAX_CLASSES`` are read as semantic classes by :func:`detect_label_kind`.
DEFAULT_MAX_CLASSES = 16

#: 4-connectivity (cross-shaped structuring element), see :func:`instances_from_binary`.
CONNECTIVITY_4 = ndi.generate_binary_structure(2, 1)


def check_label_image(label: np.ndarray, name: str) -> np.ndarray:
    """Return ``label`` as an ndarray after checking it is a 2-D integer image >= 0."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ConfigError(f"`{name}` must be a (Y, X) array, got shape {label.shape}")
    if label.dtype == bool or not np.issubdtype(label.dtype, np.integer):
        raise ConfigError(
            f"`{name}` must have an integer dtype, got {label.dtype}"
            " (label a bool mask with tilesegment.train.labels.instances_from_binary)"
        )
    if label.size and np.issubdtype(label.dtype, np.signedinteger) and label.min() < 0:
        raise ConfigError(f"`{name}` must be >= 0, got minimum {label.min()}")
    return label


def separate_touching(instances: np.ndarray) -> np.ndarray:
    """Cut the separation border between touching instances (Ronneberger et al. 2015).

    A pixel of an instance is set to 0 (background) when any of its 8 neighbours belongs to a
    *different* non-zero instance. The test is made on the input map, all pixels at once,
    so the border is symmetric: where two objects touch, each loses the pixels that touch the
    other, which leaves a background gap 2 px wide along straight contacts (1 px on each side)
    and 2 px along diagonal ones. Objects touching only the background keep all their pixels;
    ids are unchanged. Pixels outside the image do not count as neighbours.

    Parameters
    ----------
    instances : (Y, X) int ndarray
        Instance ids, 0 = background.

    Returns
    -------
    separated : (Y, X) ndarray, same dtype as ``instances``
        A copy with the touching pixels set to 0.
    """
    instances = check_label_image(instances, "instances")
    if instances.size == 0:
        return instances.copy()
    # Visit each 8-neighbour pair once (4 offsets) and mark both of its pixels.
    touching = np.zeros(instances.shape, dtype=bool)
    height, width = instances.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        rows_a, rows_b = slice(0, height - dy), slice(dy, height)
        cols_a = slice(max(-dx, 0), width - max(dx, 0))
        cols_b = slice(max(dx, 0), width - max(-dx, 0))
        a = instances[rows_a, cols_a]
        b = instances[rows_b, cols_b]
        differ = (a != b) & (a != 0) & (b != 0)
        touching[rows_a, cols_a] |= differ
        touching[rows_b, cols_b] |= differ
    out = instances.copy()
    out[touching] = 0
    return out


def instances_from_binary(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a foreground mask.

    4-connectivity is the right dual of the 1-px membranes drawn in EM ground truth (ISBI
    2012): a membrane that is 8-connected, for example a diagonal staircase of single pixels,
    leaves diagonal gaps through which 8-connected foreground components would leak and merge
    two cells. With 4-connectivity such a line always separates them. This matches the
    connected-component step of the ISBI 2012 evaluation (Arganda-Carreras et al. 2015).

    Parameters
    ----------
    mask : (Y, X) bool ndarray
        Foreground. Non-bool arrays are read as ``mask != 0``.

    Returns
    -------
    instances : (Y, X) int32 ndarray
        0 = background, components numbered 1..N in raster order of their first pixel.

    Examples
    --------
    >>> m = np.array([[1, 0, 1],
    ...               [0, 1, 0]], dtype=bool)
    >>> instances_from_binary(m)
    array([[1, 0, 2],
           [0, 3, 0]], dtype=int32)
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ConfigError(f"`mask` must be a (Y, X) array, got shape {mask.shape}")
    out = np.zeros(mask.shape, dtype=np.int32)
    ndi.label(mask != 0, structure=CONNECTIVITY_4, output=out)
    return out


def _distinct_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values; bincount for small non-negative ints, np.unique otherwise."""
    if label.size == 0:
        return np.zeros(0, dtype=label.dtype)
    if label.dtype.itemsize <= 2 and not np.issubdtype(label.dtype, np.signedinteger):
        return np.flatnonzero(np.bincount(label.ravel()))
    return np.unique(label)


def detect_label_kind(label: np.ndarray, *, max_classes: int = DEFAULT_MAX_CLASSES) -> LabelKind:
    """Guess what a label image means; pass the kind explicitly when you know it.

    Rules, applied in order:

    1. bool dtype, or the distinct values are a subset of ``{0, 1}`` or of ``{0, 255}``
       -> ``"binary"``. (An all-zero image is binary.)
    2. every value is ``< max_classes`` (default 16) -> ``"classes"``.
    3. otherwise -> ``"instances"``.

    The rules cannot tell an instance map with fewer than ``max_classes - 1`` objects and
    consecutive ids (or a 2-object map with ids {0, 1}) from a class map: such small instance
    maps are reported as ``"classes"`` (or ``"binary"``) and callers should override. Values
    must be integral and non-negative; float images with integral values are accepted.

    Parameters
    ----------
    label : (Y, X) int, bool or integral float ndarray
        The label image.
    max_classes : int, optional
        Largest number of semantic classes expected; values ``>= max_classes`` mean instances.

    Returns
    -------
    kind : {"binary", "classes", "instances"}

    Examples
    --------
    >>> detect_label_kind(np.array([[0, 255], [255, 255]], dtype=np.uint8))
    'binary'
    >>> detect_label_kind(np.array([[0, 1], [2, 3]]))
    'classes'
    >>> detect_label_kind(np.arange(40).reshape(5, 8))
    'instances'
    """
    if max_classes < 2:
        raise ConfigError(f"`max_classes` ({max_classes}) must be >= 2")
    label = np.asarray(label)
    if label.dtype == bool:
        return "binary"
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise ConfigError("`label` has non-integral values; threshold or round it first")
        label = label.astype(np.int64)
    elif not np.issubdtype(label.dtype, np.integer):
        raise ConfigError(f"`label` must have an integer or bool dtype, got {label.dtype}")
    values = _distinct_values(label)
    if values.size and values[0] < 0:
        raise ConfigError(f"`label` must be >= 0, got minimum {values[0]}")
    as_set = set(values.tolist())
    if as_set <= {0, 1} or as_set <= {0, 255}:
        return "binary"
    if values[-1] < max_classes:
        return "classes"
    return "instances"
