"""Chunk-consistent connected components: each chunk labelled on its own, fragments joined
across chunk faces by a union-find, ids in raster order of first pixels. Pure: works on any
chunk reader, equal to labelling the whole image at once whatever the chunk size."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.postprocess.common import (
    STRUCTURES,
    check_connectivity,
    chunk_rows,
    default_threads,
    ordered_map,
)


@dataclass(frozen=True, slots=True)
class _ChunkScan:
    """What the first pass keeps of one chunk: fragment sizes, first pixels and edge lines."""

    count: int
    area: np.ndarray
    """(count,) int64 pixel count of local fragments 1..count."""
    first_key: np.ndarray
    """(count,) int64 raster index ``y * W + x`` of each fragment's first pixel."""
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    top_join: np.ndarray | None = None
    """(w,) bool: row 0 joins the pixel above it; None: wherever both are fragments."""
    left_join: np.ndarray | None = None
    """(h,) bool: column 0 joins the pixel left of it; None: wherever both are fragments."""


@dataclass(frozen=True, slots=True, eq=False)
class Fragments:
    """One chunk cut into fragments, the pieces of instances that :func:`label_fragments`
    joins across chunk faces.

    Every fragment must lie inside one instance, and every two 4-adjacent pixels of one
    instance must be linked by a path of such pixels whose steps stay inside one fragment or
    cross a chunk face where the join lines say so.
    """

    local: np.ndarray
    """(h, w) int ids 0..count, 0 = no instance."""
    count: int
    """Number of fragments."""
    top_join: np.ndarray | None = None
    """(w,) bool: pixel ``(0, x)`` is in the instance of the pixel above it (read only where
    both are fragment pixels); None: always (connected components)."""
    left_join: np.ndarray | None = None
    """(h,) bool: the same for column 0 and the pixel to its left."""


def _scan_chunk(box: Box, fragments: Fragments, width: int) -> _ChunkScan:
    local, count = fragments.local, fragments.count
    flat = local.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:].astype(np.int64)
    first = np.full(count + 1, flat.size, dtype=np.int64)
    nz = np.flatnonzero(flat)
    np.minimum.at(first, flat[nz], nz)
    rows, cols = np.divmod(first[1:], box.w)
    key = (rows + box.y) * width + (cols + box.x)
    return _ChunkScan(
        count,
        area,
        key,
        local[0].copy(),
        local[-1].copy(),
        local[:, 0].copy(),
        local[:, -1].copy(),
        fragments.top_join,
        fragments.left_join,
    )


