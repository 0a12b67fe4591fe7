"""Where everything of an output lives: the only module that knows the chunk keys, file names
and attribute names of ``OUT.zarr`` and of the run state kept beside it.

Layout of ``OUT.zarr`` once :meth:`OutputStore.finalize` has run (``C`` classes, image
``H x W`` px, chunk ``cy x cx`` px; level ``k`` has shape ``ceil(H / 2**k) x ceil(W / 2**k)``)::

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


def chunk_files(output: str | os.PathLike[str], key: ChunkKey, *, tissue: bool) -> tuple[Path, ...]:
    """The files one level-0 chunk occupies: probabilities, mask and (with ``tissue``) the
    tissue label (Zarr v2 keys with ``/`` separators)."""
    out = Path(output)
    i, j = (str(v) for v in key)
    files = [out / "0" / "0" / i / j, out / LABELS / MASK / "0" / i / j]
    if tissue:
        files.append(out / LABELS / TISSUE / "0" / i / j)
    return tuple(files)


def read_zattrs(path: Path) -> dict[str, Any] | None:
    """The ``.zattrs`` of a Zarr v2 group at ``path``, or None when it is not one."""
    if not (path / ".zgroup").is_file():
        return None
    try:
        return json.loads((path / ".zattrs").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the attributes of {path}: {exc}") from exc
