"""Step 1: instance ids from the stitched class map (or a probability threshold), written as
``labels/nuclei`` chunk by chunk."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilesegment.geometry import Box
from tilesegment.postprocess.common import (
    InstanceOptions,
    check_class,
    default_threads,
    foreground_reader,
    min_area_px,
    open_finished,
    ordered_map,
)
from tilesegment.postprocess.label import label_chunked
from tilesegment.store import OutputStore

logger = logging.getLogger(__name__)


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
    store_path: str | os.PathLike[str], options: InstanceOptions | None = None
) -> InstanceSummary:
    """Write the instances of ``options.class_id`` as ``labels/<options.label>`` (uint32) and
    finalise the store.

    Parameters
    ----------
    store_path : path-like
        A complete output store (see the module docstring for the lifecycle).
    options : InstanceOptions, optional
        Class, minimum area, threshold, connectivity, label name, threads (defaults if None).

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
    opts = options or InstanceOptions()
    class_id, min_area_um2, threshold = opts.class_id, opts.min_area_um2, opts.threshold
    connectivity, label, threads = opts.connectivity, opts.label, opts.threads
    nthreads = default_threads(threads)
    path = Path(store_path)
    store = open_finished(path, label=label, writable=True)
    check_class(store, class_id)
    min_area = min_area_px(min_area_um2, store.mpp)
    if store.mpp is None:
        logger.info("%s has no mpp: the minimum area %g is taken in px", path, min_area_um2)

    read = foreground_reader(store, class_id, threshold)
    labels = label_chunked(
        read,
        store.image_shape,
        store.chunk_shape,
        connectivity=connectivity,
        min_area_px=min_area,
        threads=nthreads,
    )
    logger.info(
        "%s: %d instances of class %d (%d smaller than %.1f px removed)",
        path,
        labels.count,
        class_id,
        labels.removed,
        min_area,
    )

    if store.label_state(label) != "missing" or label in store.label_names:
        store.delete_label(label)
    store = OutputStore.open(path, mode="r+")  # fresh: no cached handle of the old label
    store.create_label(label, dtype="uint32")

    def write(box: Box) -> None:
        store.write_label_chunk(label, box, labels.relabel(box, read(box)))

    for _ in ordered_map(write, store.chunk_boxes(), nthreads):
        pass
    store.finalize(threads=nthreads)
    return InstanceSummary(
        path=path,
        label=label,
        count=labels.count,
        removed=labels.removed,
        min_area_px=min_area,
        connectivity=connectivity,
        class_id=class_id,
        threshold=threshold,
        seconds=time.perf_counter() - start,
    )


def instance_ids(
    mask: np.ndarray, mpp: float | None = None, options: InstanceOptions | None = None
) -> tuple[np.ndarray, int]:
    """Instance ids of an in-memory class map, as :func:`label_instances` makes them from a
    store: foreground ``mask == options.class_id``, ``options.connectivity``, components
    smaller than ``options.min_area_um2`` removed, ids 1..N in raster order of first pixels.

    Parameters
    ----------
    mask : (H, W) integer ndarray
        Class ids.
    mpp : float, optional
        µm/px of ``mask``; None takes the minimum area in px.
    options : InstanceOptions, optional
        ``threshold``, ``label`` and ``threads`` do not apply.

    Returns
    -------
    ids : (H, W) uint32 ndarray
    count : int
        N.

    >>> ids, n = instance_ids(np.array([[1, 1, 0, 1]]), options=InstanceOptions(min_area_um2=0))
    >>> ids.tolist(), n
    ([[1, 1, 0, 2]], 2)
    """
    opts = options or InstanceOptions()
    foreground = np.asarray(mask) == opts.class_id
    shape = foreground.shape
    labels = label_chunked(
        lambda box: foreground[box.slices],
        shape,
        shape,  # one chunk: the result does not depend on the chunk shape
        connectivity=opts.connectivity,
        min_area_px=min_area_px(opts.min_area_um2, None if mpp is None else (mpp, mpp)),
        threads=1,
    )
    return labels.relabel(Box(0, 0, *shape), foreground), labels.count