def _contacts(
    previous: np.ndarray,
    current: np.ndarray,
    shifts: tuple[int, ...],
    join: np.ndarray | None = None,
) -> np.ndarray:
    """Distinct pairs (a, b) of fragment ids that touch across a face.

    ``previous`` is the line of global ids on the far side of the face, padded with one 0 at
    each end so that ``previous[k + 1]`` faces ``current[k]``; ``shifts`` are the offsets
    along the face that count as touching (0 only for 4-connectivity, -1..1 for 8). Pairs
    are deduplicated, so a face costs one pair per touching fragment pair, not per pixel.
    ``join`` (4-connectivity only), when given, keeps only the positions where it is True.
    """
    n = current.size
    out = []
    for d in shifts:
        a = previous[1 + d : 1 + d + n]
        hit = (a > 0) & (current > 0)
        if join is not None:
            hit &= join
        if hit.any():
            out.append(np.stack([a[hit], current[hit]], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(out), axis=0)


@dataclass(frozen=True, slots=True, eq=False)
class ChunkedLabels:
    """Instance ids of a chunked binary image, as found by :func:`label_chunked`.

    Holds no pixels: :meth:`relabel` turns one chunk's foreground into its final ids. Safe to
    share between threads (read-only).
    """

    image_shape: tuple[int, int]
    """(H, W) of the image in pixels."""
    chunk_shape: tuple[int, int]
    """(cy, cx) chunk size; chunks start at multiples of it and are clipped to the image."""
    connectivity: int
    """4 or 8."""
    offsets: np.ndarray
    """(ny, nx) int64: fragment ``l`` of chunk (i, j) has the global id ``offsets[i, j] + l``."""
    counts: np.ndarray
    """(ny, nx) int64 number of fragments per chunk."""
    lut: np.ndarray
    """(F + 1,) uint32 final instance id per global fragment id; 0 for background/removed."""
    count: int
    """Number of instances N; their ids are 1 .. N."""
    removed: int
    """Number of connected components removed for being smaller than ``min_area_px``."""

    def relabel(self, box: Box, foreground: np.ndarray) -> np.ndarray:
        """Final instance ids (h, w) uint32 of the chunk at ``box`` from its foreground.

        ``foreground`` must be the same (h, w) boolean array the scan saw.
        """
        local, n = ndimage.label(foreground, structure=STRUCTURES[self.connectivity])
        return self.ids(box, Fragments(local, n))

    def ids(self, box: Box, fragments: Fragments) -> np.ndarray:
        """Final instance ids (h, w) uint32 of the chunk at ``box`` from its fragments, which
        must be those the scan saw."""
        cy, cx = self.chunk_shape
        i, j = box.y // cy, box.x // cx
        local, n = fragments.local, fragments.count
        if n != self.counts[i, j]:
            raise StoreError(
                f"chunk {box} now has {n} fragments but had {self.counts[i, j]} when scanned; "
                "the input changed during labelling"
            )
        offset = int(self.offsets[i, j])
        table = self.lut[offset : offset + n + 1].copy()
        table[0] = 0
        return table[local]


def _join_chunks(
    rows: list[list[Box]], scans: Iterator[_ChunkScan], width: int, shifts: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Give every chunk's fragments global ids and collect the contacts across chunk faces.

    ``scans`` come in row-major chunk order. Only the bottom line of the previous chunk row
    (``width`` ids) and the right column of the previous chunk are kept.

    Returns (offsets, counts, area, first_key, contacts): per-chunk id offsets and fragment
    counts, (F + 1,) per-fragment areas and first-pixel keys (index 0 = background), and
    (E, 2) pairs of touching fragment ids.
    """
    ny, nx = len(rows), len(rows[0])
    offsets = np.zeros((ny, nx), dtype=np.int64)
    counts = np.zeros((ny, nx), dtype=np.int64)
    areas: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    keys: list[np.ndarray] = [np.full(1, -1, dtype=np.int64)]
    pairs: list[np.ndarray] = [np.empty((0, 2), dtype=np.int64)]
    total = 0
    # Global ids of the bottom line of the previous chunk row, with one 0 of padding each side.
    above = np.zeros(width + 2, dtype=np.int64)
    for i, row in enumerate(rows):
        below = np.zeros(width + 2, dtype=np.int64)
        left = None  # global ids of the previous chunk's right column, padded
        for j, box in enumerate(row):
            s = next(scans)
            offsets[i, j], counts[i, j] = total, s.count
            areas.append(s.area)
            keys.append(s.first_key)
            top, first_col, bottom, right = (
                np.where(line > 0, line.astype(np.int64) + total, 0)
                for line in (s.top, s.left, s.bottom, s.right)
            )
            if i > 0:  # x0 - 1 .. x1 of the line above, diagonals across chunk corners included
                line = above[box.x : box.x + box.w + 2]
                pairs.append(_contacts(line, top, shifts, s.top_join))
            if left is not None:
                pairs.append(_contacts(left, first_col, shifts, s.left_join))
            below[box.x + 1 : box.x + box.w + 1] = bottom
            left = np.pad(right, 1)
            total += s.count
        above = below
    return offsets, counts, np.concatenate(areas), np.concatenate(keys), np.concatenate(pairs)


def _number_components(
    area: np.ndarray, first_key: np.ndarray, contacts: np.ndarray, min_area_px: float
) -> tuple[np.ndarray, int, int]:
    """Final id per fragment: components of the contact graph, small ones removed, numbered
    1..N by their first pixel. Returns (lut, N, removed)."""
    n = len(area)
    graph = sparse.coo_matrix(
        (np.ones(len(contacts), dtype=np.int8), (contacts[:, 0], contacts[:, 1])), shape=(n, n)
    )
    n_comp, comp = csgraph.connected_components(graph, directed=False)
    comp_area = np.bincount(comp, weights=area, minlength=n_comp)
    comp_key = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(comp_key, comp[1:], first_key[1:])
    real = np.ones(n_comp, dtype=bool)
    real[comp[0]] = False  # node 0 is the background (it has no contacts)
    kept = np.flatnonzero(real & (comp_area >= min_area_px))
    kept = kept[np.argsort(comp_key[kept])]  # keys are distinct pixels: a strict order
    if len(kept) >= 2**32:
        raise ConfigError(f"{len(kept)} instances do not fit uint32 ids")
    final = np.zeros(n_comp, dtype=np.uint32)
    final[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
    return final[comp], len(kept), int(real.sum()) - len(kept)


def label_chunked(
    read_foreground: Callable[[Box], np.ndarray],
    image_shape: tuple[int, int],
    chunk_shape: tuple[int, int],
    *,
    connectivity: int = 4,
    min_area_px: float = 0.0,
    threads: int | None = 1,
) -> ChunkedLabels:
    """Connected components of an image read one chunk at a time, consistent across chunks.

    Parameters
    ----------
    read_foreground : callable
        ``read_foreground(box) -> (box.h, box.w) bool ndarray``, called once per chunk (from
        worker threads when ``threads > 1``).
    image_shape : (H, W) tuple of int
    chunk_shape : (cy, cx) tuple of int
    connectivity : {4, 8}
        Pixel neighbourhood (see the module docstring for why 4 is the default).
    min_area_px : float
        Components with fewer pixels are removed (get id 0).
    threads : int, optional
        Chunks scanned in parallel (None: up to 4).

    Returns
    -------
    ChunkedLabels
        Ids 1..N in raster order of each component's first pixel: identical for any chunk
        shape, and equal to :func:`scipy.ndimage.label` of the whole image renumbered that way.

    Examples
    --------
    >>> mask = np.zeros((4, 6), bool)
    >>> mask[1:3, 1:5] = True
    >>> mask[3, 5] = True
    >>> labels = label_chunked(lambda b: mask[b.slices], mask.shape, (2, 2))
    >>> labels.count
    2
    >>> labels.relabel(Box(2, 4, 2, 2), mask[2:4, 4:6]).tolist()
    [[1, 0], [0, 2]]
    """
    check_connectivity(connectivity)
    structure = STRUCTURES[connectivity]

    def fragments(box: Box) -> Fragments:
        fg = np.asarray(read_foreground(box), dtype=bool)
        if fg.shape != box.shape:
            raise ConfigError(f"`read_foreground` gave shape {fg.shape} for {box}")
        return Fragments(*ndimage.label(fg, structure=structure))

    return label_fragments(
        fragments,
        image_shape,
        chunk_shape,
        connectivity=connectivity,
        min_area_px=min_area_px,
        threads=threads,
    )


def label_fragments(
    fragments: Callable[[Box], Fragments],
    image_shape: tuple[int, int],
    chunk_shape: tuple[int, int],
    *,
    connectivity: int = 4,
    min_area_px: float = 0.0,
    threads: int | None = 1,
) -> ChunkedLabels:
    """Instances of an image cut into fragments one chunk at a time, joined across chunk faces.

    The engine of :func:`label_chunked` (fragments: a chunk's connected components) and of
    :func:`~tilesegment.postprocess.seeded.label_seeded` (fragments: grown seeds, with join
    lines saying which face neighbours share an instance).

    Parameters
    ----------
    fragments : callable
        ``fragments(box) -> Fragments`` of the chunk at ``box``, called once per chunk (from
        worker threads when ``threads > 1``).
    image_shape, chunk_shape, connectivity, min_area_px, threads
        As for :func:`label_chunked`; join lines need ``connectivity=4``.

    Returns
    -------
    ChunkedLabels
        Ids 1..N in raster order of each instance's first pixel, whatever the chunk shape.
    """
    check_connectivity(connectivity)
    rows = chunk_rows(image_shape, chunk_shape)
    width = int(image_shape[1])

    def scan(box: Box) -> _ChunkScan:
        found = fragments(box)
        if found.local.shape != box.shape:
            raise ConfigError(f"fragments of {box} have shape {found.local.shape}")
        if connectivity != 4 and (found.top_join is not None or found.left_join is not None):
            raise ConfigError("join lines need `connectivity` 4")
        return _scan_chunk(box, found, width)

    scans = ordered_map(scan, (b for row in rows for b in row), default_threads(threads))
    try:
        shifts = (0,) if connectivity == 4 else (-1, 0, 1)
        offsets, counts, area, key, contacts = _join_chunks(rows, scans, width, shifts)
    finally:
        scans.close()  # stops the scan threads if joining failed
    lut, count, removed = _number_components(area, key, contacts, min_area_px)
    return ChunkedLabels(
        image_shape=(int(image_shape[0]), width),
        chunk_shape=(int(chunk_shape[0]), int(chunk_shape[1])),
        connectivity=connectivity,
        offsets=offsets,
        counts=counts,
        lut=lut,
        count=count,
        removed=removed,
    )
