"""The output: an OME-Zarr group (NGFF 0.4 in Zarr v2, or NGFF 0.5 in sharded Zarr v3) written
chunk by chunk (or shard by shard), and the run state beside it.

:mod:`~tilesegment.store.layout` names every key, file and attribute; :mod:`~tilesegment.store.
output` is the :class:`OutputStore`; :mod:`~tilesegment.store.ngff` the metadata of both NGFF
versions; :mod:`~tilesegment.store.levels` the pyramids; :mod:`~tilesegment.store.shards` the
whole-shard writes of NGFF 0.5; :mod:`~tilesegment.store.resume` the run lock, parameters and
done log that make a run resumable.
"""

from __future__ import annotations

from tilesegment.store.arrays import class_map, quantise
from tilesegment.store.ngff import PYRAMID_MAX_PX, ClassSpec, pyramid_shapes
from tilesegment.store.output import OutputStore, is_complete

__all__ = [
    "PYRAMID_MAX_PX",
    "ClassSpec",
    "OutputStore",
    "class_map",
    "is_complete",
    "pyramid_shapes",
    "quantise",
]
