"""Instances that separate touching nuclei: interior seeds grown into the nucleus region by at
most a fixed number of pixels, consistent across chunks.

For a model with a nucleus *interior* and a nucleus *boundary* class (named by the
``instances`` field of its checkpoint, :class:`~tilesegment.model.InstanceSpec`), the instances
of a class map are:

1. **Seeds**: the 4-connected components of the interior class with at least ``min_seed_px``
   pixels (smaller ones are left as plain nucleus region).
2. **Growth**: the seeds grow through the nucleus region (interior or boundary pixels) one
   4-neighbour step at a time, at most ``max_growth_px`` steps. A pixel reached in step ``k``
   takes the seed of a neighbour reached in step ``k - 1`` (or a seed pixel, for ``k = 1``);
   when several neighbours qualify the first in the order *above, left, right, below* wins.
   A pixel thus belongs to a seed at the smallest geodesic distance (<= ``max_growth_px``)
   through the region; every instance is 4-connected.
3. **The rest**: region pixels no seed reaches (a nucleus predicted as boundary only, or
   farther than ``max_growth_px`` from any seed) form instances of their own, their
   4-connected components.
4. Instances smaller than ``min_area_px`` are removed; ids are ``1 .. N`` in raster order of
   each instance's first pixel, as for :func:`~tilesegment.postprocess.label_chunked`.

Why this and not a library's expansion: :func:`skimage.segmentation.expand_labels` grows by
Euclidean distance through background too (a seed would jump a gap into a neighbouring
nucleus) and breaks ties by label value; a marker watershed has no distance limit. The tie
rule above depends only on positions, never on ids, which is what makes chunks agree.

Chunk consistency. Whether a pixel belongs to a seed, and which seed reaches it, depends only
on the pixels within ``max_growth_px`` of it and on the size of the interior components there:
a component piece that reaches from there to the edge of a window ``halo_px =
max_growth_px + 1 + min_seed_px`` px wider than the chunk has at least ``min_seed_px`` pixels.
So each chunk is computed from its window (chunk + ``halo_px``, clipped to the image), which
gives the right instance pieces on the chunk and on the one-pixel ring around it; two
4-adjacent pixels across a chunk face are in one instance exactly when their pieces are one
piece of the window. The pixels no seed reaches are joined only within the chunk and its
ring: farther out a pixel may look unreached because its seed lies outside the window, and
a path through such pixels once joined two nuclei (hypothesis found it).
:func:`~tilesegment.postprocess.label.label_fragments` joins the pieces across faces by
union-find. Memory: one window of the class map and its labels per thread,
plus a few numbers per piece and face contact; never the image. The result equals
:func:`seeded_instances` of the whole image, whatever the chunk shape (tested on random class
maps with hypothesis, and on a slide for tile sizes 252, 572 and 1084 and every engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.instances import InstanceSpec
from tilesegment.postprocess.common import STRUCTURES
from tilesegment.postprocess.label import ChunkedLabels, Fragments, label_fragments

#: The four neighbours in tie-break order (above, left, right, below), as
#: (slice of the pixels, slice of their neighbours).
_NEIGHBOURS = (
    (np.s_[1:, :], np.s_[:-1, :]),
    (np.s_[:, 1:], np.s_[:, :-1]),
    (np.s_[:, :-1], np.s_[:, 1:]),
    (np.s_[:-1, :], np.s_[1:, :]),
)


def grow_seeds(seeds: np.ndarray, region: np.ndarray, max_growth_px: int) -> np.ndarray:
    """Grow labelled seeds through ``region`` by at most ``max_growth_px`` 4-neighbour steps.

    Parameters
    ----------
    seeds : (Y, X) int ndarray
        Seed ids, 0 = no seed.
    region : (Y, X) bool ndarray
        Where seeds may grow.
    max_growth_px : int
        Number of steps (>= 0).

    Returns
    -------
    (Y, X) ndarray, dtype of ``seeds``
        A pixel reached in step ``k`` takes the id of a neighbour reached in step ``k - 1``,
        the first of above, left, right, below when several are.

    Examples
    --------
    >>> seeds = np.array([[1, 0, 0, 0, 2]])
    >>> grow_seeds(seeds, np.ones((1, 5), bool), 1).tolist()
    [[1, 1, 0, 2, 2]]
    >>> grow_seeds(seeds, np.ones((1, 5), bool), 2).tolist()
    [[1, 1, 1, 2, 2]]
    """
    labels = np.array(seeds, copy=True)
    free = np.asarray(region, dtype=bool) & (labels == 0)
    for _ in range(max_growth_px):
        new = np.zeros_like(labels)
        for pixels, neighbours in _NEIGHBOURS:
            source = labels[neighbours]
            take = free[pixels] & (new[pixels] == 0) & (source != 0)
            new[pixels][take] = source[take]
        reached = new != 0
        if not reached.any():
            break
        labels[reached] = new[reached]
        free &= ~reached
    return labels


def _keep_seeds(seeds: np.ndarray, count: int, min_seed_px: int, open_edges: tuple) -> np.ndarray:
    """(count + 1,) bool: seed pieces with ``min_seed_px`` pixels or touching an open edge."""
    keep = np.bincount(seeds.ravel(), minlength=count + 1) >= min_seed_px
    lines = (seeds[0], seeds[-1], seeds[:, 0], seeds[:, -1])
    for is_open, line in zip(open_edges, lines, strict=True):
        if is_open:
            keep[line] = True  # the piece may go on outside the window
    keep[0] = False
    return keep


def window_instances(
    classes: np.ndarray,
    spec: InstanceSpec,
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
    rest_within: Box | None = None,
) -> tuple[np.ndarray, int]:
    """Instance pieces of a window of a class map, ids in no particular order.

    Parameters
    ----------
    classes : (Y, X) int ndarray
        Class per pixel.
    spec : InstanceSpec
    open_edges : (top, bottom, left, right) tuple of bool
        Which window edges are not image edges (the image goes on there).
    rest_within : Box, optional
        Where, in window coordinates, the pixels no seed reaches are labelled (None: the whole
        window). Near an open edge a pixel may look unreached because its seed lies outside
        the window, so the connections of those pixels are trusted only in the box where each
        pixel's seed is known (a chunk and its one-pixel ring); pieces outside it are joined
        through the chunks' faces.

    Returns
    -------
    local : (Y, X) int32 ndarray
        0 = not in an instance; pixels with one id are in one instance.
    count : int
        Ids are 1 .. count (some may be unused).
    """
    region = (classes == spec.interior) | (classes == spec.boundary)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    local = np.zeros(classes.shape, dtype=np.int32)
    if rows.size == 0:
        return local, 0
    # Only the bounding box of the region matters; its edges are open where the window's are.
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = classes.shape
    edges = (open_edges[0] and y0 == 0, open_edges[1] and y1 == h)
    edges += (open_edges[2] and x0 == 0, open_edges[3] and x1 == w)
    sub = classes[y0:y1, x0:x1]
    seeds, n = ndimage.label(sub == spec.interior, structure=STRUCTURES[4], output=np.int32)
    if spec.min_seed_px > 1 and n:
        seeds = _keep_seeds(seeds, n, spec.min_seed_px, edges)[seeds] * seeds
    grown = grow_seeds(seeds, region[y0:y1, x0:x1], spec.max_growth_px)
    unreached = region[y0:y1, x0:x1] & (grown == 0)
    if rest_within is not None:
        trusted = np.zeros(classes.shape, dtype=bool)
        trusted[rest_within.slices] = True
        unreached &= trusted[y0:y1, x0:x1]
    rest, m = ndimage.label(unreached, structure=STRUCTURES[4])
    local[y0:y1, x0:x1] = np.where(rest > 0, rest + n, grown)
    return local, n + m


def seeded_instances(
    classes: np.ndarray, spec: InstanceSpec, *, min_area_px: float = 0.0
) -> np.ndarray:
    """Seeded instances of a whole class map in one pass (the reference for the chunked path).

    Parameters
    ----------
    classes : (Y, X) int ndarray
    spec : InstanceSpec
    min_area_px : float
        Instances with fewer pixels are removed.

    Returns
    -------
    (Y, X) uint32 ndarray
        Ids 1..N in raster order of each instance's first pixel, 0 = background.

    Examples
    --------
    Two nuclei whose boundaries touch (class 2 between two interiors of class 1):

    >>> row = np.array([[0, 2, 1, 1, 2, 2, 1, 1, 2, 0]])
    >>> seeded_instances(row, InstanceSpec(min_seed_px=0)).tolist()
    [[0, 1, 1, 1, 1, 2, 2, 2, 2, 0]]
    """
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ConfigError(f"`classes` must be a (Y, X) array, got shape {classes.shape}")
    local, n = window_instances(classes, spec)
    flat = local.ravel()
    area = np.bincount(flat, minlength=n + 1)
    first = np.full(n + 1, flat.size, dtype=np.int64)
    nz = np.flatnonzero(flat)
    np.minimum.at(first, flat[nz], nz)
    kept = np.flatnonzero((area >= max(min_area_px, 1)) & (np.arange(n + 1) > 0))
    kept = kept[np.argsort(first[kept])]
    final = np.zeros(n + 1, dtype=np.uint32)
    final[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    return final[local]


def _window(box: Box, image_shape: tuple[int, int], halo: int) -> Box:
    y0, x0 = max(0, box.y - halo), max(0, box.x - halo)
    y1 = min(image_shape[0], box.y + box.h + halo)
    x1 = min(image_shape[1], box.x + box.w + halo)
    return Box(y0, x0, y1 - y0, x1 - x0)


@dataclass(frozen=True, slots=True, eq=False)
class SeededPieces:
    """The instance pieces of one chunk, computed from its window of the class map.

    Safe to call from several threads when ``read_classes`` is.
    """

    read_classes: Callable[[Box], np.ndarray]
    """``read_classes(box) -> (box.h, box.w)`` class ids, for any box inside the image."""
    image_shape: tuple[int, int]
    """(H, W) of the class map."""
    spec: InstanceSpec
    """Classes and growth limits."""

    def __call__(self, box: Box) -> Fragments:
        """Pieces of the chunk at ``box`` and the joins to its top and left neighbours."""
        window = _window(box, self.image_shape, self.spec.halo_px)
        classes = np.asarray(self.read_classes(window))
        if classes.shape != window.shape:
            raise ConfigError(f"`read_classes` gave shape {classes.shape} for {window}")
        open_edges = (
            window.y > 0,
            window.y + window.h < self.image_shape[0],
            window.x > 0,
            window.x + window.w < self.image_shape[1],
        )
        dy, dx = box.y - window.y, box.x - window.x
        ring = _window(Box(dy, dx, box.h, box.w), window.shape, 1)  # the chunk and its ring
        local, n = window_instances(classes, self.spec, open_edges, rest_within=ring)
        core = local[dy : dy + box.h, dx : dx + box.w]
        top = core[0] == local[dy - 1, dx : dx + box.w] if dy > 0 else None
        left = core[:, 0] == local[dy : dy + box.h, dx - 1] if dx > 0 else None
        present = np.bincount(core.ravel(), minlength=n + 1) > 0
        present[0] = False
        compact = np.cumsum(present, dtype=np.int32) * present
        return Fragments(compact[core], int(present.sum()), top, left)


@dataclass(frozen=True, slots=True, eq=False)
class SeededLabels:
    """Seeded instances of a chunked class map, as found by :func:`label_seeded`.

    Holds no pixels: :meth:`relabel` recomputes a chunk's pieces from its window and maps
    them to the final ids. Safe to share between threads (read-only) when the reader is.
    """

    labels: ChunkedLabels
    """The joined pieces: final id per piece, number of instances, removed instances."""
    pieces: SeededPieces
    """How a chunk's pieces are computed."""

    @property
    def count(self) -> int:
        """Number of instances N; their ids are 1 .. N."""
        return self.labels.count

    @property
    def removed(self) -> int:
        """Instances removed for being smaller than ``min_area_px``."""
        return self.labels.removed

    def relabel(self, box: Box) -> np.ndarray:
        """Final instance ids (h, w) uint32 of the chunk at ``box``."""
        return self.labels.ids(box, self.pieces(box))


