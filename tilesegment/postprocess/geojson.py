"""Step 3: one polygon per instance and a GeoJSON FeatureCollection in QuPath's form, streamed
feature by feature."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.postprocess.common import (
    DEFAULT_LABEL,
    check_class,
    default_threads,
    level0_per_px,
    open_finished,
    ordered_map,
)
from tilesegment.postprocess.measure import InstanceTable, measure_instances

if TYPE_CHECKING:
    import shapely

logger = logging.getLogger(__name__)

#: Default Douglas-Peucker tolerance of GeoJSON polygons, in store px.
SIMPLIFY_PX = 0.5
_COORD_DECIMALS = 3


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
    store = open_finished(path, label=label, writable=False)
    if table is None:
        table = measure_instances(path, label=label, class_id=class_id, downsample=downsample)
    scale = table.level0_per_px if downsample is None else level0_per_px(store, downsample)
    if colour is None:
        check_class(store, class_id)
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
    for features in ordered_map(group_features, groups, default_threads(threads)):
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
