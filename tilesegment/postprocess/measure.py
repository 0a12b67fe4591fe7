"""Step 2: per-instance measurements accumulated chunk by chunk, and the CSV (or Parquet) table
beside the store."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilesegment.errors import StoreError
from tilesegment.geometry import Box
from tilesegment.postprocess.common import (
    DEFAULT_LABEL,
    check_class,
    default_threads,
    level0_per_px,
    open_finished,
    ordered_map,
)
from tilesegment.store.layout import sidecar_path

logger = logging.getLogger(__name__)


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
    store = open_finished(path, label=label, writable=False)
    check_class(store, class_id)
    array = store.label(label)
    probs = store.probabilities
    scale = 255.0 if store.dtype == "uint8" else 1.0

    def reduce(box: Box) -> tuple[np.ndarray, ...] | None:
        ids = array[box.slices]
        if not ids.any():
            return None
        return _chunk_sums(box, ids, probs[(class_id, *box.slices)])

    sums = _Sums.empty(1024)
    for part in ordered_map(reduce, store.chunk_boxes(), default_threads(threads)):
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
        level0_per_px=level0_per_px(store, downsample),
    )


def default_table_path(store_path: str | os.PathLike[str], label: str = DEFAULT_LABEL) -> Path:
    """The table beside the store: ``dir/OUT.zarr`` -> ``dir/OUT.<label>.csv``.

    >>> default_table_path("/data/slide1.zarr").as_posix()
    '/data/slide1.nuclei.csv'
    """
    return sidecar_path(store_path, f"{label}.csv")


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
