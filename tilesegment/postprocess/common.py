"""What every post-processing step shares: opening a finished store, reading its foreground
chunk by chunk, thread pools that keep results in order, and the level-0 frame."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from scipy import ndimage

from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.machine import cores_up_to
from tilesegment.store import OutputStore

logger = logging.getLogger(__name__)

#: Name of the instance label written by :func:`~tilesegment.postprocess.label_instances`.
DEFAULT_LABEL = "nuclei"

#: Instances smaller than this (µm², or px when the mpp is unknown) are removed by default:
#: about a disc of 3.6 µm diameter, well below any nucleus.
DEFAULT_MIN_AREA_UM2 = 10.0

#: How instances are made: ``components`` of one class, ``seeded`` growth of interior seeds
#: (:mod:`tilesegment.postprocess.seeded`), or ``auto``: seeded when the store's model declares
#: interior and boundary classes (its ``instances`` attribute), components otherwise.
Method = Literal["auto", "components", "seeded"]
METHODS: tuple[str, ...] = ("auto", "components", "seeded")

STRUCTURES = {
    4: ndimage.generate_binary_structure(2, 1),
    8: ndimage.generate_binary_structure(2, 2),
}


@dataclass(frozen=True, slots=True)
class InstanceOptions:
    """How instances are made from a finished store (shared by every post-processing step)."""

    class_id: int = 1
    """Foreground is ``labels/mask == class_id`` (also the probability measured)."""
    min_area_um2: float = DEFAULT_MIN_AREA_UM2
    """Instances smaller than this are removed; in px when the store's mpp is unknown."""
    threshold: float | None = None
    """In (0, 1]: use ``probability[class_id] >= threshold`` instead of the argmax mask."""
    connectivity: int = 4
    """4 or 8; 4 keeps the model's 1 px separation borders meaningful."""
    label: str = DEFAULT_LABEL
    """Name of the instance label; an existing label of that name is replaced."""
    threads: int | None = None
    """Chunks processed in parallel (default: up to 4)."""
    method: Method = "auto"
    """``auto``, ``components`` or ``seeded`` (see :data:`Method`); ``threshold`` and
    ``connectivity`` 8 apply to components only."""

    def __post_init__(self) -> None:
        check_connectivity(self.connectivity)
        if self.method not in METHODS:
            raise ConfigError(f"`method` ({self.method!r}) must be one of {', '.join(METHODS)}")
        if self.method == "seeded" and (self.threshold is not None or self.connectivity != 4):
            raise ConfigError(
                "`threshold` and `connectivity` 8 apply to the components method; seeded "
                "instances read the class map with 4-connectivity"
            )
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ConfigError(f"`threshold` ({self.threshold}) must lie in (0, 1]")
        if not (math.isfinite(self.min_area_um2) and self.min_area_um2 >= 0):
            raise ConfigError(f"`min_area_um2` ({self.min_area_um2}) must be a number >= 0")
        default_threads(self.threads)


def min_area_px(min_area_um2: float, mpp: tuple[float, float] | None) -> float:
    """``min_area_um2`` in px of an image at ``mpp`` (y, x) µm/px; taken in px when unknown.

    >>> min_area_px(10.0, (0.5, 0.5)), min_area_px(10.0, None)
    (40.0, 10.0)
    """
    if mpp is None:
        return float(min_area_um2)
    return min_area_um2 / (mpp[0] * mpp[1])


_T = TypeVar("_T")
_R = TypeVar("_R")


def default_threads(threads: int | None) -> int:
    if threads is None:
        return cores_up_to(4)
    if threads < 1:
        raise ConfigError(f"`threads` ({threads}) must be >= 1")
    return int(threads)


def ordered_map(
    fn: Callable[[_T], _R], items: Iterable[_T], threads: int
) -> Generator[_R, None, None]:
    """``map(fn, items)`` on ``threads`` threads, in order, with at most ``2 * threads``
    results pending so memory stays bounded whatever the number of items."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def chunk_rows(image_shape: tuple[int, int], chunk_shape: tuple[int, int]) -> list[list[Box]]:
    """The chunk grid as rows of boxes (clipped to the image), row-major."""
    (h, w), (cy, cx) = image_shape, chunk_shape
    if h < 1 or w < 1 or cy < 1 or cx < 1:
        raise ConfigError(
            f"`image_shape` ({image_shape}) and `chunk_shape` ({chunk_shape}) must be positive"
        )
    return [
        [Box(y, x, min(cy, h - y), min(cx, w - x)) for x in range(0, w, cx)]
        for y in range(0, h, cy)
    ]


def check_connectivity(connectivity: int) -> None:
    if connectivity not in STRUCTURES:
        raise ConfigError(f"`connectivity` ({connectivity}) must be 4 or 8")


def incomplete_message(path: Path) -> str:
    return (
        f"{path} is incomplete (the run did not finish); re-run `tilesegment run SLIDE -o {path}` "
        "with --resume to finish it, or with --overwrite to start again"
    )


def open_finished(path: str | os.PathLike[str], *, label: str, writable: bool) -> OutputStore:
    """Open a finished store; an export interrupted while writing ``label`` counts as finished
    when ``writable`` (the label is recomputed)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist; run `tilesegment run SLIDE -o {path}` first")
    store = OutputStore.open(path, mode="r+" if writable else "r")
    if store.is_complete():
        return store
    others_final = all(store.label_state(n) == "final" for n in store.label_names if n != label)
    if store.image_finalised and others_final and store.label_state(label) == "pending":
        if writable:
            logger.warning("%s: labels/%s was left unfinished; recomputing it", path, label)
            return store
        raise StoreError(
            f"labels/{label} of {path} was left unfinished by an interrupted export; re-run "
            f"`tilesegment export {path} --instances`"
        )
    raise StoreError(incomplete_message(path))


def foreground_reader(
    store: OutputStore, class_id: int, threshold: float | None
) -> Callable[[Box], np.ndarray]:
    if threshold is None:
        mask = store.mask
        return lambda box: mask[box.slices] == class_id
    probs = store.probabilities
    level = threshold * (255.0 if store.dtype == "uint8" else 1.0)
    return lambda box: probs[(class_id, *box.slices)] >= level


def check_class(store: OutputStore, class_id: int) -> None:
    if not 0 <= class_id < len(store.classes):
        raise ConfigError(
            f"`class_id` ({class_id}) must name one of the {len(store.classes)} classes "
            f"{store.classes.names} (0..{len(store.classes) - 1})"
        )


def level0_per_px(store: OutputStore, downsample: float | None) -> tuple[float, float]:
    """(y, x) level-0 px per store px: ``downsample``, else attrs["level0_per_px"], else 1."""
    if downsample is not None:
        value: Any = downsample
        source = "`downsample`"
    else:
        attrs = store.attrs
        value = attrs.get("level0_per_px")
        source = f"the `level0_per_px` attribute of {store.path}"
        if value is None:
            if attrs.get("level", 0) not in (0, None):
                logger.warning(
                    "%s was made from level %s but records no level0_per_px; GeoJSON "
                    "coordinates are in that level's px (pass a downsample to fix)",
                    store.path,
                    attrs["level"],
                )
            return 1.0, 1.0
    pair = list(value) if isinstance(value, list | tuple) else [value, value]
    try:
        dy, dx = (float(v) for v in pair)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source} ({value!r}) must be a number or [y, x]") from exc
    if not (math.isfinite(dy) and math.isfinite(dx) and dy > 0 and dx > 0):
        raise ConfigError(f"{source} ({value!r}) must be positive")
    return dy, dx
