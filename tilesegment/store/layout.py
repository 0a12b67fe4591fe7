"""Where everything of an output lives: the only module that knows the chunk keys, file names
and attribute names of ``OUT.zarr`` and of the run state kept beside it.

Layout of ``OUT.zarr`` once :meth:`OutputStore.finalize` has run (``C`` classes, image
``H x W`` px, chunk ``cy x cx`` px; level ``k`` has shape ``ceil(H / 2**k) x ceil(W / 2**k)``)
in the default format, NGFF 0.4 (Zarr v2)::

    OUT.zarr/
      .zattrs        tilesegment: {status, store: {...}, **caller attrs}
                     multiscales: [...]   (c, y, x); written by finalize only
                     omero: {...}         one named, coloured channel per class; finalize only
      0/ 1/ ...      (C, H_k, W_k) class probabilities, uint8 round(p * 255) or float32,
                     chunks (C, cy, cx) clipped to the level
      labels/
        .zattrs      labels: [names]      finalised labels only; pending ones are in
                     tilesegment: {labels: [names]}
        mask/        argmax class map, uint8, chunks (cy, cx)
          .zattrs    image-label: {version, colors, properties, source: {image: "../../"}}
                     multiscales: [...]   (y, x); both written by finalize only
                     (until then the image-label sits under tilesegment: {image-label})
          0/ 1/ ...
        nuclei/ ...  further labels added with :meth:`OutputStore.create_label`

Every array is Zarr v2 with ``dimension_separator`` ``"/"`` (as NGFF 0.4 requires), Blosc
zstd compression and fill value 0. Scales are ``mpp * 2**k`` micrometre for y/x (``2**k``
and no unit when the mpp is unknown) and 1 for c. No translation is written, like most
NGFF writers.

NGFF 0.5 (``--format ngff-0.5``) holds the same groups, arrays and values as Zarr v3: each
group's ``zarr.json`` carries the attributes, the NGFF ones wrapped as
``ome: {version: "0.5", multiscales, omero | labels | image-label}`` (the ``tilesegment``
attribute stays beside ``ome``), every array names its axes (``dimension_names``) and is
*sharded*: one file per shard of ``sy x sx`` chunks (``shard_shape`` px, the same at every
level, clipped to whole chunks of the level), at ``ARRAY/c/[0/]ROW/COL`` (the default v3
chunk key encoding). A shard is written whole by one writer (see
:mod:`tilesegment.store.shards`).

Beside ``OUT.zarr`` (never inside it, so that zarr, napari and ome-zarr see a clean group)::

    OUT.zarr.lock          while a run writes OUT.zarr (see tilesegment.store.resume.RunLock)
    OUT.tilesegment/       resume state: run.json (parameters), done.log (finished chunks)
    OUT.report.json        the run report, written at the end of every run
    OUT.preview.png        thumbnail with mask contours
    OUT.nuclei.csv         the instance table of ``tilesegment export``

Outputs written before this layout kept the state in ``OUT.zarr/.tilesegment/`` and the report
in ``OUT.zarr/tilesegment-report.json``; :func:`legacy_state_dir` and :func:`legacy_report_path`
name them so that a resume can move them out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilesegment.errors import StoreError

#: Root attribute holding the store's status, its own bookkeeping and the caller's attrs.
ATTR_KEY = "tilesegment"

#: Version of the layout described here, recorded in ``tilesegment.store.format``.
FORMAT_VERSION = 1

MASK = "mask"
"""Name of the argmax class-map label written by :meth:`OutputStore.write_chunk`."""

TISSUE = "tissue"
"""Name of the tissue label a run writes when it detects or is given a tissue mask."""

LABELS = "labels"
"""The group holding every label."""

NGFF_04 = "ngff-0.4"
"""OME-Zarr 0.4 in Zarr v2, one file per chunk: the default (QuPath reads only this)."""
NGFF_05 = "ngff-0.5"
"""OME-Zarr 0.5 in Zarr v3, sharded: few files, for very large outputs and cluster filesystems."""
FORMATS = (NGFF_04, NGFF_05)
"""The output formats ``tilesegment run --format`` offers, the default first."""
ZARR_FORMAT = {NGFF_04: 2, NGFF_05: 3}
"""The Zarr format of each output format."""
NGFF_VERSION = {NGFF_04: "0.4", NGFF_05: "0.5"}
"""The NGFF version string each output format writes."""

OME_KEY = "ome"
"""The attribute NGFF 0.5 wraps its metadata in (``{"ome": {"version": "0.5", ...}}``)."""

V2_GROUP, V2_ATTRS, V3_META = ".zgroup", ".zattrs", "zarr.json"
"""Metadata files of a Zarr v2 group and of any Zarr v3 node."""

ChunkKey = tuple[int, int]
"""(row, column) of a chunk in the level-0 chunk grid."""

#: Files of the run state folder.
PARAMS_FILE = "run.json"
DONE_LOG = "done.log"
#: Where outputs written before the state moved out of the group kept it (read on resume).
LEGACY_STATE_DIR = ".tilesegment"
LEGACY_REPORT_NAME = "tilesegment-report.json"


def _stem(output: str | os.PathLike[str]) -> Path:
    out = Path(output)
    return out.with_name(out.name.removesuffix(".zarr"))


def sidecar_path(output: str | os.PathLike[str], suffix: str) -> Path:
    """``OUT.<suffix>`` beside ``OUT.zarr`` (e.g. ``preview.png``, ``nuclei.csv``)."""
    stem = _stem(output)
    return stem.with_name(f"{stem.name}.{suffix}")


def state_dir(output: str | os.PathLike[str]) -> Path:
    """``OUT.tilesegment/``: where a run keeps its resume state, beside ``OUT.zarr``."""
    return sidecar_path(output, "tilesegment")


def staged_store_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.tilesegment/image-grid.zarr``: where the store that will replace ``OUT.zarr`` (a
    downsample model's output on the image's grid) is built, in the run's state folder (so a
    new run at ``OUT.zarr`` clears it)."""
    return state_dir(output) / "image-grid.zarr"


