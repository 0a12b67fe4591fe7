"""Nucleus instances, per-instance measurements and QuPath GeoJSON from a finished output store.

Three steps, each reading the store chunk by chunk so that memory never holds the whole image:

1. :func:`label_instances` turns the stitched class map ``labels/mask`` (or a probability
   threshold) into instance ids and writes them as ``labels/nuclei`` (uint32): the connected
   components of one class, or, when the store's model declares a nucleus interior and a
   nucleus boundary class (its ``instances`` attribute), the interior seeds grown into the
   nucleus region by at most ``max_growth_px`` (:mod:`tilesegment.postprocess.seeded`).
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
Touching nuclei
    Components are not split further: a watershed with unbounded reach would need context
    from arbitrarily far across chunk borders. A model with interior and boundary classes
    separates touching nuclei instead: seeded growth reaches at most ``max_growth_px``, so a
    chunk widened by a fixed halo fixes its instances (:mod:`~tilesegment.postprocess.seeded`).
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

import os
from dataclasses import dataclass
from pathlib import Path

from tilesegment.errors import ConfigError
from tilesegment.postprocess.common import (
    DEFAULT_LABEL,
    DEFAULT_MIN_AREA_UM2,
    InstanceOptions,
    open_finished,
)
from tilesegment.postprocess.geojson import export_geojson, instance_polygon, iter_features
from tilesegment.postprocess.instances import InstanceSummary, instance_ids, label_instances
from tilesegment.postprocess.label import ChunkedLabels, label_chunked
from tilesegment.postprocess.measure import (
    InstanceTable,
    default_table_path,
    measure_instances,
    write_table,
)
from tilesegment.postprocess.seeded import SeededLabels, label_seeded, seeded_instances

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_MIN_AREA_UM2",
    "ChunkedLabels",
    "InstanceOptions",
    "InstanceSummary",
    "InstanceTable",
    "PostprocessResult",
    "SeededLabels",
    "default_table_path",
    "export_geojson",
    "instance_ids",
    "instance_polygon",
    "iter_features",
    "label_chunked",
    "label_instances",
    "label_seeded",
    "measure_instances",
    "postprocess_output",
    "seeded_instances",
    "write_table",
]


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
    options: InstanceOptions | None = None,
    *,
    geojson: str | os.PathLike[str] | None = None,
    table: str | os.PathLike[str] | None = None,
    instances: bool | None = None,
    downsample: float | None = None,
    classification: str = "Nucleus",
) -> PostprocessResult:
    """Instances, table and (optionally) GeoJSON of a finished output store.

    Parameters
    ----------
    store_path : path-like
        The output store of a finished run.
    options : InstanceOptions, optional
        How instances are made (see :func:`label_instances`); ``class_id`` is also the
        probability measured.
    geojson : path-like, optional
        Where to write the GeoJSON; none is written when omitted.
    table : path-like, optional
        Where to write the CSV table; default :func:`default_table_path` (beside the store).
    instances : bool, optional
        True: recompute ``labels/<label>``; False: require an existing one; None: compute it
        only when missing (or left unfinished).
    downsample, classification
        As for :func:`export_geojson`.

    Raises
    ------
    StoreError
        The store is missing or incomplete, or an output cannot be written.
    ConfigError
        An argument is invalid, or ``instances=False`` and the label does not exist.
    """
    opts = options or InstanceOptions()
    label, class_id, threads = opts.label, opts.class_id, opts.threads
    path = Path(store_path)
    store = open_finished(path, label=label, writable=instances is not False)
    state = store.label_state(label)
    if instances is False and state != "final":
        raise ConfigError(
            f"{path} has no finished labels/{label}; drop --no-instances to compute it"
        )
    summary = None
    if instances or state != "final":
        summary = label_instances(path, opts)
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
