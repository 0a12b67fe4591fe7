"""Zarr arrays (v2 or v3) and OME-Zarr multiscale images as slides.

Two shapes of input are accepted:

- a Zarr *array* of shape (Y, X) or (Y, X, C), C in {1, 2, 3, 4} (gray, gray+alpha, RGB, RGBA):
  one level, no mpp;
- an OME-Zarr (NGFF 0.1-0.5) *group* with ``multiscales`` metadata: levels are its
  ``datasets``, axes come from ``axes`` (or are ``tczyx`` for versions without them), and mpp
  from the level-0 ``scale`` transform when the y/x axes carry a length unit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from tilesegment.io.base import SlideInfo
from tilesegment.io.common import (
    DECODE_ERRORS,
    PROBE_MAX_BYTES,
    UM_PER_UNIT,
    ArrayLevelsReader,
    PixelLayout,
    describe,
    first_plane_warning,
    make_info,
    slide_error,
)

logger = logging.getLogger(__name__)

__all__ = ["ZarrReader", "is_zarr_directory"]

_SUPPORTED_DTYPES = (np.uint8, np.uint16, np.bool_)
_METADATA_FILES = (".zarray", ".zgroup", "zarr.json")


def is_zarr_directory(path: Path) -> bool:
    """Whether ``path`` is a directory holding Zarr v2 or v3 metadata at its root."""
    return path.is_dir() and any((path / name).is_file() for name in _METADATA_FILES)


def _multiscales(attrs: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The ``multiscales`` list of NGFF <= 0.4 (top level) or 0.5 (under ``"ome"``)."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        return list(ome["multiscales"])
    if "multiscales" in attrs:
        return list(attrs["multiscales"])
    return None


def _axis_names(axes: Sequence[Any] | None, ndim: int) -> tuple[list[str], list[str | None]]:
    """Lower-case axis names and units; NGFF < 0.3 has no ``axes`` and is always 5-D tczyx."""
    if axes is None:
        if ndim != 5:
            msg = f"multiscales without 'axes' must be 5-D (t, c, z, y, x), arrays are {ndim}-D"
            raise ValueError(msg)
        return list("tczyx"), [None] * 5
    names: list[str] = []
    units: list[str | None] = []
    for axis in axes:
        if isinstance(axis, Mapping):
            names.append(str(axis["name"]).lower())
            units.append(axis.get("unit"))
        else:
            names.append(str(axis).lower())
            units.append(None)
    return names, units


def _scale(transforms: Sequence[Mapping[str, Any]] | None, ndim: int) -> np.ndarray:
    """Product of the ``scale`` transforms in ``transforms`` (ones when there is none)."""
    scale = np.ones(ndim)
    for transform in transforms or ():
        if transform.get("type") == "scale" and "scale" in transform:
            scale = scale * np.asarray(transform["scale"], dtype=float)
    return scale


class ZarrReader(ArrayLevelsReader):
    """A :class:`~tilesegment.io.base.SlideReader` over a Zarr array or OME-Zarr image.

    Parameters
    ----------
    path : Path
        Directory of a Zarr v2/v3 array or of an OME-Zarr multiscale group.
    probe : bool
        Decode the top-left chunk of level 0 while opening (skipped for chunks over 64 MiB),
        so a missing codec fails in :func:`~tilesegment.io.open_slide`.

    Notes
    -----
    Samples: 1 channel is gray, 3 RGB, a 2nd/4th channel is alpha (composited on white). For
    OME-Zarr only a channel axis of size 1, 3 or 4 is read as samples; otherwise, and for
    t/z axes, the first plane is read (warned). uint16 is scaled by 255/65535 (warned).
    mpp: level-0 ``scale`` of y and x (dataset transform times multiscale transform) when the
    axes' unit is a length unit (micrometer, nanometer, millimeter...); otherwise None.

    Lifecycle: Zarr holds no open file between reads; :meth:`close` is a no-op kept for the
    protocol. Thread-safety: reads are thread-safe (each calling thread's reads run on an event
    loop of its own, see :mod:`tilesegment.io.aio`; local files are opened per chunk).
    Picklability: not picklable by contract.
    """

    backend = "zarr"

    def __init__(self, path: Path, *, probe: bool = True) -> None:
        self.path = Path(path)
        try:
            node = zarr.open(store=str(self.path), mode="r")
        except DECODE_ERRORS as exc:
            raise slide_error(
                self.path,
                f"zarr cannot open it ({describe(exc)})",
                "check that the directory is a complete Zarr array or OME-Zarr image",
            ) from exc
        try:
            if isinstance(node, zarr.Array):
                arrays, layout, mpp, vendor = self._from_array(node)
            else:
                arrays, layout, mpp, vendor = self._from_group(node)
        except (KeyError, TypeError, ValueError) as exc:
            raise slide_error(
                self.path,
                f"malformed OME-Zarr metadata ({describe(exc)})",
                "the 'multiscales' attributes must follow NGFF (axes, datasets with paths)",
            ) from exc
        self._arrays = arrays
        self._layout = layout
        y_axis, x_axis = layout.axes.index("Y"), layout.axes.index("X")
        dtype = arrays[0].dtype
        if dtype.type not in _SUPPORTED_DTYPES:
            raise slide_error(
                self.path,
                f"unsupported sample type {dtype}",
                "store the image as uint8 (or uint16) samples",
            )
        if dtype == np.uint16:
            logger.warning(
                "%s: 16-bit samples are scaled to 8 bits (value * 255 / 65535)", self.path
            )
        self.info: SlideInfo = make_info(
            self.path,
            backend=self.backend,
            vendor=vendor,
            level_shapes=[(a.shape[y_axis], a.shape[x_axis]) for a in arrays],
            channels=layout.channels,
            mpp=mpp,
            properties={
                "zarr.format": str(arrays[0].metadata.zarr_format),
                "zarr.axes": "".join(layout.axes).lower(),
                "zarr.dtype": str(dtype),
            },
        )
        if probe:
            self._probe()

    def _from_array(
        self, array: zarr.Array
    ) -> tuple[list[zarr.Array], PixelLayout, tuple[float, float] | None, str]:
        if array.ndim == 2:
            axes: tuple[str, ...] = ("Y", "X")
        elif array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
            axes = ("Y", "X", "C")
        else:
            raise slide_error(
                self.path,
                f"Zarr array of shape {array.shape} is not (Y, X) or (Y, X, C) with C <= 4",
                "store the image as (height, width[, channels]) or as OME-Zarr with axes",
            )
        samples = array.shape[2] if array.ndim == 3 else 1
        return [array], self._layout(axes, "C" if array.ndim == 3 else None, samples), None, "zarr"

    def _from_group(
        self, group: zarr.Group
    ) -> tuple[list[zarr.Array], PixelLayout, tuple[float, float] | None, str]:
        attrs = group.attrs.asdict()
        multiscales = _multiscales(attrs)
        if not multiscales:
            raise slide_error(
                self.path,
                "Zarr group without OME-Zarr 'multiscales' metadata",
                "pass the path of an array inside the group, or write NGFF multiscales",
            )
        image = multiscales[0]
        datasets = image["datasets"]
        arrays = []
        for dataset in datasets:
            node = group[str(dataset["path"])]
            if not isinstance(node, zarr.Array):
                msg = f"dataset {dataset['path']!r} is not an array"
                raise TypeError(msg)
            arrays.append(node)
        if not arrays:
            msg = "'multiscales' has no datasets"
            raise ValueError(msg)
        ndim = arrays[0].ndim
        names, units = _axis_names(image.get("axes"), ndim)
        if len(names) != ndim or any(a.ndim != ndim for a in arrays):
            msg = f"axes {names} do not match the arrays' dimensions {[a.ndim for a in arrays]}"
            raise ValueError(msg)
        if "y" not in names or "x" not in names:
            msg = f"axes {names} have no 'y' and 'x'"
            raise ValueError(msg)
        sizes = dict(zip(names, arrays[0].shape, strict=True))
        channel = next(
            (
                name
                for name, axis in zip(names, image.get("axes") or names, strict=True)
                if name == "c" or (isinstance(axis, Mapping) and axis.get("type") == "channel")
            ),
            None,
        )
        sample_axis = channel if channel is not None and sizes[channel] in (1, 3, 4) else None
        first_plane_warning(
            self.path, {n: s for n, s in sizes.items() if n not in ("y", "x", sample_axis)}
        )
        axes = tuple(name.upper() for name in names)
        samples = sizes[sample_axis] if sample_axis else 1
        layout = self._layout(axes, sample_axis.upper() if sample_axis else None, samples)
        scale = _scale(datasets[0].get("coordinateTransformations"), ndim) * _scale(
            image.get("coordinateTransformations"), ndim
        )
        mpp = self._mpp(names, units, scale)
        ome = attrs.get("ome")
        version = image.get("version") or (ome.get("version") if isinstance(ome, Mapping) else None)
        return arrays, layout, mpp, f"ome-zarr-{version or 'unknown'}"

    @staticmethod
    def _layout(axes: tuple[str, ...], sample_axis: str | None, samples: int) -> PixelLayout:
        color = 3 if samples >= 3 else 1
        alpha = "unassociated" if samples in (2, 4) else None
        return PixelLayout(axes, sample_axis, color, alpha)

    def _mpp(
        self, names: list[str], units: list[str | None], scale: np.ndarray
    ) -> tuple[float, float] | None:
        sizes = []
        for axis in ("y", "x"):
            i = names.index(axis)
            unit = units[i]
            if unit is None or str(unit).lower() not in UM_PER_UNIT:
                logger.debug("%s: axis %s has unit %r, no mpp", self.path, axis, unit)
                return None
            size = float(scale[i]) * UM_PER_UNIT[str(unit).lower()]
            if not size > 0:
                return None
            sizes.append(size)
        return sizes[0], sizes[1]

    def _probe(self) -> None:
        array = self._arrays[0]
        chunk_bytes = int(np.prod(array.chunks)) * array.dtype.itemsize
        if chunk_bytes > PROBE_MAX_BYTES:
            logger.debug("%s: not probing, first chunk is %d MiB", self.path, chunk_bytes >> 20)
            return
        try:
            self._read(0, 0, 0, 1, 1)
        except DECODE_ERRORS as exc:
            raise slide_error(
                self.path,
                f"cannot decode the first chunk of level 0 ({describe(exc)})",
                "the store is corrupt or needs a codec that is not installed",
            ) from exc

    def close(self) -> None:
        """Nothing to release (Zarr opens chunk files per read); kept for the protocol."""