def replaced_store_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.tilesegment/network-grid.zarr``: the store a staged store replaced, until it is
    deleted."""
    return state_dir(output) / "network-grid.zarr"


def report_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.report.json``: the run report, beside ``OUT.zarr``."""
    return sidecar_path(output, "report.json")


def lock_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.zarr.lock``, beside the output so that ``--overwrite`` cannot delete it."""
    out = Path(output)
    return out.with_name(out.name + ".lock")


def legacy_state_dir(output: str | os.PathLike[str]) -> Path:
    """``OUT.zarr/.tilesegment``: the resume state of outputs written by older versions."""
    return Path(output) / LEGACY_STATE_DIR


def legacy_report_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.zarr/tilesegment-report.json``: the report of outputs written by older versions."""
    return Path(output) / LEGACY_REPORT_NAME


@dataclass(frozen=True, slots=True)
class ChunkFiles:
    """Which files hold a level-0 chunk of a store: one file per chunk (NGFF 0.4) or one per
    shard of ``shard_chunks`` chunks (NGFF 0.5). Picklable."""

    format: str = NGFF_04
    """One of :data:`FORMATS`."""
    shard_chunks: tuple[int, int] = (1, 1)
    """Chunks per shard along (y, x); (1, 1) for NGFF 0.4."""

    def shard_of(self, key: ChunkKey) -> ChunkKey:
        """(row, column) of the shard holding chunk ``key`` (the chunk itself in NGFF 0.4)."""
        return key[0] // self.shard_chunks[0], key[1] // self.shard_chunks[1]

    def files(self, output: str | os.PathLike[str], key: ChunkKey, *, tissue: bool):
        """The files chunk ``key`` lives in: probabilities, mask and (with ``tissue``) the tissue
        label; in NGFF 0.5 the files of its shard, which it shares with its neighbours."""
        out = Path(output)
        names = [MASK, TISSUE] if tissue else [MASK]
        if self.format == NGFF_04:
            i, j = (str(v) for v in key)
            return (out / "0" / "0" / i / j, *(out / LABELS / n / "0" / i / j for n in names))
        i, j = (str(v) for v in self.shard_of(key))
        return (
            out / "0" / "c" / "0" / i / j,
            *(out / LABELS / n / "0" / "c" / i / j for n in names),
        )


def stored_blocks(array_dir: Path) -> set[ChunkKey] | None:
    """(row, column) of every chunk file (NGFF 0.4) or shard file (NGFF 0.5) an array of an
    output holds, from one walk of its folder; None when a file there is not laid out as this
    module writes (callers then read the array to find out).

    Chunk files end in ``ROW/COLUMN`` below the array's folder in both formats (``0/ROW/COL``
    for the probabilities in 0.4, ``c/0/ROW/COL`` in 0.5, ``ROW/COL`` and ``c/ROW/COL`` for
    labels): the metadata files aside, the last two parts of every path are the block.
    """
    blocks: set[ChunkKey] = set()
    for folder, _, names in os.walk(array_dir):
        for name in names:
            if name in (V2_ATTRS, ".zarray", V3_META) or name.startswith("."):
                continue
            parts = Path(folder, name).relative_to(array_dir).parts
            if len(parts) < 2 or not (parts[-2].isdigit() and parts[-1].isdigit()):
                return None
            blocks.add((int(parts[-2]), int(parts[-1])))
    return blocks


def zarr_format_of(path: Path) -> int | None:
    """2 or 3 for a Zarr v2 group or any Zarr v3 node at ``path``, None when it is neither."""
    if (path / V2_GROUP).is_file():
        return 2
    if (path / V3_META).is_file():
        return 3
    return None


def read_attrs(path: Path) -> dict[str, Any] | None:
    """The attributes of a Zarr group at ``path`` (v2 ``.zattrs`` or v3 ``zarr.json``), or None
    when it is not one. NGFF 0.5 metadata stays wrapped under :data:`OME_KEY`."""
    fmt = zarr_format_of(path)
    if fmt is None:
        return None
    try:
        if fmt == 2:
            return json.loads((path / V2_ATTRS).read_text())
        meta = json.loads((path / V3_META).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the attributes of {path}: {exc}") from exc
    if meta.get("node_type") != "group":
        return None
    return dict(meta.get("attributes") or {})
