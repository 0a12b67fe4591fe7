"""Nucleus instances, per-instance measurements and QuPath GeoJSON from a finished output store.

Three steps, each reading the store chunk by chunk so that memory never holds the whole image:

1. :func:`label_instances` turns the stitched class map ``labels/mask`` (or a probability
   threshold) into instance ids and writes them as ``labels/nuclei`` (uint32).
2. :func:`measure_instances` accumulates per-instance sums chunk by chunk (``np.bincount``
   over each chunk's ids) into an :class:`InstanceTable`; :func:`write_table` writes it as CSV
   (and Parquet when ``pyarrow`` is importable).
3. :func:`export_geojson` streams one GeoJSON ``Feature`` per instance to a file, in the form
   QuPath (>= 0.4) imports as detections. :func:`postprocess_output` runs all three.

Conventions
-----------
Connectivity
    Instances are **4-connected** by default. The model separates touching nuclei with
    background borders at least 1 px wide, and a 1 px border drawn as a diagonal staircase only
    separates 4-connected regions: under 8-connectivity the pixels on either side of it touch
    at their corners and the two nuclei would merge. (4-connected foreground and 8-connected
    background is the consistent pair of digital topologies.) Smooth blobs lose nothing; a
    single-pixel diagonal spur becomes its own fragment and falls below ``min_area_um2``.
    ``connectivity=8`` is available for masks without separation borders.
No watershed
    Touching objects are not split further: a distance or probability watershed needs context
    across chunk borders to be chunk-invariant, and the model's separation borders already do
    the splitting.
Chunk consistency
    Each chunk is labelled on its own (:func:`scipy.ndimage.label`); the resulting fragments
    are joined across chunk faces (and, for 8-connectivity, diagonally across faces and chunk
    corners) by a union-find over the face contacts
    (:func:`scipy.sparse.csgraph.connected_components`). Memory is one image row of ids plus
    a few numbers per fragment and per face contact, never the image. The result equals
    labelling the whole image at once, whatever the chunk size (tested against
    :func:`scipy.ndimage.label` on random masks).
Id order
    Ids are consecutive, ``1 .. N``, in raster order of each instance's first pixel (its
    top-most row, then its left-most pixel in that row) in the whole image. This order does
    not depend on the chunk size or thread count. Instances smaller than ``min_area_um2`` are
    removed before numbering.
Coordinate frames
    *Store px* are numpy indices of the processed level (``labels/nuclei`` level 0); an index
    names a pixel *centre*, like NGFF, so ``centroid_*_px`` is a mean index and
    ``*_um = index * mpp`` (the store writes no NGFF translation). *Level-0 px* is the frame of
    QuPath and of the GeoJSON: continuous coordinates of the slide's full-resolution level with
    ``(0, 0)`` at the top-left *corner* of the top-left pixel. Store pixel ``(y, x)`` covers
    ``[x, x + 1] x [y, y + 1]`` scaled by ``level0_per_px``, so a pixel centre maps to
    ``(index + 0.5) * level0_per_px``. ``level0_per_px`` (y, x) is the ``downsample`` argument
    when given, else the store attribute ``level0_per_px`` (a number or ``[y, x]``), else 1 (a
    warning is logged when the store was made from a level other than 0 without it).
Polygons
    The outline of the instance's pixel edges (so the unsimplified polygon's area is exactly
    the pixel count), holes included; then :meth:`shapely.Polygon.simplify` with
    ``simplify_px`` (0.5 store px by default, topology preserving; the area changes by at most
    ``simplify_px`` times the perimeter); made valid with :func:`shapely.make_valid` if needed,
    keeping the largest polygon when that yields several (only possible for 8-connected
    instances); exterior counter-clockwise in (x, y) numbers, as RFC 7946 recommends.
Table location
    :func:`postprocess_output` writes the table beside the store, ``OUT.zarr`` ->
    ``OUT.nuclei.csv`` (:func:`default_table_path`), unless a path is given. Nothing is written
    inside the store except ``labels/nuclei``.

Lifecycle: :func:`label_instances` needs a complete store (or one whose only unfinished part is
the label it is about to recompute, left behind by an interrupted export). It replaces an
existing label of the same name, which sets the store back to incomplete until its closing
:meth:`~tilesegment.store.OutputStore.finalize`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import zarr
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.store import ATTR_KEY, OutputStore

if TYPE_CHECKING:
    import shapely

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_MIN_AREA_UM2",
    "ChunkedLabels",
    "InstanceSummary",
    "InstanceTable",
    "PostprocessResult",
    "default_table_path",
    "export_geojson",
    "instance_polygon",
    "iter_features",
    "label_chunked",
    "label_instances",
    "measure_instances",
    "postprocess_output",
    "write_table",
]

logger = logging.getLogger(__name__)

#: Name of the instance label written by :func:`label_instances`.
DEFAULT_LABEL = "nuclei"

#: Instances smaller than this (µm², or px when the mpp is unknown) are removed by default:
#: about a disc of 3.6 µm diameter, well below any nucleus.
DEFAULT_MIN_AREA_UM2 = 10.0

#: Default Douglas-Peucker tolerance of GeoJSON polygons, in store px.
SIMPLIFY_PX = 0.5

_STRUCTURES = {
    4: ndimage.generate_binary_structure(2, 1),
    8: ndimage.generate_binary_structure(2, 2),
}
_COORD_DECIMALS = 3
_T = TypeVar("_T")
_R = TypeVar("_R")


# ---------------------------------------------------------------------------------------------
# small helpers


def _default_threads(threads: int | None) -> int:
    if threads is None:
        return max(1, min(4, os.cpu_count() or 1))
    if threads < 1:
        raise ConfigError(f"`threads` ({threads}) must be >= 1")
    return int(threads)


def _ordered_map(
    fn: Callable[[_T], _R], items: Iterable[_T], threads: int
) -> Generator[_R, None, None]:
    """``map(fn, items)`` on ``threads`` threads, in order, with at most ``2 * threads``
    results pending so memory stays bounded whatever the number of items."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _chunk_rows(image_shape: tuple[int, int], chunk_shape: tuple[int, int]) -> list[list[Box]]:
    """The chunk grid as rows of boxes (clipped to the image), row-major."""
    (h, w), (cy, cx) = image_shape, chunk_shape
    if h < 1 or w < 1 or cy < 1 or cx < 1:
        raise ConfigError(
            f"`image_shape` ({image_shape}) and `chunk_shape` ({chunk_shape}) must be positive"
        )
    return [
        [Box(y, x, min(cy, h - y), min(cx, w - x)) for x in range(0, w, cx)]
        for y in range(0, h, cy)
    ]


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in _STRUCTURES:
        raise ConfigError(f"`connectivity` ({connectivity}) must be 4 or 8")


