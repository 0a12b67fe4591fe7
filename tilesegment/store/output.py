"""The stitcher's output store: an OME-Zarr group, NGFF 0.4 in Zarr v2 (the default) or NGFF 0.5
in sharded Zarr v3 (its layout is described in :mod:`tilesegment.store.layout`).

Lifecycle
---------
1. One process calls :meth:`OutputStore.create`, which writes level 0 of the image and of
   ``labels/mask`` (no chunks yet) and ``tilesegment.status = "incomplete"``. It may add
   more labels with :meth:`OutputStore.create_label`.
2. Any number of processes call ``OutputStore.open(path, mode="r+")`` and
   :meth:`OutputStore.write_chunk` / :meth:`OutputStore.write_label_chunk` on disjoint,
   chunk-aligned boxes. A writer only ever writes whole files (atomically, through zarr's
   local store), never attributes, so writers need no locks. A file is a chunk (NGFF 0.4)
   or a shard of many chunks (NGFF 0.5), whose one writer at a time gathers its chunks and
   writes it whole (:mod:`~tilesegment.store.shards`).
3. One process calls :meth:`OutputStore.finalize`: pyramid levels are built by reading
   level ``k - 1`` back (:mod:`~tilesegment.store.levels`), then the NGFF metadata is
   written, and ``tilesegment.status = "complete"`` last: the completion marker read by
   :func:`is_complete`. ``finalize`` reads everything it uses from the store, so it can be
   re-run after a crash. Until then the root has no ``multiscales`` or ``omero``, so
   OME-Zarr readers do not mistake a half-written store for a finished image.

Adding a label to a complete store (a later stage writing ``labels/nuclei``) sets the status
back to ``"incomplete"`` until ``finalize`` is called again; ``finalize`` only builds the
pyramids and metadata of the parts not yet finalised.

Thread- and process-safety: an :class:`OutputStore` may be shared by threads writing
disjoint chunks (shards). Do not pickle it: give workers the path and let each call
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
    clear_path,
    for_writing,
    open_group,
    stored_label,
    stored_probabilities,
    update_attrs,
)
from tilesegment.store.layout import (
    ATTR_KEY,
    FORMAT_VERSION,
    LABELS,
    MASK,
    NGFF_04,
    NGFF_05,
    NGFF_VERSION,
    ZARR_FORMAT,
    ChunkFiles,
    read_attrs,
)
from tilesegment.store.levels import build_pyramid, check_shards, create_level
from tilesegment.store.ngff import (
    ClassSpec,
    multiscales,
    omero,
    pyramid_shapes,
    unwrap,
    wrap,
)
from tilesegment.store.shards import grid_boxes, shard_step

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
    format : {"ngff-0.4", "ngff-0.5"}
        NGFF 0.4 in Zarr v2, or NGFF 0.5 in sharded Zarr v3.
    shard_shape : (sy, sx) tuple of int
        Level-0 shard size in pixels, a whole number of chunks (the chunk size in NGFF 0.4,
        where every chunk is a file).
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
        self.format: str = NGFF_05 if root.metadata.zarr_format == 3 else NGFF_04
        self.shard_shape: tuple[int, int] = shard_step(image) or self.chunk_shape
        self._image = for_writing(image) if mode == "r+" else image
        self._image_final = "multiscales" in unwrap(attrs)
        self._labels: dict[str, zarr.Array] = {}

    @property
    def sharded(self) -> bool:
        """Whether a file holds several chunks (NGFF 0.5), so writers must gather shards."""
        return self.shard_shape != self.chunk_shape

    @property
    def _grid(self) -> dict[str, Any]:
        """Chunks and shards of every level (see :func:`~.levels.create_level`)."""
        return {
            "chunk_shape": self.chunk_shape,
            "shard_shape": self.shard_shape if self.sharded else None,
        }

    @property
    def chunk_files(self) -> ChunkFiles:
        """Which files hold each level-0 chunk (what the done log makes durable)."""
        (sy, sx), (cy, cx) = self.shard_shape, self.chunk_shape
        return ChunkFiles(self.format, (sy // cy, sx // cx))

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
        format: str = NGFF_04,
        shard_shape: tuple[int, int] | None = None,
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
        format : {"ngff-0.4", "ngff-0.5"}
            NGFF 0.4 in Zarr v2, one file per chunk; or NGFF 0.5 in Zarr v3, one file per
            shard of ``shard_shape``.
        shard_shape : (sy, sx) tuple of int, optional
            NGFF 0.5 only: level-0 shard size, a whole number of chunks (default: one chunk).

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
        shards = check_shards(format, shard_shape, (cy, cx))
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
                "ngff": NGFF_VERSION[format],
                "classes": classes.to_json(),
                "mpp": None if mpp is None else list(mpp),
            },
            **extra,
        }
        try:
            root = zarr.open_group(str(path), mode="w-", zarr_format=ZARR_FORMAT[format])
            root.attrs[ATTR_KEY] = meta
            grid = {"chunk_shape": (cy, cx), "shard_shape": shards}
            create_level(root, 0, (h, w), dtype, lead=(len(classes),), **grid)
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
        if read_attrs(path) is None:
            raise StoreError(f"{path} is not a tilesegment output store (no Zarr group)")
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
                array = self._root[f"labels/{name}/0"]
                self._labels[name] = for_writing(array) if self.mode == "r+" else array
            except KeyError as exc:
                raise StoreError(f"{self.path} has no label {name!r}") from exc
        return self._labels[name]

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of all labels, finalised or not, in creation order."""
        attrs = read_attrs(self.path / LABELS) or {}
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
        return grid_boxes(self.image_shape, self.chunk_shape)

    def shard_box(self, box: Box) -> Box:
        """The level-0 shard (clipped to the image) holding the chunk at ``box``'s origin."""
        (h, w), (sy, sx) = self.image_shape, self.shard_shape
        y, x = box.y // sy * sy, box.x // sx * sx
        return Box(y, x, min(sy, h - y), min(sx, w - x))

    def label_state(self, name: str) -> str:
        """``"missing"``, ``"pending"`` (created, not finalised) or ``"final"`` (read now)."""
        attrs = read_attrs(self.path / LABELS / name)
        if attrs is None:
            return "missing"
        return "final" if "multiscales" in unwrap(attrs) else "pending"

    @property
    def image_finalised(self) -> bool:
        """Whether the probability image has its pyramid and NGFF metadata (read now)."""
        return "multiscales" in unwrap(read_attrs(self.path) or {})

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

        Notes
        -----
        In a sharded store, a box smaller than its shard makes zarr read, merge and rewrite
        the shard: give each shard one writer at a time, and gather its chunks in a
        :class:`~tilesegment.store.shards.ShardBuffer` to write each shard once.
        """
        stored, mask = self.chunk_values(box, probabilities)
        ys, xs = box.slices
        self.probabilities[:, ys, xs] = stored
        self.mask[ys, xs] = mask

    def chunk_values(self, box: Box, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stored probabilities, class map) of ``box`` as :meth:`write_chunk` writes them,
        after its checks (raising the same errors)."""
        self._check_writable("probabilities")
        if self._image_final:
            raise StoreError(
                f"{self.path} is finalised; its probabilities can no longer be written"
            )
        check_aligned(box, self.image_shape, self.chunk_shape)
        return stored_probabilities(probabilities, box, len(self.classes), self.dtype)

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
        image_label = ngff.image_label(colours, properties, version=NGFF_VERSION[self.format])

        labels = open_group(self.path / "labels", "r+")
        group = labels.create_group(name, overwrite=True)
        group.attrs[ATTR_KEY] = {"image-label": image_label}
        array = create_level(group, 0, self.image_shape, dt.name, **self._grid)
        update_attrs(self.path / "labels", {ATTR_KEY: {"labels": [*self.label_names, name]}})
        if is_complete(self.path):
            self._set_status("incomplete")
        self._labels[name] = array = for_writing(array)
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
        self.label(name)[box.slices] = self.label_values(name, box, data)

    def label_values(self, name: str, box: Box, data: np.ndarray) -> np.ndarray:
        """``data`` as :meth:`write_label_chunk` writes it, after its checks."""
        self._check_writable(f"label {name!r}")
        array = self.label(name)
        if self.label_state(name) == "final":
            raise StoreError(f"label {name!r} of {self.path} is finalised and cannot be written")
        check_aligned(box, self.image_shape, self.chunk_shape)
        return stored_label(data, box, array.dtype, name)

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
        listed = unwrap(attrs).get("labels")
        if listed is not None:
            update.update(
                wrap(NGFF_VERSION[self.format], {"labels": [n for n in listed if n != name]})
            )
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
        version = NGFF_VERSION[self.format]
        for name in names:
            group_path = self.path / LABELS / name
            if self.label_state(name) == "final":
                continue
            attrs = read_attrs(group_path) or {}
            group = open_group(group_path, "r+")
            build_pyramid(group, shapes, "nearest", workers, **self._grid)
            # The pending metadata kept under ATTR_KEY becomes the NGFF metadata.
            final = {k: v for k, v in attrs.items() if k != ATTR_KEY}
            ms = multiscales(name, shapes, "nearest", self.mpp, channel=False, version=version)
            image_label = attrs[ATTR_KEY]["image-label"]
            final.update(wrap(version, {"image-label": image_label, "multiscales": ms}))
            group.attrs.put(final)
        update_attrs(self.path / LABELS, wrap(version, {"labels": list(names)}))
        # Read from disk, not self._image_final: another process may have finalised meanwhile.
        if not self.image_finalised:
            build_pyramid(self._root, shapes, "mean", workers, **self._grid)
            classes = self.classes
            ngff_attrs = {
                "multiscales": multiscales(
                    "probabilities", shapes, "mean", self.mpp, channel=True, version=version
                ),
                "omero": omero(
                    self.path.name, classes.names, classes.colours, self.dtype, version=version
                ),
            }
            update_attrs(self.path, wrap(version, ngff_attrs))
            self._image_final = True
        self._set_status("complete")  # the completion marker: always last
        logger.info("finalised output store %s (%d levels)", self.path, len(shapes))

    def _set_status(self, status: Literal["incomplete", "complete"]) -> None:
        meta = dict(open_group(self.path, "r").attrs)[ATTR_KEY]
        update_attrs(self.path, {ATTR_KEY: {**meta, "status": status}})


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a tilesegment store whose completion marker is written.

    False for a missing path or any directory that is not a tilesegment store.
    """
    attrs = read_attrs(Path(path))
    if attrs is None:
        return False
    meta = attrs.get(ATTR_KEY)
    return isinstance(meta, dict) and meta.get("status") == "complete"
