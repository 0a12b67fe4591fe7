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


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def models_cmd(as_json: bool) -> None:
    """List the models shipped with tilesegment (usable as `run --model NAME`)."""
    from tilesegment.model.registry import DEFAULT_MODEL, shipped_models

    found = shipped_models()
    if as_json:
        doc = [
            {"name": m.name, "path": str(m.path), "mpp": m.mpp, "classes": list(m.classes)}
            for m in found
        ]
        click.echo(json.dumps(doc, indent=2))
        return
    if not found:
        click.echo("no models are shipped with this installation")
    for m in found:
        mark = " (default)" if m.name == DEFAULT_MODEL else ""
        mpp = f"{m.mpp:g} um/px" if m.mpp else "any um/px"
        click.echo(f"{m.name}{mark}: {', '.join(m.classes)}; {mpp}. {m.summary}")


# --------------------------------------------------------------------------- run
@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="OUT.zarr to write."
)
@click.option(
    "--model",
    "model_path",
    default="nuclei-he",
    show_default=True,
    help="A shipped model name (see `tilesegment models`) or a checkpoint path.",
)
@click.option("--tile-size", type=click.IntRange(1), help="Input tile edge in px (valid size).")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--level",
    type=click.IntRange(0),
    help="Pyramid level to read (default: the coarsest at or finer than the model's um/px).",
)
@click.option(
    "--mpp",
    type=click.FloatRange(0, min_open=True),
    help="The slide's um/px, when the file lacks it or states it wrongly.",
)
@click.option(
    "--tissue",
    default="auto",
    show_default=True,
    help="Skip tiles without tissue: auto (detect), none, or a mask image/Zarr path.",
)
@click.option("--preview/--no-preview", default=True, help="Write OUT.preview.png.")
@click.option(
    "--geojson",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also label instances and export them as QuPath GeoJSON (see `tilesegment export`).",
)
@click.option(
    "--dtype",
    type=click.Choice(["uint8", "float32"]),
    default="uint8",
    show_default=True,
    help="Stored probability type.",
)
@click.option(
    "--devices",
    "--device",
    "device",
    default="cpu",
    show_default=True,
    help="cpu, cuda:0, cuda:0,cuda:1 (one worker process per device) or auto (all GPUs, "
    "else the CPU).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    help="CPU worker processes (default 1, in-process); they split the cores.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="auto: fp32 on the CPU, bf16 (else fp16) on CUDA.",
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--read-threads", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted OUTPUT, skipping its finished chunks (or start it if absent).",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, 100),
    default=2,
    show_default=True,
    help="Retries of a unit of work whose worker died or raised.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
def run(
    slide: Path,
    output: Path,
    model_path: str,
    tile_size: int | None,
    batch_size: int,
    level: int | None,
    mpp: float | None,
    tissue: str,
    preview: bool,
    geojson: Path | None,
    dtype: str,
    device: str,
    workers: int | None,
    precision: str,
    compile_model: bool,
    read_threads: int,
    overwrite: bool,
    resume: bool,
    max_retries: int,
    progress: bool | None,
) -> None:
    """Segment SLIDE into the OME-Zarr OUTPUT with a valid U-Net.

    Resumable: a run killed at any point continues with --resume and gives the same bytes.
    Ctrl-C (or SIGTERM) stops after writing the finished chunks (exit code 130 or 143). A JSON
    report is written to OUTPUT/tilesegment-report.json.
    """
    import signal

    from tilesegment.infer.pipeline import RunOptions, run_slide
    from tilesegment.model.registry import resolve_model

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other; pass one")
    opts = RunOptions(
        tile_size=tile_size,
        batch_size=batch_size,
        level=level,
        mpp=mpp,
        tissue=tissue,
        preview=preview,
        overwrite=overwrite,
        dtype=dtype,
        device=device,
        workers=workers,
        precision=precision,
        compile=compile_model,
        read_threads=read_threads,
        resume=resume,
        max_retries=max_retries,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    terminated = []

    def on_sigterm(signum: int, frame: Any) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        summary = run_slide(slide, output, resolve_model(model_path), opts)
    except KeyboardInterrupt as exc:
        click.echo(f"stopped: {output}: {exc or 'interrupted'}", err=True)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    h, w = summary.image_shape
    x = summary.extra
    if x.get("already_complete"):
        click.echo(f"done: {summary.output} was already complete; nothing to resume", err=True)
        return
    mpp = f"{x['mpp']:.4g} um/px" if x["mpp"] else "unknown um/px"
    tissue = "" if x["tissue_fraction"] is None else f", tissue {x['tissue_fraction']:.1%}"
    resumed = f", {x['tiles_resumed']} done before" if x["tiles_resumed"] else ""
    click.echo(
        f"done: {summary.output} ({h} x {w} px at {mpp} from level {x['level']}; "
        f"{x['tiles_processed']} of {summary.tiles} tiles of {summary.tile_size[0]} px processed, "
        f"{x['tiles_skipped']} skipped{tissue}{resumed}; {summary.seconds:.1f} s, "
        f"{summary.mpx_per_s:.2f} Mpx/s)",
        err=True,
    )
    for d in x["devices"]:
        rate = f"{d['mpx_per_s']:.2f} Mpx/s" if d["mpx_per_s"] else "idle"
        restarts = f", {d['restarts']} restarts" if d["restarts"] else ""
        click.echo(
            f"  worker {d['worker']}: {d['device']} {d['precision']} x{d['threads']} threads, "
            f"{d['tiles']} tiles, {rate}{restarts}",
            err=True,
        )
    rss = x["peak_rss_mb"]
    workers_rss = f", workers {rss['workers']:.0f} MB" if rss["workers"] else ""
    click.echo(f"  peak RSS: main {rss['main']:.0f} MB{workers_rss}", err=True)
    click.echo(f"report: {x['report_path']}", err=True)
    if x["preview"]:
        click.echo(f"preview: {x['preview']}", err=True)
    if geojson is not None:
        from tilesegment.postprocess import postprocess_output

        result = postprocess_output(output, geojson=geojson)
        tables = ", ".join(str(t) for t in result.tables)
        click.echo(
            f"instances: {result.instances} in labels/nuclei; GeoJSON {result.geojson}; "
            f"table {tables or 'not written'}",
            err=True,
        )


def _register_optional_commands() -> None:
    """Commands defined next to their stage; each module imports only click at top level."""
    from tilesegment.export_cli import export
    from tilesegment.train.cli import evaluate, train

    main.add_command(train)
    main.add_command(evaluate)
    main.add_command(export)


_register_optional_commands()