# ---------------------------------------------------------------------------------------------
# chunk-consistent connected components (pure: works on any chunk reader)


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


def _scan_chunk(box: Box, foreground: np.ndarray, structure: np.ndarray, width: int) -> _ChunkScan:
    local, count = ndimage.label(foreground, structure=structure)
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
    )


def _contacts(previous: np.ndarray, current: np.ndarray, shifts: tuple[int, ...]) -> np.ndarray:
    """Distinct pairs (a, b) of fragment ids that touch across a face.

    ``previous`` is the line of global ids on the far side of the face, padded with one 0 at
    each end so that ``previous[k + 1]`` faces ``current[k]``; ``shifts`` are the offsets
    along the face that count as touching (0 only for 4-connectivity, -1..1 for 8). Pairs
    are deduplicated, so a face costs one pair per touching fragment pair, not per pixel.
    """
    n = current.size
    out = []
    for d in shifts:
        a = previous[1 + d : 1 + d + n]
        hit = (a > 0) & (current > 0)
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
        cy, cx = self.chunk_shape
        i, j = box.y // cy, box.x // cx
        local, n = ndimage.label(foreground, structure=_STRUCTURES[self.connectivity])
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
                pairs.append(_contacts(above[box.x : box.x + box.w + 2], top, shifts))
            if left is not None:
                pairs.append(_contacts(left, first_col, shifts))
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
    _check_connectivity(connectivity)
    rows = _chunk_rows(image_shape, chunk_shape)
    structure = _STRUCTURES[connectivity]
    width = int(image_shape[1])

    def scan(box: Box) -> _ChunkScan:
        fg = np.asarray(read_foreground(box), dtype=bool)
        if fg.shape != box.shape:
            raise ConfigError(f"`read_foreground` gave shape {fg.shape} for {box}")
        return _scan_chunk(box, fg, structure, width)

    scans = _ordered_map(scan, (b for row in rows for b in row), _default_threads(threads))
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


# ---------------------------------------------------------------------------------------------
# store state


def _label_state(path: Path, name: str) -> str:
    """``"missing"``, ``"pending"`` (created, not finalised) or ``"final"``."""
    try:
        group = zarr.open_group(str(path / "labels" / name), mode="r", zarr_format=2)
    except FileNotFoundError:
        return "missing"
    return "final" if "multiscales" in group.attrs else "pending"


def _incomplete_message(path: Path) -> str:
    return (
        f"{path} is incomplete (the run did not finish); re-run `tilesegment run SLIDE -o {path}` "
        "with --resume to finish it, or with --overwrite to start again"
    )


