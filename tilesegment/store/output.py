"""The stitcher's output store: an NGFF 0.4 (OME-Zarr) group in Zarr v2 format (its layout is
described in :mod:`tilesegment.store.layout`).

Lifecycle
---------
1. One process calls :meth:`OutputStore.create`, which writes level 0 of the image and of
   ``labels/mask`` (no chunks yet) and ``tilesegment.status = "incomplete"``. It may add
   more labels with :meth:`OutputStore.create_label`.
2. Any number of processes call ``OutputStore.open(path, mode="r+")`` and
   :meth:`OutputStore.write_chunk` / :meth:`OutputStore.write_label_chunk` on disjoint,
   chunk-aligned boxes. A writer only ever writes whole chunk files (atomically, through
   zarr's local store), never attributes, so writers need no locks.
3. One process calls :meth:`OutputStore.finalize`: pyramid levels are built by reading
   level ``k - 1`` back one chunk at a time (memory stays bounded by a few chunks), then
   the NGFF metadata is written, and ``tilesegment.status = "complete"`` last. That status
   is the completion marker read by :func:`is_complete`. ``finalize`` needs nothing from
   the writers' memory: everything it uses is read from the store, so it can be re-run
   after a crash.

Until ``finalize`` the root carries no ``multiscales`` or ``omero`` metadata, so OME-Zarr
readers do not mistake a half-written store for a finished image.

Pyramids: level ``k`` is level ``k - 1`` halved (odd sizes round up), until
``max(h, w) <= PYRAMID_MAX_PX``. Probabilities take the mean of each 2 x 2 window (of the
pixels present at odd edges), computed in float32 (exact for uint8) from the stored level
``k - 1`` values and, for uint8, rounded to nearest with ties to even (:func:`numpy.rint`).
Labels take the top-left pixel of each window (``[::2, ::2]``).

Adding a label to a complete store (a later stage writing ``labels/nuclei``) sets the status
back to ``"incomplete"`` until ``finalize`` is called again; ``finalize`` only builds the
pyramids and metadata of the parts not yet finalised.

Thread- and process-safety: an :class:`OutputStore` may be shared by threads writing
disjoint chunks. Do not pickle it: give workers the path and let each call
:meth:`OutputStore.open`. Attribute updates (``create``, ``create_label``, ``finalize``)
belong to a single coordinating process. Only local filesystem paths are supported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.machine import cores_up_to
from tilesegment.store import ngff
from tilesegment.store.arrays import (
    check_aligned,
    class_map,
    clear_path,
    create_array,
    open_group,
    quantise,
    update_attrs,
)
from tilesegment.store.layout import ATTR_KEY, FORMAT_VERSION, LABELS, MASK, read_zattrs
from tilesegment.store.ngff import DOWNSAMPLERS, ClassSpec, multiscales, omero, pyramid_shapes

__all__ = [
    "ClassSpec",
    "OutputStore",
    "is_complete",
    "pyramid_shapes",
]

logger = logging.getLogger(__name__)

_DTYPES = ("uint8", "float32")
_RESERVED_ATTRS = ("status", "store")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# value objects and pure helpers


# ---------------------------------------------------------------------------------------------
# the store


class OutputStore:
    """Class probabilities, argmax mask and further labels of one image, as OME-Zarr.

    Create a new store with :meth:`create`, re-open one with :meth:`open`; do not call the
    constructor. See the module docstring for the layout, lifecycle and concurrency rules.

    Attributes
    ----------
    path : Path
        The store's directory.
    mode : {"r", "r+"}
        Whether the store may be written.
    classes : ClassSpec
        Class names and colours, in channel order.
    image_shape : (H, W) tuple of int
        Level-0 size in pixels.
    chunk_shape : (cy, cx) tuple of int
        Level-0 chunk size in pixels (clipped to the image).
    mpp : (float, float) or None
        Micrometres per pixel of level 0 as (y, x), or None when unknown.
    dtype : {"uint8", "float32"}
        How probabilities are stored.
    """

    def __init__(self, path: Path, mode: Literal["r", "r+"], root: zarr.Group) -> None:
        attrs = dict(root.attrs)
        meta = attrs.get(ATTR_KEY)
        if not isinstance(meta, dict) or not isinstance(meta.get("store"), dict):
            raise StoreError(
                f"{path} is not a tilesegment output store (no '{ATTR_KEY}' attribute)"
            )
        store = meta["store"]
        if store.get("format") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {store.get('format')!r}; this version of tilesegment "
                f"reads format {FORMAT_VERSION}"
            )
        self.path = path
        self.mode = mode
        self._root = root
        self.classes = ClassSpec.from_json(store["classes"])
        self.mpp: tuple[float, float] | None = (
            None if store["mpp"] is None else (float(store["mpp"][0]), float(store["mpp"][1]))
        )
        try:
            image = root["0"]
        except KeyError as exc:
            raise StoreError(f"{path} has no probability array '0'") from exc
        self.dtype: str = str(image.dtype)
        self.image_shape: tuple[int, int] = (int(image.shape[1]), int(image.shape[2]))
        self.chunk_shape: tuple[int, int] = (int(image.chunks[1]), int(image.chunks[2]))
        self._image = image
        self._image_final = "multiscales" in attrs
        self._labels: dict[str, zarr.Array] = {}

    def __repr__(self) -> str:
        return (
            f"OutputStore({str(self.path)!r}, mode={self.mode!r}, shape={self.image_shape}, "
            f"classes={len(self.classes)}, dtype={self.dtype!r})"
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        image_shape: tuple[int, int],
        classes: ClassSpec,
        chunk_shape: tuple[int, int],
        mpp: tuple[float, float] | None,
        dtype: str = "uint8",
        overwrite: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> OutputStore:
        """Create an empty, incomplete store with level 0 of the image and of ``labels/mask``.

        Parameters
        ----------
        path : str or path-like
            Directory to create (conventionally ``*.zarr``).
        image_shape : (H, W) tuple of int
            Level-0 size in pixels.
        classes : ClassSpec
            Class names and colours; ``len(classes)`` is the channel count ``C``.
        chunk_shape : (cy, cx) tuple of int
            Level-0 chunk size, a whole number of tile strides so that each chunk has one
            writer. Clipped to the image.
        mpp : (float, float) or None
            Micrometres per pixel of level 0 as (y, x); None writes unit-less pixel scales.
        dtype : {"uint8", "float32"}
            uint8 stores ``rint(p * 255)``; float32 stores ``p``.
        overwrite : bool
            Replace an existing store at ``path``. Only a tilesegment store or an empty
            directory is ever deleted.
        attrs : mapping, optional
            JSON-compatible provenance merged into the root ``tilesegment`` attribute
            (keys ``status`` and ``store`` are reserved).

        Returns
        -------
        OutputStore
            Opened in mode ``"r+"``.

        Raises
        ------
        ConfigError
            An argument is invalid.
        StoreError
            ``path`` exists (without ``overwrite``, or is not safe to delete) or cannot be
            written.
        """
        path = Path(path)
        h, w = (int(v) for v in image_shape)
        cy, cx = (int(v) for v in chunk_shape)
        if h < 1 or w < 1:
            raise ConfigError(f"`image_shape` ({image_shape}) must be positive")
        if cy < 1 or cx < 1:
            raise ConfigError(f"`chunk_shape` ({chunk_shape}) must be positive")
        if dtype not in _DTYPES:
            raise ConfigError(f"`dtype` ({dtype!r}) must be one of {_DTYPES}")
        if mpp is not None:
            mpp = (float(mpp[0]), float(mpp[1]))
            if not all(math.isfinite(v) and v > 0 for v in mpp):
                raise ConfigError(f"`mpp` ({mpp}) must be two positive numbers or None")
        extra = dict(attrs or {})
        clash = sorted(set(extra) & set(_RESERVED_ATTRS))
        if clash:
            raise ConfigError(f"`attrs` must not use the reserved keys {clash}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"`attrs` must be JSON-serialisable: {exc}") from exc

        clear_path(path, overwrite)
        meta = {
            "status": "incomplete",
            "store": {
                "format": FORMAT_VERSION,
                "classes": classes.to_json(),
                "mpp": None if mpp is None else list(mpp),
            },
            **extra,
        }
        try:
            root = zarr.open_group(str(path), mode="w-", zarr_format=2)
            root.attrs[ATTR_KEY] = meta
            create_array(root, "0", (len(classes), h, w), (len(classes), cy, cx), dtype)
            root.create_group("labels").attrs[ATTR_KEY] = {"labels": []}
        except OSError as exc:
            raise StoreError(f"cannot create the output store {path}: {exc}") from exc
        logger.info("created output store %s: %d classes, %d x %d px", path, len(classes), h, w)
        store = cls(path, "r+", root)
        store.create_label(
            MASK,
            dtype="uint8",
            colours=dict(enumerate(classes.colours)),
            properties={i: {"class": n} for i, n in enumerate(classes.names)},
        )
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r") -> OutputStore:
        """Open an existing store, complete or not (to resume, write in parallel or read).

        Raises
        ------
        ConfigError
            ``mode`` is neither ``"r"`` nor ``"r+"``.
        StoreError
            ``path`` is not a tilesegment output store.
        """
        if mode not in ("r", "r+"):
            raise ConfigError(f"`mode` ({mode!r}) must be 'r' or 'r+'")
        path = Path(path)
        if read_zattrs(path) is None:
            raise StoreError(f"{path} is not a tilesegment output store (no Zarr v2 group)")
        return cls(path, mode, open_group(path, mode))

    # -- reading -----------------------------------------------------------------------------

    @property
    def probabilities(self) -> zarr.Array:
        """Level 0 of the probability image, (C, H, W)."""
        return self._image

    @property
    def mask(self) -> zarr.Array:
        """Level 0 of ``labels/mask``, (H, W) uint8 class ids."""
        return self.label(MASK)

    def label(self, name: str) -> zarr.Array:
        """Level 0 of ``labels/<name>``, (H, W)."""
        if name not in self._labels:
            try:
                self._labels[name] = self._root[f"labels/{name}/0"]
            except KeyError as exc:
                raise StoreError(f"{self.path} has no label {name!r}") from exc
        return self._labels[name]

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of all labels, finalised or not, in creation order."""
        attrs = read_zattrs(self.path / "labels") or {}
        return tuple(attrs.get(ATTR_KEY, {}).get("labels", []))

    def pyramid(self, name: str | None = None) -> list[zarr.Array]:
        """All existing levels of the image (``name=None``) or of ``labels/<name>``."""
        if name is None:
            group = self._root
        else:
            self.label(name)  # raises StoreError for an unknown label
            group = self._root[f"labels/{name}"]
        n = len(pyramid_shapes(self.image_shape))
        return [group[str(k)] for k in range(n) if str(k) in group]

    @property
    def attrs(self) -> dict[str, Any]:
        """The caller's attributes given to :meth:`create`."""
        meta = dict(open_group(self.path, "r").attrs)[ATTR_KEY]
        return {k: v for k, v in meta.items() if k not in _RESERVED_ATTRS}

    def is_complete(self) -> bool:
        """Whether the completion marker is written (read from disk now)."""
        return is_complete(self.path)

    def chunk_boxes(self) -> Iterator[Box]:
        """Every level-0 chunk as a box, row-major; the boxes :meth:`write_chunk` accepts."""
        (h, w), (cy, cx) = self.image_shape, self.chunk_shape
        for y in range(0, h, cy):
            for x in range(0, w, cx):
                yield Box(y, x, min(cy, h - y), min(cx, w - x))

    def label_state(self, name: str) -> str:
        """``"missing"``, ``"pending"`` (created, not finalised) or ``"final"`` (read now)."""
        attrs = read_zattrs(self.path / LABELS / name)
        if attrs is None:
            return "missing"
        return "final" if "multiscales" in attrs else "pending"

    @property
    def image_finalised(self) -> bool:
        """Whether the probability image has its pyramid and NGFF metadata (read now)."""
        return "multiscales" in (read_zattrs(self.path) or {})

    # -- writing -----------------------------------------------------------------------------

    def _check_writable(self, what: str) -> None:
        if self.mode != "r+":
            raise StoreError(f"cannot write {what}: {self.path} was opened read-only")

    def write_chunk(self, box: Box, probabilities: np.ndarray) -> None:
        """Write the probabilities of ``box`` and their argmax to ``labels/mask``.

        Parameters
        ----------
        box : Box
            A whole number of level-0 chunks: ``y`` and ``x`` are multiples of the chunk
            size and the box ends on a chunk boundary or at the image edge. Usually one chunk.
        probabilities : (C, h, w) float ndarray
            Class probabilities in [0, 1] for exactly ``box``. uint8 stores quantise them
            to ``rint(p * 255)``; the mask is the argmax of the float values (first class
            wins ties).

        Raises
        ------
        StoreError
            The box is not chunk-aligned, the array does not match it, the values are not
            probabilities, or the store is read-only or already finalised.
        """
        self._check_writable("probabilities")
        if self._image_final:
            raise StoreError(
                f"{self.path} is finalised; its probabilities can no longer be written"
            )
        check_aligned(box, self.image_shape, self.chunk_shape)
        expected = (len(self.classes), box.h, box.w)
        p = np.asarray(probabilities)
        if p.shape != expected:
            raise StoreError(f"`probabilities` has shape {p.shape}, expected {expected} for {box}")
        if not np.issubdtype(p.dtype, np.floating):
            raise StoreError(f"`probabilities` must be a float array, got {p.dtype}")
        lo, hi = float(p.min()), float(p.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
            raise StoreError(
                f"`probabilities` must lie in [0, 1], got values in [{lo}, {hi}] for {box}; "
                "pass softmax outputs, not logits"
            )
        ys, xs = box.slices
        self.probabilities[:, ys, xs] = quantise(p, np.dtype(self.dtype))
        self.mask[ys, xs] = class_map(p)

    def create_label(
        self,
        name: str,
        *,
        dtype: str,
        colours: Mapping[int, Sequence[int]] | None = None,
        properties: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> zarr.Array:
        """Add an empty (H, W) label ``labels/<name>`` chunked like the image.

        Its NGFF ``image-label`` and ``multiscales`` metadata are written by :meth:`finalize`;
        until then the store is incomplete. Call this from the coordinating process only.

        Parameters
        ----------
        name : str
            Label name, e.g. ``"nuclei"`` or ``"tissue"`` (letters, digits, ``_ . -``).
        dtype : str
            An integer dtype, e.g. ``"uint8"`` or ``"uint32"``.
        colours : mapping of int to (r, g, b, a), optional
            Display colour per label value, components in 0..255.
        properties : mapping of int to mapping, optional
            JSON-compatible properties per label value. If ``colours`` is also given, both
            must cover the same label values.

        Returns
        -------
        zarr.Array
            Level 0 of the new label.
        """
        self._check_writable(f"label {name!r}")
        if not isinstance(name, str) or not _LABEL_NAME.match(name):
            raise ConfigError(f"label `name` ({name!r}) must match {_LABEL_NAME.pattern}")
        dt = np.dtype(dtype)
        if not np.issubdtype(dt, np.integer):
            raise ConfigError(f"label `dtype` ({dtype!r}) must be an integer type")
        if name in self.label_names:
            raise StoreError(f"{self.path} already has a label {name!r}")
        image_label = ngff.image_label(colours, properties)

        labels = open_group(self.path / "labels", "r+")
        group = labels.create_group(name, overwrite=True)
        group.attrs[ATTR_KEY] = {"image-label": image_label}
        array = create_array(group, "0", self.image_shape, self.chunk_shape, dt.name)
        update_attrs(self.path / "labels", {ATTR_KEY: {"labels": [*self.label_names, name]}})
        if is_complete(self.path):
            self._set_status("incomplete")
        self._labels[name] = array
        logger.debug("created label %s/labels/%s (%s)", self.path, name, dt.name)
        return array

    def write_label_chunk(self, name: str, box: Box, data: np.ndarray) -> None:
        """Write ``data`` (h, w) into level 0 of ``labels/<name>`` at chunk-aligned ``box``.

        Integer data of another dtype is accepted when its values fit the label's dtype.

        Raises
        ------
        StoreError
            As :meth:`write_chunk`, or the values do not fit the label's dtype.
        """
        self._check_writable(f"label {name!r}")
        array = self.label(name)
        if "multiscales" in (read_zattrs(self.path / "labels" / name) or {}):
            raise StoreError(f"label {name!r} of {self.path} is finalised and cannot be written")
        check_aligned(box, self.image_shape, self.chunk_shape)
        data = np.asarray(data)
        if data.shape != box.shape:
            raise StoreError(f"label data has shape {data.shape}, expected {box.shape} for {box}")
        if data.dtype != array.dtype:
            info = np.iinfo(array.dtype)
            if not (np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_):
                raise StoreError(f"label data must be integer, got {data.dtype}")
            if data.size and (data.min() < info.min or data.max() > info.max):
                raise StoreError(
                    f"label values in [{data.min()}, {data.max()}] do not fit {array.dtype} "
                    f"of label {name!r}"
                )
            data = data.astype(array.dtype)
        array[box.slices] = data

    def delete_label(self, name: str) -> None:
        """Remove ``labels/<name>`` so that it can be created afresh.

        The label is first unlisted from ``labels/.zattrs`` (both the NGFF list and the pending
        list), then deleted, so a crash in between leaves an unlisted directory that
        :meth:`create_label` overwrites.
        """
        self._check_writable(f"label {name!r}")
        group = open_group(self.path / LABELS, "r+")
        attrs = dict(group.attrs)
        meta = dict(attrs.get(ATTR_KEY, {}))
        update: dict[str, Any] = {
            ATTR_KEY: {**meta, "labels": [n for n in meta.get("labels", []) if n != name]}
        }
        if "labels" in attrs:
            update["labels"] = [n for n in attrs["labels"] if n != name]
        group.attrs.update(update)
        self._labels.pop(name, None)
        target = self.path / LABELS / name
        if target.exists():
            try:
                shutil.rmtree(target)
            except OSError as exc:
                raise StoreError(f"cannot remove the old {target}: {exc}") from exc
        logger.info("removed %s", target)

    # -- finalising --------------------------------------------------------------------------

    def finalize(self, *, threads: int | None = None) -> None:
        """Build every missing pyramid, write the NGFF metadata, then mark the store complete.

        Safe to call again after a crash or after :meth:`create_label` on a complete store:
        parts whose metadata is already written are skipped, the rest is rebuilt from level 0.

        Parameters
        ----------
        threads : int, optional
            Threads used to build pyramid levels (default: up to 8). Memory use is a few
            chunks per thread.
        """
        self._check_writable("the pyramid")
        workers = threads or cores_up_to(8)
        shapes = pyramid_shapes(self.image_shape)
        names = self.label_names
        for name in names:
            group_path = self.path / "labels" / name
            attrs = read_zattrs(group_path) or {}
            if "multiscales" in attrs:
                continue
            group = open_group(group_path, "r+")
            self._build_pyramid(group, shapes, "nearest", workers)
            # The pending metadata kept under ATTR_KEY becomes the NGFF metadata.
            final = {k: v for k, v in attrs.items() if k != ATTR_KEY}
            final["image-label"] = attrs[ATTR_KEY]["image-label"]
            final["multiscales"] = multiscales(name, shapes, "nearest", self.mpp, channel=False)
            group.attrs.put(final)
        update_attrs(self.path / "labels", {"labels": list(names)})
        # Read from disk, not self._image_final: another process may have finalised meanwhile.
        if "multiscales" not in (read_zattrs(self.path) or {}):
            self._build_pyramid(self._root, shapes, "mean", workers)
            update_attrs(
                self.path,
                {
                    "multiscales": multiscales(
                        "probabilities", shapes, "mean", self.mpp, channel=True
                    ),
                    "omero": omero(
                        self.path.name, self.classes.names, self.classes.colours, self.dtype
                    ),
                },
            )
            self._image_final = True
        self._set_status("complete")  # the completion marker: always last
        logger.info("finalised output store %s (%d levels)", self.path, len(shapes))

    def _set_status(self, status: Literal["incomplete", "complete"]) -> None:
        meta = dict(open_group(self.path, "r").attrs)[ATTR_KEY]
        update_attrs(self.path, {ATTR_KEY: {**meta, "status": status}})

    def _build_pyramid(
        self,
        group: zarr.Group,
        shapes: list[tuple[int, int]],
        method: Literal["mean", "nearest"],
        workers: int,
    ) -> None:
        """Write levels 1.. of ``group`` from level 0, one output chunk per task."""
        downsample = DOWNSAMPLERS[method]
        source = group["0"]
        lead = source.shape[:-2]
        cy, cx = self.chunk_shape
        for k in range(1, len(shapes)):
            h, w = shapes[k]
            target = create_array(group, str(k), (*lead, h, w), (*lead, cy, cx), str(source.dtype))
            boxes = [
                Box(y, x, min(cy, h - y), min(cx, w - x))
                for y in range(0, h, cy)
                for x in range(0, w, cx)
            ]

            def one(box: Box, source: zarr.Array = source, target: zarr.Array = target) -> None:
                ys = slice(2 * box.y, 2 * (box.y + box.h))
                xs = slice(2 * box.x, 2 * (box.x + box.w))
                target[(..., *box.slices)] = downsample(source[..., ys, xs])

            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, boxes):
                    pass
            logger.debug("built %s/%s level %d: %s", self.path, group.path, k, target.shape)
            source = target


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a tilesegment store whose completion marker is written.

    False for a missing path or any directory that is not a tilesegment store.
    """
    attrs = read_zattrs(Path(path))
    if attrs is None:
        return False
    meta = attrs.get(ATTR_KEY)
    return isinstance(meta, dict) and meta.get("status") == "complete"