def label_seeded(
    read_classes: Callable[[Box], np.ndarray],
    image_shape: tuple[int, int],
    chunk_shape: tuple[int, int],
    spec: InstanceSpec,
    *,
    min_area_px: float = 0.0,
    threads: int | None = 1,
) -> SeededLabels:
    """Seeded instances of a class map read one window at a time, consistent across chunks.

    Parameters
    ----------
    read_classes : callable
        ``read_classes(box) -> (box.h, box.w) int ndarray`` of class ids, for any box inside
        the image (a chunk widened by ``spec.halo_px``); called twice per chunk, from worker
        threads when ``threads > 1``.
    image_shape : (H, W) tuple of int
    chunk_shape : (cy, cx) tuple of int
    spec : InstanceSpec
    min_area_px : float
        Instances with fewer pixels are removed.
    threads : int, optional
        Chunks computed in parallel (None: up to 4).

    Returns
    -------
    SeededLabels
        Equal to :func:`seeded_instances` of the whole image, whatever ``chunk_shape``.

    Examples
    --------
    >>> classes = np.zeros((6, 8), int)
    >>> classes[1:5, 1:7] = 2
    >>> classes[2:4, 2:3] = classes[2:4, 5:6] = 1
    >>> found = label_seeded(
    ...     lambda b: classes[b.slices], classes.shape, (3, 3), InstanceSpec(min_seed_px=0)
    ... )
    >>> found.count, found.relabel(Box(3, 3, 3, 3)).tolist()
    (2, [[1, 2, 2], [1, 2, 2], [0, 0, 0]])
    """
    shape = (int(image_shape[0]), int(image_shape[1]))
    pieces = SeededPieces(read_classes, shape, spec)
    labels = label_fragments(pieces, shape, chunk_shape, min_area_px=min_area_px, threads=threads)
    return SeededLabels(labels, pieces)
