"""The output: an NGFF 0.4 (OME-Zarr) group written chunk by chunk, and the run state beside it.

:mod:`~tilesegment.store.layout` names every key, file and attribute; :mod:`~tilesegment.store.
output` is the :class:`OutputStore`; :mod:`~tilesegment.store.ngff` the metadata and pyramids;
:mod:`~tilesegment.store.resume` the run lock, parameters and done log that make a run resumable.
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
