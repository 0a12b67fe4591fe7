"""The pixels a run segments: the pyramid level and resampling that meet the model's µm/px, and
the tissue map that says which tiles to skip."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    downsample: float | None = None
    """The model's declared downsample (image px per network px), None for other models."""
    home_shape: tuple[int, int] | None = None
    """(h, w) of the slide's level 0, the grid a downsample model's outputs are brought back
    to; None for other models, whose run output stays on this source's grid."""

    @property
    def home_mpp(self) -> tuple[float, float] | None:
        """µm/px of the slide's level 0, None when unknown."""
        return None if self.slide_mpp is None else (self.slide_mpp, self.slide_mpp)


def open_source(reader: SlideReader, spec: ModelSpec, opts: RunOptions) -> Source:
    """Pick the level to read and, when the model declares a µm/px or a downsample, resample
    to it.

    A downsample model is scaled by pixels: its grid is level 0 shrunk by ``F`` whatever the
    slide's µm/px, reached by the path of µm/px models with a *virtual* level-0 µm/px of 1 and
    a target of ``F``. The slide's real µm/px (the file's or ``--mpp``) then only labels the
    output.
    """
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
    real = base  # the slide's µm/px, for the output's metadata
    target = spec.mpp
    if spec.downsample is not None:
        base, target = 1.0, spec.downsample
    if target is None or base is None:
        level = opts.level or 0
        ds = info.level_downsamples[level]
        mpp = None if base is None else (base * ds, base * ds)
        return Source(reader, level, level, info.level_shapes[level], mpp, ds, base)
    level = choose_level(info, target, mpp=base) if opts.level is None else opts.level
    ds = info.level_downsamples[level]
    level_mpp = base * ds
    if abs(level_mpp / target - 1) <= MPP_TOLERANCE:
        view, shape, read_level, grid_mpp = reader, info.level_shapes[level], level, level_mpp
    else:
        view = ResampledReader(reader, level, source_mpp=level_mpp, target_mpp=target)
        shape, read_level, grid_mpp = view.info.shape, 0, target
        if spec.downsample is None:
            log.info(
                "%s: resampling level %d (%.4g µm/px) to the model's %.4g µm/px",
                name,
                level,
                level_mpp,
                target,
            )
        else:
            log.info(
                "%s: resampling level %d by 1/%.4g for the model's downsample %g",
                name,
                level,
                view.scale,
                target,
            )
    per_px = grid_mpp / base
    if spec.downsample is None:
        return Source(view, read_level, level, shape, (grid_mpp, grid_mpp), per_px, base)
    mpp = None if real is None else (real * per_px, real * per_px)
    home = info.level_shapes[0]
    return Source(view, read_level, level, shape, mpp, per_px, real, spec.downsample, home)


def mpp_note(spec: ModelSpec, mpp: float | None) -> str | None:
    """What ``--mpp`` does on a downsample model (None when there is nothing to say): the
    scale is the model's downsample whatever the image's µm/px; the value only labels the
    output's µm/px."""
    if spec.downsample is None or mpp is None:
        return None
    return (
        f"--mpp {mpp:g} does not change the scale: model {spec.name!r} shrinks every image by "
        f"its downsample {spec.downsample:g}; it only sets the µm/px written with the output"
    )


def home_source(reader: SlideReader, source: Source) -> Source:
    """The slide's level 0 as a :class:`Source`: the grid a downsample model's outputs are
    brought back to (``source`` itself for other models)."""
    if source.home_shape is None:
        return source
    return Source(reader, 0, 0, source.home_shape, source.home_mpp, 1.0, source.slide_mpp)


def user_tissue_mask(reader: SlideReader, tissue: str) -> Any:
    """The user's ``--tissue MASK`` (None for auto or none), checked against the slide's
    aspect ratio before the run takes its output."""
    from tilesegment.tissue import load_tissue_mask

    if tissue in ("auto", "none"):
        return None
    return load_tissue_mask(Path(tissue), reader.info)


def tissue_map(
    reader: SlideReader, source: Source, opts: RunOptions, *, user_mask: Any = None
) -> tuple[Any, Any, dict[str, Any]]:
    """(tissue map, thumbnail, how the map was made) for this run. The map is None when every
    tile is computed; the thumbnail is read only when tissue detection or the preview needs it.
    Warns when the map holds no tissue at all."""
    from tilesegment.tissue import TissueMap, auto_tissue, read_thumbnail

    tissue = opts.tissue
    thumbnail = read_thumbnail(reader)[0] if opts.preview or tissue == "auto" else None
    if tissue == "none":
        return None, thumbnail, {"mode": "none", "how": "every tile is computed", "fraction": None}
    if tissue == "auto":
        mask, how = auto_tissue(thumbnail, reader.info.shape)
    else:
        mask, how = user_mask, f"the mask {Path(tissue).name}"
    tmap = TissueMap(mask, source.image_shape)
    record = {"mode": "auto" if tissue == "auto" else "mask", "how": how}
    record.update(fraction=round(tmap.fraction, 6), found=tmap.found)
    if not tmap.found:
        log.warning(
            "%s: NO TISSUE FOUND (%s): no tile is computed and the output is all background; "
            "pass --tissue none to segment every tile",
            reader.info.path.name,
            how,
        )
    return tmap, thumbnail, record