def _open_store(path: str | os.PathLike[str], *, label: str, writable: bool) -> OutputStore:
    """Open a finished store; an export interrupted while writing ``label`` counts as finished
    when ``writable`` (the label is recomputed)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist; run `tilesegment run SLIDE -o {path}` first")
    store = OutputStore.open(path, mode="r+" if writable else "r")
    if store.is_complete():
        return store
    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    others_final = all(_label_state(path, n) == "final" for n in store.label_names if n != label)
    if "multiscales" in root.attrs and others_final and _label_state(path, label) == "pending":
        if writable:
            logger.warning("%s: labels/%s was left unfinished; recomputing it", path, label)
            return store
        raise StoreError(
            f"labels/{label} of {path} was left unfinished by an interrupted export; re-run "
            f"`tilesegment export {path} --instances`"
        )
    raise StoreError(_incomplete_message(path))


def _drop_label(path: Path, name: str) -> None:
    """Remove ``labels/<name>`` so that it can be created afresh.

    The label is first unlisted from ``labels/.zattrs`` (both the NGFF list and the pending
    list kept by :mod:`tilesegment.store`), then deleted, so a crash in between leaves an
    unlisted directory that :meth:`OutputStore.create_label` overwrites. This edits the store's
    own bookkeeping and belongs in :class:`OutputStore` (a ``delete_label`` method).
    """
    group = zarr.open_group(str(path / "labels"), mode="r+", zarr_format=2)
    attrs = dict(group.attrs)
    meta = dict(attrs.get(ATTR_KEY, {}))
    update: dict[str, Any] = {
        ATTR_KEY: {**meta, "labels": [n for n in meta.get("labels", []) if n != name]}
    }
    if "labels" in attrs:
        update["labels"] = [n for n in attrs["labels"] if n != name]
    group.attrs.update(update)
    target = path / "labels" / name
    if target.exists():
        try:
            shutil.rmtree(target)
        except OSError as exc:
            raise StoreError(f"cannot remove the old {target}: {exc}") from exc
    logger.info("removed %s", target)


def _foreground_reader(
    store: OutputStore, class_id: int, threshold: float | None
) -> Callable[[Box], np.ndarray]:
    if threshold is None:
        mask = store.mask
        return lambda box: mask[box.slices] == class_id
    probs = store.probabilities
    level = threshold * (255.0 if store.dtype == "uint8" else 1.0)
    return lambda box: probs[(class_id, *box.slices)] >= level


def _check_class(store: OutputStore, class_id: int) -> None:
    if not 0 <= class_id < len(store.classes):
        raise ConfigError(
            f"`class_id` ({class_id}) must name one of the {len(store.classes)} classes "
            f"{store.classes.names} (0..{len(store.classes) - 1})"
        )


# ---------------------------------------------------------------------------------------------
# step 1: instances


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """What :func:`label_instances` wrote."""

    path: Path
    """The output store."""
    label: str
    """Name of the label written, ``labels/<label>``."""
    count: int
    """Number of instances N (ids 1..N)."""
    removed: int
    """Connected components dropped for being smaller than ``min_area_px``."""
    min_area_px: float
    """The area threshold in store px (``min_area_um2`` converted with the mpp)."""
    connectivity: int
    """4 or 8."""
    class_id: int
    """The class whose pixels form the instances."""
    threshold: float | None
    """Probability threshold used instead of the argmax mask, or None."""
    seconds: float
    """Wall time."""


def label_instances(
    store_path: str | os.PathLike[str],
    *,
    class_id: int = 1,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    threshold: float | None = None,
    connectivity: int = 4,
    label: str = DEFAULT_LABEL,
    threads: int | None = None,
) -> InstanceSummary:
    """Write the instances of ``class_id`` as ``labels/<label>`` (uint32) and finalise the store.

    Parameters
    ----------
    store_path : path-like
        A complete output store (see the module docstring for the lifecycle).
    class_id : int
        Foreground is ``labels/mask == class_id``.
    min_area_um2 : float
        Instances smaller than this are removed; in px when the store's mpp is unknown.
    threshold : float, optional
        In (0, 1]: use ``probability[class_id] >= threshold`` instead of the argmax mask.
    connectivity : {4, 8}
        Pixel neighbourhood; 4 keeps the model's 1 px separation borders meaningful.
    label : str
        Name of the label to write; an existing label of that name is replaced.
    threads : int, optional
        Chunks processed in parallel (default: up to 4).

    Returns
    -------
    InstanceSummary

    Raises
    ------
    StoreError
        The store is missing, incomplete or cannot be written.
    ConfigError
        An argument is invalid.
    """
    start = time.perf_counter()
    _check_connectivity(connectivity)
    if threshold is not None and not 0 < threshold <= 1:
        raise ConfigError(f"`threshold` ({threshold}) must lie in (0, 1]")
    if not (math.isfinite(min_area_um2) and min_area_um2 >= 0):
        raise ConfigError(f"`min_area_um2` ({min_area_um2}) must be a number >= 0")
    nthreads = _default_threads(threads)
    path = Path(store_path)
    store = _open_store(path, label=label, writable=True)
    _check_class(store, class_id)
    if store.mpp is None:
        min_area_px = float(min_area_um2)
        logger.info("%s has no mpp: the minimum area %g is taken in px", path, min_area_um2)
    else:
        min_area_px = min_area_um2 / (store.mpp[0] * store.mpp[1])

    read = _foreground_reader(store, class_id, threshold)
    labels = label_chunked(
        read,
        store.image_shape,
        store.chunk_shape,
        connectivity=connectivity,
        min_area_px=min_area_px,
        threads=nthreads,
    )
    logger.info(
        "%s: %d instances of class %d (%d smaller than %.1f px removed)",
        path,
        labels.count,
        class_id,
        labels.removed,
        min_area_px,
    )

    if _label_state(path, label) != "missing" or label in store.label_names:
        _drop_label(path, label)
    store = OutputStore.open(path, mode="r+")  # fresh: no cached handle of the old label
    store.create_label(label, dtype="uint32")

    def write(box: Box) -> None:
        store.write_label_chunk(label, box, labels.relabel(box, read(box)))

    for _ in _ordered_map(write, store.chunk_boxes(), nthreads):
        pass
    store.finalize(threads=nthreads)
    return InstanceSummary(
        path=path,
        label=label,
        count=labels.count,
        removed=labels.removed,
        min_area_px=min_area_px,
        connectivity=connectivity,
        class_id=class_id,
        threshold=threshold,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# step 2: measurements


def _level0_per_px(store: OutputStore, downsample: float | None) -> tuple[float, float]:
    """(y, x) level-0 px per store px: ``downsample``, else attrs["level0_per_px"], else 1."""
    if downsample is not None:
        value: Any = downsample
        source = "`downsample`"
    else:
        attrs = store.attrs
        value = attrs.get("level0_per_px")
        source = f"the `level0_per_px` attribute of {store.path}"
        if value is None:
            if attrs.get("level", 0) not in (0, None):
                logger.warning(
                    "%s was made from level %s but records no level0_per_px; GeoJSON "
                    "coordinates are in that level's px (pass a downsample to fix)",
                    store.path,
                    attrs["level"],
                )
            return 1.0, 1.0
    pair = list(value) if isinstance(value, list | tuple) else [value, value]
    try:
        dy, dx = (float(v) for v in pair)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source} ({value!r}) must be a number or [y, x]") from exc
    if not (math.isfinite(dy) and math.isfinite(dx) and dy > 0 and dx > 0):
        raise ConfigError(f"{source} ({value!r}) must be positive")
    return dy, dx


@dataclass(frozen=True, slots=True, eq=False)
class InstanceTable:
    """Measurements of every instance of a label, one row per id, ids ascending.

    Pixel columns are in store px (numpy indices of the processed level, an index naming a
    pixel centre); see the module docstring for the µm and level-0 frames.
    """

    ids: np.ndarray
    """(N,) int64 instance ids present in the label."""
    area_px: np.ndarray
    """(N,) int64 pixel counts."""
    centroid_px: np.ndarray
    """(N, 2) float64 mean (row, column) index."""
    bbox_px: np.ndarray
    """(N, 4) int64 (y0, x0, y1, x1): rows y0..y1-1 and columns x0..x1-1 (half-open)."""
    mean_probability: np.ndarray
    """(N,) float64 mean probability of ``class_id`` over the instance, in [0, 1]."""
    class_id: int
    """The probability channel averaged."""
    mpp: tuple[float, float] | None
    """(y, x) µm per store px, or None when unknown."""
    level0_per_px: tuple[float, float]
    """(y, x) level-0 px per store px."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def area_um2(self) -> np.ndarray:
        """(N,) float64 areas in µm² (NaN when the mpp is unknown)."""
        if self.mpp is None:
            return np.full(len(self), np.nan)
        return self.area_px * (self.mpp[0] * self.mpp[1])

    @property
    def centroid_um(self) -> np.ndarray:
        """(N, 2) float64 (y, x) centroids in µm, ``index * mpp`` (NaN when unknown)."""
        if self.mpp is None:
            return np.full((len(self), 2), np.nan)
        return self.centroid_px * np.asarray(self.mpp)

    @property
    def centroid_level0(self) -> np.ndarray:
        """(N, 2) float64 (y, x) centroids in level-0 px, the GeoJSON/QuPath frame."""
        return (self.centroid_px + 0.5) * np.asarray(self.level0_per_px)

    def columns(self) -> dict[str, np.ndarray]:
        """The table as named columns, in file order."""
        um, l0 = self.centroid_um, self.centroid_level0
        return {
            "id": self.ids,
            "centroid_y_um": um[:, 0],
            "centroid_x_um": um[:, 1],
            "centroid_y_px": self.centroid_px[:, 0],
            "centroid_x_px": self.centroid_px[:, 1],
            "centroid_y_level0_px": l0[:, 0],
            "centroid_x_level0_px": l0[:, 1],
            "area_um2": self.area_um2,
            "area_px": self.area_px,
            "bbox_y0_px": self.bbox_px[:, 0],
            "bbox_x0_px": self.bbox_px[:, 1],
            "bbox_y1_px": self.bbox_px[:, 2],
            "bbox_x1_px": self.bbox_px[:, 3],
            "mean_probability": self.mean_probability,
        }


