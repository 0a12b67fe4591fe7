"""NGFF (OME-Zarr) 0.4 and 0.5 metadata and pyramids of an output: ``multiscales``, ``omero``,
``image-label``, the 2 x 2 downsampling that builds each level from the one above.

The two versions carry the same content. 0.4 puts it at the top level of the attributes, with
a ``version`` in each ``multiscales`` entry, ``omero`` and ``image-label``; 0.5 wraps it as
``{"ome": {"version": "0.5", ...}}`` (:func:`wrap`) and states the version there only.

Pure functions of shapes, scales and class specs; they never open a store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.store.layout import OME_KEY

RGBA = tuple[int, int, int, int]

#: A pyramid stops at the first level whose height and width are both at most this.
PYRAMID_MAX_PX = 1024


def pyramid_shapes(
    shape: tuple[int, int], *, max_px: int = PYRAMID_MAX_PX
) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level, level 0 first.

    Each level halves the previous one, rounding odd sizes up, until both sides are at most
    ``max_px``.

    >>> pyramid_shapes((1300, 2100))
    [(1300, 2100), (650, 1050), (325, 525)]
    >>> pyramid_shapes((1024, 7))
    [(1024, 7)]
    """
    if max_px < 1:
        raise ConfigError(f"`max_px` ({max_px}) must be >= 1")
    h, w = (int(v) for v in shape)
    shapes = [(h, w)]
    while max(h, w) > max_px:
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w))
    return shapes


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """Mean of each 2 x 2 window over the last two axes, in the dtype of ``block``.

    ``(..., h, w) -> (..., ceil(h / 2), ceil(w / 2))``; windows cut by an odd edge average
    the pixels present. Integer results are rounded half to even. uint8 blocks (the stored
    probabilities) are summed in uint16 and rounded with integer operations, ~2x faster than
    the float32 sums every other dtype takes and with the same values (float32 sums of four
    uint8 are exact too). Peak memory: a uint16 copy of half the block (uint8), else a float32
    copy of the output.
    """
    h, w = block.shape[-2:]
    if block.dtype != np.uint8 or h < 2 or w < 2:
        return _downsample_mean_float(block)
    he, we = h - h % 2, w - w % 2
    rows = np.add(block[..., 0:he:2, :we], block[..., 1:he:2, :we], dtype=np.uint16)
    total = np.add(rows[..., 0::2], rows[..., 1::2])
    del rows
    # round(total / 4) half to even, total = 4q + r: q + 1 where r is 3, or 2 with q odd,
    # i.e. (total + 1 + (q & 1)) >> 2.
    odd = np.right_shift(total, 2)
    odd &= 1
    odd += 1
    total += odd
    total >>= 2
    out = np.empty((*block.shape[:-2], -(-h // 2), -(-w // 2)), dtype=np.uint8)
    out[..., : he // 2, : we // 2] = total
    if h % 2:  # the last row's windows hold 1 row: as the float path computes them
        out[..., -1, :] = _downsample_mean_float(block[..., h - 1 :, :])[..., 0, :]
    if w % 2:
        out[..., :, -1] = _downsample_mean_float(block[..., :, w - 1 :])[..., :, 0]
    return out


def _downsample_mean_float(block: np.ndarray) -> np.ndarray:
    """:func:`downsample_mean` with sums in float32 (any dtype)."""
    h, w = block.shape[-2:]
    total = np.zeros((*block.shape[:-2], -(-h // 2), -(-w // 2)), dtype=np.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            part = block[..., dy::2, dx::2]
            total[..., : part.shape[-2], : part.shape[-1]] += part
    total *= 0.25  # powers of two keep the division exact
    if h % 2:
        total[..., -1, :] *= 2
    if w % 2:
        total[..., :, -1] *= 2
    if np.issubdtype(block.dtype, np.integer):
        return np.rint(total, out=total).astype(block.dtype)
    return total.astype(block.dtype, copy=False)


def downsample_nearest(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block[..., ::2, ::2])


DOWNSAMPLERS = {"mean": downsample_mean, "nearest": downsample_nearest}


def hex_rgb(rgba: Sequence[int]) -> str:
    return "".join(f"{int(v):02X}" for v in rgba[:3])


VERSIONS = ("0.4", "0.5")


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ConfigError(f"NGFF `version` ({version!r}) must be one of {VERSIONS}")


def _versioned(doc: dict[str, Any], version: str) -> dict[str, Any]:
    """``doc`` with its own ``version`` first (0.4), or without one (0.5 states it in ``ome``)."""
    _check_version(version)
    return {"version": version, **doc} if version == "0.4" else doc


def wrap(version: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that hold NGFF ``metadata`` (``multiscales``, ``omero``, ``labels``,
    ``image-label``): as they are in 0.4, under ``ome`` with the version in 0.5.

    >>> wrap("0.5", {"labels": ["mask"]})
    {'ome': {'version': '0.5', 'labels': ['mask']}}
    """
    _check_version(version)
    if version == "0.4":
        return dict(metadata)
    return {OME_KEY: {"version": version, **metadata}}


def unwrap(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The NGFF metadata of a group's attributes, whichever the version (see :func:`wrap`).

    >>> unwrap({"ome": {"version": "0.5", "labels": ["mask"]}, "tilesegment": {}})
    {'version': '0.5', 'labels': ['mask']}
    >>> unwrap({"labels": ["mask"]})
    {'labels': ['mask']}
    """
    ome = attrs.get(OME_KEY)
    return dict(ome) if isinstance(ome, Mapping) else dict(attrs)


def multiscales(
    name: str,
    shapes: list[tuple[int, int]],
    method: str,
    mpp: tuple[float, float] | None,
    *,
    channel: bool,
    version: str = "0.4",
) -> list[dict[str, Any]]:
    """The NGFF ``multiscales`` of one pyramid: (c,) y, x axes, a scale per level."""
    space: dict[str, Any] = {"type": "space"}
    if mpp is not None:
        space["unit"] = "micrometer"
    axes = [{"name": "y", **space}, {"name": "x", **space}]
    base = mpp or (1.0, 1.0)
    datasets = []
    for k in range(len(shapes)):
        scale = [base[0] * 2**k, base[1] * 2**k]
        if channel:
            scale = [1.0, *scale]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    if channel:
        axes = [{"name": "c", "type": "channel"}, *axes]
    doc = {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": method,
        "metadata": {"description": f"2x2 {method} downsampling by tilesegment.store"},
    }
    return [_versioned(doc, version)]


def omero(
    name: str,
    names: Sequence[str],
    colours: Sequence[Sequence[int]],
    dtype: str,
    *,
    version: str = "0.4",
) -> dict[str, Any]:
    """The ``omero`` rendering metadata: one named, coloured channel per class."""
    top = 255 if dtype == "uint8" else 1.0
    channels = [
        {
            "label": label,
            "color": hex_rgb(rgba),
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"min": 0, "max": top, "start": 0, "end": top},
        }
        for label, rgba in zip(names, colours, strict=True)
    ]
    doc = {
        "name": name,
        "channels": channels,
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
    }
    return _versioned(doc, version)


@dataclass(frozen=True, slots=True)
class ClassSpec:
    """Names and display colours of the classes a model predicts, in channel order."""

    names: tuple[str, ...]
    """One non-empty, unique name per class; class ``i`` is channel ``i`` and label value ``i``."""
    colours: tuple[RGBA, ...]
    """One (r, g, b, a) colour per class, each component an int in 0..255 inclusive."""

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        colours = tuple(tuple(int(v) for v in c) for c in self.colours)
        if not 1 <= len(names) <= 256:
            raise ConfigError(f"`names` must list 1 to 256 classes, got {len(names)}")
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"class `names` must be non-empty and unique, got {names}")
        if len(colours) != len(names):
            raise ConfigError(
                f"`colours` ({len(colours)}) must give one colour per class ({len(names)})"
            )
        for c in colours:
            if len(c) != 4 or not all(0 <= v <= 255 for v in c):
                raise ConfigError(f"each colour must be (r, g, b, a) in 0..255, got {c}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colours", colours)

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict that :meth:`from_json` turns back into this spec."""
        return {"names": list(self.names), "colours": [list(c) for c in self.colours]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassSpec:
        """The spec stored by :meth:`to_json`."""
        return cls(tuple(data["names"]), tuple(tuple(c) for c in data["colours"]))


def image_label(
    colours: Mapping[int, Sequence[int]] | None,
    properties: Mapping[int, Mapping[str, Any]] | None,
    *,
    version: str = "0.4",
) -> dict[str, Any]:
    """The NGFF ``image-label`` of a label: colours and properties per label value."""
    image_label = _versioned({"source": {"image": "../../"}}, version)
    if colours is not None:
        colors = []
        for value, rgba in sorted(colours.items()):
            rgba = [int(v) for v in rgba]
            if len(rgba) != 4 or not all(0 <= v <= 255 for v in rgba):
                raise ConfigError(f"colour of label {value} must be (r, g, b, a), got {rgba}")
            colors.append({"label-value": int(value), "rgba": rgba})
        image_label["colors"] = colors
    if properties is not None:
        props = [{"label-value": int(v), **dict(p)} for v, p in sorted(properties.items())]
        if colours is not None and {int(v) for v in colours} != {int(v) for v in properties}:
            raise ConfigError("`colours` and `properties` must cover the same label values")
        image_label["properties"] = props
    try:
        json.dumps(image_label)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"label `properties` must be JSON-serialisable: {exc}") from exc
    return image_label
