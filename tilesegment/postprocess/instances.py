"""Step 1: instance ids from the stitched class map (or a probability threshold), written as
``labels/nuclei`` chunk by chunk: connected components of one class
(:mod:`~tilesegment.postprocess.label`), or interior seeds grown into the nucleus region when
the store's model declares interior and boundary classes
(:mod:`~tilesegment.postprocess.seeded`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilesegment.errors import ConfigError, ModelError, StoreError
from tilesegment.geometry import Box
from tilesegment.instances import InstanceSpec
from tilesegment.postprocess.common import (
    InstanceOptions,
    check_class,
    default_threads,
    foreground_reader,
    min_area_px,
    open_finished,
)
from tilesegment.postprocess.label import ChunkedLabels, label_chunked
from tilesegment.postprocess.seeded import label_seeded, seeded_instances
from tilesegment.store import OutputStore
from tilesegment.store.shards import write_chunks

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
    method: str = "components"
    """``components`` or ``seeded``."""
    seeded: InstanceSpec | None = None
    """Classes and growth limits of seeded instances, None for components."""


def seeded_spec(store: OutputStore, options: InstanceOptions) -> InstanceSpec | None:
    """The interior/boundary classes to grow instances from, or None for connected components.

    Read from the store's ``instances`` attribute (written by a run with a model that declares
    them), according to ``options.method``.
    """
    declared = store.attrs.get("instances")
    if options.method == "components":
        return None
    if declared is None:
        if options.method == "seeded":
            raise ConfigError(
                f"{store.path} was made by a model without interior/boundary classes (no "
                "`instances` in its model config); use --method components"
            )
        return None
    try:
        spec = InstanceSpec.from_json(declared, source=f"{store.path} attribute")
    except ModelError as exc:
        raise StoreError(f"{exc}; re-run the slide to rewrite it") from exc
    if max(spec.interior, spec.boundary) >= len(store.classes):
        raise StoreError(
            f"{store.path}: `instances` {declared} name a class beyond its "
            f"{len(store.classes)} classes; re-run the slide to rewrite it"
        )
    if options.threshold is not None or options.connectivity != 4:
        raise ConfigError(
            f"{store.path} holds seeded instances (interior class {spec.interior}, boundary "
            f"class {spec.boundary}); --threshold and --connectivity 8 need --method components"
        )
    return spec


def _labeller(
    store: OutputStore, opts: InstanceOptions, min_area: float, nthreads: int
) -> tuple[ChunkedLabels, Callable[[Box], np.ndarray], str, InstanceSpec | None]:
    """Scan the store: (the joined labels, a chunk's final ids, what was labelled, the seeded
    spec or None)."""
    class_id, threshold, connectivity = opts.class_id, opts.threshold, opts.connectivity
    spec = seeded_spec(store, opts)
    relabel: Callable[[Box], np.ndarray]
    if spec is None:
        read = foreground_reader(store, class_id, threshold)
        labels = label_chunked(
            read,
            store.image_shape,
            store.chunk_shape,
            connectivity=connectivity,
            min_area_px=min_area,
            threads=nthreads,
        )
        what = f"class {class_id}"

        def relabel(box: Box) -> np.ndarray:
            return labels.relabel(box, read(box))

    else:
        mask = store.mask
        seeded = label_seeded(
            lambda box: mask[box.slices],
            store.image_shape,
            store.chunk_shape,
            spec,
            min_area_px=min_area,
            threads=nthreads,
        )
        labels, relabel = seeded.labels, seeded.relabel
        what = (
            f"interior class {spec.interior} grown <= {spec.max_growth_px} px into boundary "
            f"class {spec.boundary}"
        )
    return labels, relabel, what, spec


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

    labels, relabel, what, spec = _labeller(store, opts, min_area, nthreads)
    logger.info(
        "%s: %d instances of %s (%d smaller than %.1f px removed)",
        path,
        labels.count,
        what,
        labels.removed,
        min_area,
    )

    if store.label_state(label) != "missing" or label in store.label_names:
        store.delete_label(label)
    store = OutputStore.open(path, mode="r+")  # fresh: no cached handle of the old label
    store.create_label(label, dtype="uint32")

    # Chunks in parallel; a sharded store one whole shard at a time (see store.shards).
    write_chunks(
        store.label(label), lambda box: store.label_values(label, box, relabel(box)), nthreads
    )
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
        method="components" if spec is None else "seeded",
        seeded=spec,
    )


def instance_ids(
    mask: np.ndarray,
    mpp: float | None = None,
    options: InstanceOptions | None = None,
    *,
    seeded: InstanceSpec | None = None,
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
    seeded : InstanceSpec, optional
        The model's interior/boundary declaration: instances are then its seeds grown into
        the nucleus region (:func:`~tilesegment.postprocess.seeded.seeded_instances`, what
        :func:`label_instances` computes chunk by chunk), not components of ``class_id``.

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
    min_area = min_area_px(opts.min_area_um2, None if mpp is None else (mpp, mpp))
    if seeded is not None:
        ids = seeded_instances(np.asarray(mask), seeded, min_area_px=min_area)
        return ids, int(ids.max(initial=0))
    foreground = np.asarray(mask) == opts.class_id
    shape = foreground.shape
    labels = label_chunked(
        lambda box: foreground[box.slices],
        shape,
        shape,  # one chunk: the result does not depend on the chunk shape
        connectivity=opts.connectivity,
        min_area_px=min_area,
        threads=1,
    )
    return labels.relabel(Box(0, 0, *shape), foreground), labels.count
