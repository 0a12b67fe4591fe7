"""The pixels a run segments: the pyramid level and resampling that meet the model's µm/px, and
the tissue map that says which tiles to skip."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tilesegment.errors import ConfigError
from tilesegment.infer.options import RunOptions
from tilesegment.io import SlideReader
from tilesegment.model.checkpoint import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """The pixels a run segments: a reader view at the model's resolution."""

    reader: SlideReader
    """Reader to take tiles from (level ``level``); may be a resampled view."""
    level: int
    """Level of ``reader`` to read."""
    source_level: int
    """Pyramid level of the slide the pixels come from."""
    image_shape: tuple[int, int]
    """(h, w) of the segmented image."""
    mpp: tuple[float, float] | None
    """µm/px of the segmented image, None when unknown."""
    level0_per_px: float
    """Level-0 slide px per segmented px (for coordinates exported in level-0 frame)."""
    slide_mpp: float | None = None
    """The µm/px taken for the slide's level 0 (the file's, ``--mpp`` or the model's)."""


def open_source(reader: SlideReader, spec: ModelSpec, opts: RunOptions) -> Source:
    """Pick the level to read and, when the model declares a µm/px, resample to it."""
    from tilesegment.io.resample import MPP_TOLERANCE, ResampledReader, choose_level

    info = reader.info
    name = info.path.name
    if opts.level is not None and not 0 <= opts.level < info.level_count:
        raise ConfigError(
            f"--level {opts.level} out of range: {name} has levels 0..{info.level_count - 1}"
        )
    base = opts.mpp if opts.mpp is not None else (info.mpp[1] if info.mpp else None)
    if base is None and spec.mpp is not None:
        log.warning(
            "%s has no µm/px; taking it to be at the model's %.4g µm/px (pass --mpp to state it)",
            name,
            spec.mpp,
        )
        base = spec.mpp
    if spec.mpp is None or base is None:
        level = opts.level or 0
        ds = info.level_downsamples[level]
        mpp = None if base is None else (base * ds, base * ds)
        return Source(reader, level, level, info.level_shapes[level], mpp, ds, base)
    level = choose_level(info, spec.mpp, mpp=base) if opts.level is None else opts.level
    ds = info.level_downsamples[level]
    level_mpp = base * ds
    if abs(level_mpp / spec.mpp - 1) <= MPP_TOLERANCE:
        shape = info.level_shapes[level]
        return Source(reader, level, level, shape, (level_mpp, level_mpp), ds, base)
    view = ResampledReader(reader, level, source_mpp=level_mpp, target_mpp=spec.mpp)
    log.info(
        "%s: resampling level %d (%.4g µm/px) to the model's %.4g µm/px",
        name,
        level,
        level_mpp,
        spec.mpp,
    )
    return Source(view, 0, level, view.info.shape, (spec.mpp, spec.mpp), spec.mpp / base, base)


def tissue_map(reader: SlideReader, source: Source, tissue: str, preview: bool):
    """The tissue map for this run (None = process everything) and the thumbnail, read only
    when tissue detection or the preview needs it."""
    from tilesegment.tissue import TissueMap, detect_tissue, load_tissue_mask, read_thumbnail

    thumbnail = read_thumbnail(reader)[0] if preview or tissue == "auto" else None
    if tissue == "none":
        return None, thumbnail
    mask = detect_tissue(thumbnail) if tissue == "auto" else load_tissue_mask(Path(tissue))
    return TissueMap(mask, source.image_shape), thumbnail