_FMT = {
    "id": "%d",
    "area_px": "%d",
    "bbox_y0_px": "%d",
    "bbox_x0_px": "%d",
    "bbox_y1_px": "%d",
    "bbox_x1_px": "%d",
    "area_um2": "%.4f",
    "mean_probability": "%.5f",
}


@dataclass(slots=True)
class _Sums:
    """Per-id accumulators, grown on demand (ids index them directly)."""

    count: np.ndarray
    sum_y: np.ndarray
    sum_x: np.ndarray
    sum_p: np.ndarray
    bbox: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Sums:
        bbox = np.empty((n, 4), dtype=np.int64)
        bbox[:, :2] = np.iinfo(np.int64).max
        bbox[:, 2:] = -1
        z = np.zeros(n)
        return cls(np.zeros(n, dtype=np.int64), z, z.copy(), z.copy(), bbox)

    def grow(self, needed: int) -> None:
        n = len(self.count)
        if needed <= n:
            return
        new = _Sums.empty(max(needed, 2 * n))
        new.count[:n], new.sum_y[:n], new.sum_x[:n] = self.count, self.sum_y, self.sum_x
        new.sum_p[:n], new.bbox[:n] = self.sum_p, self.bbox
        self.count, self.sum_y, self.sum_x = new.count, new.sum_y, new.sum_x
        self.sum_p, self.bbox = new.sum_p, new.bbox


