"""The ``tilesegment`` command line. The only place that turns errors into exit codes.

Exit codes: 0 success; 1 runtime failure (a worker or the store failed mid-run); 2 bad input or
usage (unreadable slide, invalid tile size, missing model, existing output without --overwrite).
Heavy imports (torch, zarr, openslide) happen inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from tilesegment import __version__
from tilesegment.errors import (
    ConfigError,
    ModelError,
    SlideReadError,
    StoreError,
    TilesegmentError,
)

log = logging.getLogger("tilesegment")

#: Errors caused by what the user passed in: exit code 2, like click's usage errors.
_INPUT_ERRORS = (SlideReadError, ConfigError, ModelError, StoreError)


class InputError(click.ClickException):
    """A one-line error about the user's input; exit code 2."""

    exit_code = 2


class RunFailed(click.ClickException):
    """A one-line error about a failure during a run; exit code 1."""

    exit_code = 1


class _Group(click.Group):
    """Turns tilesegment's errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _INPUT_ERRORS as exc:
            raise InputError(_one_line(exc)) from exc
        except TilesegmentError as exc:
            raise RunFailed(_one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tilesegment")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="Verbosity of diagnostics on stderr.",
)
def main(log_level: str) -> None:
    """Seamless valid U-Net segmentation of whole-slide images into OME-Zarr."""
    logging.basicConfig(
        level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# --------------------------------------------------------------------------- info
@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(slide: Path, as_json: bool) -> None:
    """Show levels, resolution and format of SLIDE without reading its pixels."""
    from tilesegment.io import open_slide

    with open_slide(slide) as reader:
        i = reader.info
    doc = {
        "path": str(i.path),
        "backend": i.backend,
        "vendor": i.vendor,
        "channels": i.channels,
        "mpp": list(i.mpp) if i.mpp else None,
        "levels": [
            {"level": k, "height": s[0], "width": s[1], "downsample": d}
            for k, (s, d) in enumerate(zip(i.level_shapes, i.level_downsamples, strict=True))
        ],
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    mpp = f"{i.mpp[0]:.4g} x {i.mpp[1]:.4g} um/px (y, x)" if i.mpp else "unknown"
    click.echo(f"{i.path}\n  format   {i.vendor} (via {i.backend})")
    click.echo(f"  channels {i.channels}\n  mpp      {mpp}\n  levels")
    for lv in doc["levels"]:
        click.echo(
            f"    {lv['level']}: {lv['height']} x {lv['width']} (h x w), "
            f"downsample {lv['downsample']:.4g}"
        )


# --------------------------------------------------------------------------- model
@main.group()
def model() -> None:
    """Create and inspect model checkpoints (NAME.safetensors + NAME.json)."""


@model.command("init")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--depth", type=click.IntRange(1, 7), default=4, show_default=True)
@click.option("--base-channels", type=click.IntRange(1), default=64, show_default=True)
@click.option("--in-channels", type=click.Choice(["1", "3"]), default="3", show_default=True)
@click.option("--classes", type=click.IntRange(2), default=2, show_default=True)
@click.option("--batch-norm/--no-batch-norm", default=False, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--upsampling", type=click.Choice(["transpose", "bilinear"]), default="transpose")
@click.option("--mpp", type=click.FloatRange(0, min_open=True), help="um/px the model expects.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint.")
def model_init(
    out: Path,
    depth: int,
    base_channels: int,
    in_channels: str,
    classes: int,
    batch_norm: bool,
    dropout: float,
    upsampling: str,
    mpp: float | None,
    seed: int,
    overwrite: bool,
) -> None:
    """Write a freshly initialised checkpoint OUT.safetensors + OUT.json."""
    from tilesegment.model import ModelSpec, UNetConfig, checkpoint_paths, new_model
    from tilesegment.model import save_checkpoint as save

    weights, config = checkpoint_paths(out)
    if not overwrite and (weights.exists() or config.exists()):
        raise InputError(f"{config} already exists; pass --overwrite to replace it")
    cfg = UNetConfig(
        depth=depth,
        base_channels=base_channels,
        in_channels=int(in_channels),
        classes=classes,
        batch_norm=batch_norm,
        dropout=dropout,
        upsampling=upsampling,  # type: ignore[arg-type]
    )
    spec = ModelSpec.default(cfg, name=weights.stem, mpp=mpp)
    spec = dataclasses.replace(spec, training={"init": "random", "seed": seed})
    net = new_model(spec, seed=seed)
    w, c = save(net, spec, out)
    n_params = sum(p.numel() for p in net.parameters())
    click.echo(
        f"wrote {c} and {w.name}: depth {depth}, {base_channels} base channels, "
        f"{n_params / 1e6:.2f} M parameters, halo {net.halo} px, valid inputs "
        f"{net.valid_input_sizes(1)[0]} + {net.pooling}k"
    )


# --------------------------------------------------------------------------- run
@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="OUT.zarr to write."
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Checkpoint NAME (or NAME.json / NAME.safetensors).",
)
@click.option("--tile-size", type=click.IntRange(1), help="Input tile edge in px (valid size).")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--level", type=click.IntRange(0), default=0, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["uint8", "float32"]),
    default="uint8",
    show_default=True,
    help="Stored probability type.",
)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda:0.")
@click.option("--read-threads", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
def run(
    slide: Path,
    output: Path,
    model_path: Path,
    tile_size: int | None,
    batch_size: int,
    level: int,
    dtype: str,
    device: str,
    read_threads: int,
    overwrite: bool,
    progress: bool | None,
) -> None:
    """Segment SLIDE into the OME-Zarr OUTPUT with a valid U-Net."""
    from tilesegment.infer.pipeline import RunOptions, run_slide

    opts = RunOptions(
        tile_size=tile_size,
        batch_size=batch_size,
        level=level,
        overwrite=overwrite,
        dtype=dtype,
        device=device,
        read_threads=read_threads,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    summary = run_slide(slide, output, model_path, opts)
    h, w = summary.image_shape
    click.echo(
        f"done: {summary.output} ({h} x {w} px, {summary.tiles} tiles of "
        f"{summary.tile_size[0]} px, {summary.seconds:.1f} s, {summary.mpx_per_s:.2f} Mpx/s)",
        err=True,
    )