def _chunk_sums(box: Box, ids: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Per-id sums over one chunk: (ids, count, sum_y, sum_x, sum_p, bbox) or None if empty."""
    rr, cc = np.nonzero(ids)
    if rr.size == 0:
        return None
    u, inv = np.unique(ids[rr, cc], return_inverse=True)
    count = np.bincount(inv, minlength=len(u))
    rr_g, cc_g = rr + box.y, cc + box.x
    sum_y = np.bincount(inv, weights=rr_g, minlength=len(u))
    sum_x = np.bincount(inv, weights=cc_g, minlength=len(u))
    sum_p = np.bincount(inv, weights=prob[rr, cc], minlength=len(u))
    bbox = np.empty((len(u), 4), dtype=np.int64)
    bbox[:, :2] = np.iinfo(np.int64).max
    bbox[:, 2:] = -1
    np.minimum.at(bbox[:, 0], inv, rr_g)
    np.minimum.at(bbox[:, 1], inv, cc_g)
    np.maximum.at(bbox[:, 2], inv, rr_g + 1)
    np.maximum.at(bbox[:, 3], inv, cc_g + 1)
    return u.astype(np.int64), count, sum_y, sum_x, sum_p, bbox


def measure_instances(
    store_path: str | os.PathLike[str],
    *,
    label: str = DEFAULT_LABEL,
    class_id: int = 1,
    downsample: float | None = None,
    threads: int | None = None,
) -> InstanceTable:
    """Per-instance area, centroid, bounding box and mean class probability, chunk by chunk.

    Each chunk's ids are reduced with :func:`numpy.unique` and :func:`numpy.bincount` and the
    sums are added into arrays indexed by id, so the cost is one pass over the label and the
    probabilities of ``class_id``, and memory is a few numbers per instance.

    Parameters
    ----------
    store_path : path-like
        A complete output store with ``labels/<label>``.
    label : str
        The instance label to measure.
    class_id : int
        Probability channel averaged into ``mean_probability``.
    downsample : float, optional
        Level-0 px per store px; see the module docstring for the default.
    threads : int, optional
        Chunks read in parallel (default: up to 4).
    """
    path = Path(store_path)
    store = _open_store(path, label=label, writable=False)
    _check_class(store, class_id)
    array = store.label(label)
    probs = store.probabilities
    scale = 255.0 if store.dtype == "uint8" else 1.0

    def reduce(box: Box) -> tuple[np.ndarray, ...] | None:
        ids = array[box.slices]
        if not ids.any():
            return None
        return _chunk_sums(box, ids, probs[(class_id, *box.slices)])

    sums = _Sums.empty(1024)
    for part in _ordered_map(reduce, store.chunk_boxes(), _default_threads(threads)):
        if part is None:
            continue
        u, count, sum_y, sum_x, sum_p, bbox = part
        sums.grow(int(u[-1]) + 1)
        sums.count[u] += count
        sums.sum_y[u] += sum_y
        sums.sum_x[u] += sum_x
        sums.sum_p[u] += sum_p
        sums.bbox[u, :2] = np.minimum(sums.bbox[u, :2], bbox[:, :2])
        sums.bbox[u, 2:] = np.maximum(sums.bbox[u, 2:], bbox[:, 2:])
    ids = np.flatnonzero(sums.count)
    count = sums.count[ids]
    return InstanceTable(
        ids=ids.astype(np.int64),
        area_px=count,
        centroid_px=np.stack([sums.sum_y[ids] / count, sums.sum_x[ids] / count], axis=1),
        bbox_px=sums.bbox[ids],
        mean_probability=sums.sum_p[ids] / count / scale,
        class_id=class_id,
        mpp=store.mpp,
        level0_per_px=_level0_per_px(store, downsample),
    )


def default_table_path(store_path: str | os.PathLike[str], label: str = DEFAULT_LABEL) -> Path:
    """The table beside the store: ``dir/OUT.zarr`` -> ``dir/OUT.<label>.csv``.

    >>> default_table_path("/data/slide1.zarr").as_posix()
    '/data/slide1.nuclei.csv'
    """
    path = Path(store_path)
    stem = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    return path.with_name(f"{stem}.{label}.csv")


def write_table(
    table: InstanceTable, path: str | os.PathLike[str], *, parquet: bool = True
) -> list[Path]:
    """Write ``table`` as CSV at ``path`` and, if ``parquet`` and ``pyarrow`` is importable,
    as Parquet beside it (``.parquet`` suffix). Returns the files written.

    Unknown µm values (no mpp) are written as ``nan``. Files appear complete or not at all
    (written to a temporary name, then renamed).
    """
    path = Path(path)
    columns = table.columns()
    names = list(columns)
    fmt = [_FMT.get(n, "%.3f") for n in names]
    written = []
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("w", newline="") as f:
            f.write(",".join(names) + "\n")
            block = 65536
            for s in range(0, len(table), block):
                rows = np.column_stack(
                    [np.asarray(columns[n][s : s + block], float) for n in names]
                )
                np.savetxt(f, rows, fmt=fmt, delimiter=",")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the table {path}: {exc}") from exc
    written.append(path)
    if parquet:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            logger.debug("pyarrow is not installed: no Parquet table")
        else:
            target = path.with_suffix(".parquet")
            pq.write_table(pa.table(columns), target)
            written.append(target)
    logger.info("wrote %d instances to %s", len(table), ", ".join(map(str, written)))
    return written


# ---------------------------------------------------------------------------------------------
# step 3: polygons and GeoJSON


def _import_shapely() -> Any:
    try:
        import shapely
    except ImportError as exc:
        raise ConfigError(
            "GeoJSON export needs shapely >= 2.0; install it with `pip install shapely`"
        ) from exc
    return shapely


def _largest_polygon(geom: shapely.Geometry) -> shapely.Polygon | None:
    shapely = _import_shapely()
    polygons = [g for g in shapely.get_parts(geom) if g.geom_type == "Polygon" and not g.is_empty]
    if not polygons and geom.geom_type == "GeometryCollection":
        polygons = [
            p
            for g in shapely.get_parts(geom)
            for p in shapely.get_parts(g)
            if p.geom_type == "Polygon" and not p.is_empty
        ]
    return max(polygons, key=lambda p: p.area) if polygons else None


def instance_polygon(
    mask: np.ndarray, *, origin: tuple[int, int] = (0, 0), simplify_px: float = SIMPLIFY_PX
) -> shapely.Polygon:
    """The outline of the pixels of ``mask`` as a valid polygon in (x, y) store px.

    Parameters
    ----------
    mask : (h, w) bool ndarray
        One instance, not empty; pixel ``(r, c)`` covers ``[c, c + 1] x [r, r + 1]``.
    origin : (y, x) tuple of int
        Where ``mask[0, 0]`` lies in the image; added to the coordinates.
    simplify_px : float
        Douglas-Peucker tolerance (topology preserving); 0 keeps the exact pixel outline,
        only dropping collinear vertices.

    Returns
    -------
    shapely.Polygon
        Valid, with holes if the instance has any, exterior counter-clockwise in (x, y)
        numbers. If the pixels form several polygons (pieces touching only at corners,
        possible for 8-connected instances) the largest is returned.

    Examples
    --------
    >>> m = np.ones((2, 3), bool)
    >>> instance_polygon(m, origin=(10, 20)).wkt
    'POLYGON ((23 10, 23 12, 20 12, 20 10, 23 10))'
    >>> ring = np.ones((3, 3), bool)
    >>> ring[1, 1] = False
    >>> p = instance_polygon(ring, simplify_px=0)
    >>> p.area, len(p.interiors)
    (8.0, 1)
    """
    shapely = _import_shapely()
    from shapely.geometry.polygon import orient

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ConfigError(f"`mask` must be a 2-D array with some pixels set, got {mask.shape}")
    y0, x0 = origin
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, stops = np.nonzero(step == -1)  # same raster order: one stop per start
    h = mask.shape[0]
    simple = (
        np.array_equal(rows, np.arange(h))  # exactly one run in every row
        and bool(np.all(starts[1:] < stops[:-1]))
        and bool(np.all(starts[:-1] < stops[1:]))
    )
    ys, xs0, xs1 = rows + y0, starts + x0, stops + x0
    if simple:
        # One run per row, overlapping its neighbours: walk down the right ends, up the left.
        right = np.empty((2 * h, 2), dtype=np.float64)
        right[0::2, 0], right[0::2, 1] = xs1, ys
        right[1::2, 0], right[1::2, 1] = xs1, ys + 1
        left = np.empty((2 * h, 2), dtype=np.float64)
        left[0::2, 0], left[0::2, 1] = xs0, ys
        left[1::2, 0], left[1::2, 1] = xs0, ys + 1
        geom = shapely.Polygon(np.concatenate([right, left[::-1]]))  # simple by construction
    else:
        geom = shapely.union_all(shapely.box(xs0, ys, xs1, ys + 1))  # valid by construction
    exact = _largest_polygon(geom)
    if exact is None:
        raise StoreError(f"no polygon found for a mask of {int(mask.sum())} px at {origin}")
    if geom.geom_type != "Polygon":
        logger.debug("instance at %s has %s; keeping the largest polygon", origin, geom.geom_type)
    out = exact.simplify(simplify_px, preserve_topology=True)
    if not out.is_valid:
        out = _largest_polygon(shapely.make_valid(out))
    if out is None or out.is_empty:
        out = exact
    return orient(out, sign=1.0)


def _read_region(array: zarr.Array, box: Box) -> np.ndarray:
    """Read one region of the label (a seam for tests that count reads)."""
    return array[box.slices]


def _rings(polygon: shapely.Polygon, scale: tuple[float, float]) -> list[list[list[float]]]:
    dy, dx = scale
    rings = []
    for ring in (polygon.exterior, *polygon.interiors):
        xy = np.asarray(ring.coords, dtype=np.float64) * (dx, dy)
        rings.append(np.round(xy, _COORD_DECIMALS).tolist())
    return rings


def iter_features(
    store_path: str | os.PathLike[str],
    *,
    label: str = DEFAULT_LABEL,
    table: InstanceTable | None = None,
    class_id: int = 1,
    downsample: float | None = None,
    classification: str = "Nucleus",
    colour: tuple[int, int, int] | None = None,
    simplify_px: float = SIMPLIFY_PX,
    threads: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one QuPath detection ``Feature`` per instance, lazily.

    Instances are grouped by the chunk that holds their bounding box's top-left pixel; each
    group's region (that chunk, extended right and down to the group's furthest bounding-box
    edge) is read once and the group's polygons are cut from it. Groups are processed by
    ``threads`` threads with at most ``2 * threads`` groups pending, so memory is a few chunks
    plus the largest instance's overhang; features come out in chunk raster order of their
    group, then by id.

    Parameters
    ----------
    store_path : path-like
        A complete output store with ``labels/<label>``.
    label : str
        The instance label.
    table : InstanceTable, optional
        Its measurements (from :func:`measure_instances`); measured here when omitted.
    class_id : int
        The class measured (when ``table`` is omitted) and whose colour is used by default.
    downsample : float, optional
        Level-0 px per store px (overrides ``table.level0_per_px``); see the module docstring.
    classification : str
        QuPath class name of every feature.
    colour : (r, g, b), optional
        Class colour; default: the store's colour of ``class_id``.
    simplify_px : float
        Polygon simplification tolerance in store px.
    threads : int, optional
        Groups processed in parallel (default: up to 4).

    Yields
    ------
    dict
        ``{"type": "Feature", "geometry": {"type": "Polygon", ...}, "properties":
        {"objectType": "detection", "classification": {"name", "color"}, "measurements":
        {...}}}`` with coordinates ``[x, y]`` in level-0 px.
    """
    path = Path(store_path)
    store = _open_store(path, label=label, writable=False)
    if table is None:
        table = measure_instances(path, label=label, class_id=class_id, downsample=downsample)
    scale = table.level0_per_px if downsample is None else _level0_per_px(store, downsample)
    if colour is None:
        _check_class(store, class_id)
        colour = store.classes.colours[class_id][:3]
    classification_json = {"name": str(classification), "color": [int(v) for v in colour[:3]]}
    array = store.label(label)
    area_um2 = table.area_um2
    cy, cx = store.chunk_shape
    gy, gx = table.bbox_px[:, 0] // cy, table.bbox_px[:, 1] // cx
    order = np.lexsort((table.ids, gx, gy))
    group = gy[order] * (int(gx.max(initial=0)) + 1) + gx[order]
    bounds = np.flatnonzero(np.diff(group)) + 1

    def group_features(idx: np.ndarray) -> list[dict[str, Any]]:
        ry, rx = int(gy[idx[0]]) * cy, int(gx[idx[0]]) * cx
        ry1, rx1 = int(table.bbox_px[idx, 2].max()), int(table.bbox_px[idx, 3].max())
        region = _read_region(array, Box(ry, rx, ry1 - ry, rx1 - rx))
        features = []
        for k in idx:
            y0, x0, y1, x1 = (int(v) for v in table.bbox_px[k])
            instance = int(table.ids[k])
            mask = region[y0 - ry : y1 - ry, x0 - rx : x1 - rx] == instance
            polygon = instance_polygon(mask, origin=(y0, x0), simplify_px=simplify_px)
            measurements: dict[str, float] = {
                "id": instance,
                "area_px": int(table.area_px[k]),
                "mean_probability": round(float(table.mean_probability[k]), 5),
            }
            if table.mpp is not None:
                measurements["area_um2"] = round(float(area_um2[k]), 4)
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": _rings(polygon, scale)},
                    "properties": {
                        "objectType": "detection",
                        "classification": classification_json,
                        "measurements": measurements,
                    },
                }
            )
        return features

    groups = np.split(order, bounds) if len(order) else []
    for features in _ordered_map(group_features, groups, _default_threads(threads)):
        yield from features


def export_geojson(
    store_path: str | os.PathLike[str],
    geojson_path: str | os.PathLike[str],
    *,
    label: str = DEFAULT_LABEL,
    downsample: float | None = None,
    classification: str = "Nucleus",
    class_id: int = 1,
    colour: tuple[int, int, int] | None = None,
    table: InstanceTable | None = None,
    simplify_px: float = SIMPLIFY_PX,
    threads: int | None = None,
) -> int:
    """Stream the instances of ``labels/<label>`` to a GeoJSON FeatureCollection for QuPath.

    Features come from :func:`iter_features` and are written one ``json.dumps`` at a time;
    the collection is never held in memory. The file is written under a temporary name and
    renamed when complete. Arguments are those of :func:`iter_features`.

    Returns
    -------
    int
        Number of features written, one per instance.
    """
    path = Path(geojson_path)
    features = iter_features(
        store_path,
        label=label,
        table=table,
        class_id=class_id,
        downsample=downsample,
        classification=classification,
        colour=colour,
        simplify_px=simplify_px,
        threads=threads,
    )
    tmp = path.with_name(path.name + ".partial")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [')
            for feature in features:
                f.write(",\n" if n else "\n")
                f.write(json.dumps(feature, separators=(",", ":"), allow_nan=False))
                n += 1
            f.write("\n]}\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %d features to %s", n, path)
    return n


# ---------------------------------------------------------------------------------------------
# everything at once


@dataclass(frozen=True, slots=True)
class PostprocessResult:
    """What :func:`postprocess_output` did."""

    instances: int
    """Number of instances in ``labels/<label>``."""
    computed: InstanceSummary | None
    """The labelling summary when the label was (re)computed, None when it was reused."""
    tables: tuple[Path, ...]
    """Table files written (CSV, and Parquet when pyarrow is importable)."""
    geojson: Path | None
    """The GeoJSON written, if any."""


def postprocess_output(
    store_path: str | os.PathLike[str],
    *,
    geojson: str | os.PathLike[str] | None = None,
    table: str | os.PathLike[str] | None = None,
    instances: bool | None = None,
    class_id: int = 1,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    threshold: float | None = None,
    connectivity: int = 4,
    downsample: float | None = None,
    classification: str = "Nucleus",
    label: str = DEFAULT_LABEL,
    threads: int | None = None,
) -> PostprocessResult:
    """Instances, table and (optionally) GeoJSON of a finished output store.

    Parameters
    ----------
    store_path : path-like
        The output store of a finished run.
    geojson : path-like, optional
        Where to write the GeoJSON; none is written when omitted.
    table : path-like, optional
        Where to write the CSV table; default :func:`default_table_path` (beside the store).
    instances : bool, optional
        True: recompute ``labels/<label>``; False: require an existing one; None: compute it
        only when missing (or left unfinished).
    class_id, min_area_um2, threshold, connectivity, label, threads
        As for :func:`label_instances` (``class_id`` is also the probability measured).
    downsample, classification
        As for :func:`export_geojson`.

    Raises
    ------
    StoreError
        The store is missing or incomplete, or an output cannot be written.
    ConfigError
        An argument is invalid, or ``instances=False`` and the label does not exist.
    """
    path = Path(store_path)
    _open_store(path, label=label, writable=instances is not False)
    state = _label_state(path, label)
    if instances is False and state != "final":
        raise ConfigError(
            f"{path} has no finished labels/{label}; drop --no-instances to compute it"
        )
    summary = None
    if instances or state != "final":
        summary = label_instances(
            path,
            class_id=class_id,
            min_area_um2=min_area_um2,
            threshold=threshold,
            connectivity=connectivity,
            label=label,
            threads=threads,
        )
    measured = measure_instances(
        path, label=label, class_id=class_id, downsample=downsample, threads=threads
    )
    tables = write_table(measured, table if table is not None else default_table_path(path, label))
    written = None
    if geojson is not None:
        export_geojson(
            path,
            geojson,
            label=label,
            downsample=downsample,
            classification=classification,
            class_id=class_id,
            table=measured,
            threads=threads,
        )
        written = Path(geojson)
    return PostprocessResult(
        instances=len(measured), computed=summary, tables=tuple(tables), geojson=written
    )
