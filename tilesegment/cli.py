"""The ``tilesegment`` command line. The only place that turns errors into exit codes.

Exit codes (the README states the same contract):

* 0 success;
* 1 a failure during the run that running again can fix: a worker that kept failing, a full
  disk (free space, then ``--resume``);
* 2 bad input or usage, which running the same command again cannot fix: an unreadable slide
  (also when a tile turns out unreadable half-way through the run), an invalid option, a
  missing or broken model, an output that exists without --overwrite or cannot be written
  (read-only filesystem, a path under a regular file);
* 130 (SIGINT) or 143 (SIGTERM) interrupted; finished chunks are recorded: ``--resume``.

Heavy imports (torch, zarr, openslide) happen inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tilesegment import __version__
from tilesegment.destinations import prepare_destination, prepare_folder, write_failure
from tilesegment.errors import (
    ConfigError,
    ModelError,
    SlideReadError,
    StoreError,
    TilesegmentError,
)

if TYPE_CHECKING:
    from tilesegment.batch import BatchItem
    from tilesegment.infer.pipeline import RunOptions, RunSummary

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


@contextlib.contextmanager
def writing(destination: Path, *, then: str) -> Iterator[None]:
    """Turn a full or unwritable filesystem met while writing ``destination`` into one line.

    A full disk is a failure during the run (exit 1: "free space, then ``then``"); a read-only
    or forbidden destination is an input error (exit 2: "choose a writable folder"). Any other
    error passes through unchanged.
    """
    try:
        yield
    except (TilesegmentError, OSError) as exc:
        failure = write_failure(exc, destination)
        if failure is None:
            raise
        kind, message = failure
        if kind == "no space":
            raise RunFailed(f"{message}; free space, then {then}") from exc
        raise InputError(f"{message}; choose a writable folder") from exc


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
@click.argument("slides", nargs=-1, required=True, metavar="SLIDE...")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="OUT.zarr to write; with several slides the folder OUTDIR for OUTDIR/<stem>.zarr.",
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
    help="Skip tiles without tissue: auto (detect; an image with a side under 2048 px is all "
    "tissue), none, or a mask image/Zarr path of the slide's aspect ratio (within 2 %, any "
    "scale; others are refused).",
)
@click.option("--preview/--no-preview", default=True, help="Write OUT.preview.png.")
@click.option(
    "--geojson",
    type=click.Path(path_type=Path),
    help="Also label instances and export them as QuPath GeoJSON (see `tilesegment export`); "
    "with several slides a folder (may be OUTDIR) for <stem>.geojson.",
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
    help="CPU worker processes (default 1, in-process); they split the cores. More than the "
    "usable cores (affinity, cgroup quota) or than available memory allows (~520 MB each) "
    "is capped to that, with a warning.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help=(
        "auto: bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), else fp32; "
        "bf16 (else fp16) on CUDA."
    ),
)
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=None,
    help="torch.compile the model (default: when the run computes >= 2000 tiles; falls back "
    "to eager mode if compiling fails).",
)
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
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Compute on the workers of this dask scheduler (e.g. tcp://host:8786); the output "
    "must be on a filesystem they share. Needs tilesegment[cluster].",
)
@click.option(
    "--dask-workers",
    type=click.IntRange(1, 1024),
    help="Compute on a local dask cluster of N worker processes started for the run. Needs "
    "tilesegment[cluster].",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a tty).")
def run(
    slides: tuple[str, ...],
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
    compile_model: bool | None,
    read_threads: int,
    overwrite: bool,
    resume: bool,
    max_retries: int,
    scheduler: str | None,
    dask_workers: int | None,
    progress: bool | None,
) -> None:
    """Segment SLIDE into the OME-Zarr OUTPUT with a valid U-Net.

    Resumable: a run killed at any point continues with --resume and gives the same bytes.
    Ctrl-C (or SIGTERM) stops after writing the finished chunks (exit code 130 or 143). A JSON
    report is written to OUTPUT/tilesegment-report.json. Exit codes: 0 done; 1 a failure that
    running again can fix (a full disk: free space, then --resume); 2 bad input that it cannot
    (unreadable slide or tile, invalid option, broken model, unwritable output).

    Many slides: give several SLIDEs, quoted shell-style globs ('slides/*.svs', '**' recurses)
    or @LIST (a text file, one path or glob per line, # comments, relative to the list's
    folder). Then -o names a folder OUTDIR that receives OUTDIR/<stem>.zarr per slide (stem:
    the file name without extension), and --geojson a folder for <stem>.geojson (it may be
    OUTDIR). Two slides with the same stem are refused before anything runs. A slide that
    fails is reported in one line and the batch goes on; a summary ends it, with exit code 1
    if any slide failed. Ctrl-C stops the whole batch. With --resume, complete outputs made
    from the same slide file and model are skipped without reading the slide.

    \b
    Examples:
      tilesegment run slide.svs -o out/slide.zarr --geojson out/slide.geojson
      tilesegment run 'slides/*.svs' 'more/*.ndpi' -o out --geojson out
      tilesegment run @slides.txt -o out --resume
    """
    from tilesegment.batch import is_batch
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
        scheduler=scheduler,
        dask_workers=dask_workers,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    if is_batch(slides):
        _run_batch(slides, output, geojson, resolve_model(model_path), opts)
        return
    slide = Path(slides[0])
    if geojson is not None and geojson.is_dir():
        raise click.BadParameter(
            f"{geojson} is a folder; give FILE.geojson", param_hint="'--geojson'"
        )
    # Every destination is checked (and its folder made) before the first tile.
    prepare_destination(output, option="-o")
    if geojson is not None:
        prepare_destination(geojson, option="--geojson")
    with _sigterm_interrupts() as terminated, writing(output, then="run it again with --resume"):
        try:
            summary = run_slide(slide, output, resolve_model(model_path), opts)
        except KeyboardInterrupt as exc:
            click.echo(f"stopped: {output}: {exc or 'interrupted'}", err=True)
            sys.exit(143 if terminated else 130)
    complete_before = bool(summary.extra.get("already_complete"))
    if complete_before:
        click.echo(f"done: {summary.output} was already complete; nothing to resume", err=True)
    else:
        _echo_summary(summary)
    # A resumed complete output still gets the GeoJSON it lacks (as in a batch).
    if geojson is not None and not (complete_before and geojson.exists()):
        with writing(geojson, then="run it again with --resume"):
            _export_instances(output, geojson)


def _echo_summary(summary: RunSummary) -> None:
    """What a finished run did, on stderr: totals, one line per worker, memory, files."""
    h, w = summary.image_shape
    x = summary.extra
    mpp = f"{x['mpp']:.4g} um/px" if x["mpp"] else "unknown um/px"
    tissue = "" if x["tissue_fraction"] is None else f", tissue {x['tissue_fraction']:.1%}"
    if x.get("tissue_found") is False:
        tissue += " (NO TISSUE FOUND)"
    resumed = f", {x['tiles_resumed']} done before" if x["tiles_resumed"] else ""
    # The rate is over the pixels computed, never the image's: skipped tiles cost nothing.
    rate = summary.mpx_per_s
    speed = "no tile computed" if rate is None else f"{rate:.2f} Mpx/s computed"
    click.echo(
        f"done: {summary.output} ({h} x {w} px at {mpp} from level {x['level']}; "
        f"{x['tiles_processed']} of {summary.tiles} tiles of {summary.tile_size[0]} px processed, "
        f"{x['tiles_skipped']} skipped{tissue}{resumed}; {summary.seconds:.1f} s, {speed})",
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


def _export_instances(output: Path, geojson: Path) -> None:
    """Label the instances of a finished ``output`` and write its table and ``geojson``."""
    from tilesegment.postprocess import postprocess_output

    result = postprocess_output(output, geojson=geojson)
    tables = ", ".join(str(t) for t in result.tables)
    click.echo(
        f"instances: {result.instances} in labels/nuclei; GeoJSON {result.geojson}; "
        f"table {tables or 'not written'}",
        err=True,
    )


# --------------------------------------------------------------------------- run: many slides
@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """Turn SIGTERM into KeyboardInterrupt inside the block; yields the signals received."""
    import signal

    received: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_batch_paths(outdir: Path, geojson_dir: Path | None, tissue: str) -> None:
    """Refuse single-slide paths and options in a batch, before anything is read."""
    if outdir.suffix.lower() == ".zarr" or (outdir.exists() and not outdir.is_dir()):
        raise click.UsageError(
            f"-o {outdir}: with several slides -o names a folder that receives <stem>.zarr per "
            "slide; give a folder name such as -o results"
        )
    if geojson_dir is not None and (
        geojson_dir.suffix.lower() in (".geojson", ".json")
        or (geojson_dir.exists() and not geojson_dir.is_dir())
    ):
        raise click.UsageError(
            f"--geojson {geojson_dir}: with several slides --geojson names a folder that "
            "receives <stem>.geojson per slide (it may be the -o folder)"
        )
    if tissue not in ("auto", "none"):
        raise click.UsageError(
            f"--tissue {tissue}: one mask cannot serve several slides; use auto or none, "
            "or run each slide with its own mask"
        )


def _expected_params(model: Path, opts: RunOptions) -> dict[str, Any]:
    """Run parameters a complete output must have been made with, as recorded in its run.json.

    Loads the model once, which also refuses a bad checkpoint or tile size before the first
    slide instead of once per slide.
    """
    from tilesegment.infer.pipeline import resolve_tile_size
    from tilesegment.model.checkpoint import checkpoint_paths, file_sha256, load_checkpoint

    net, _ = load_checkpoint(model, device="cpu")
    tile_size = resolve_tile_size(net, opts.tile_size)
    expected: dict[str, Any] = {
        "model_sha256": file_sha256(checkpoint_paths(model)[0]),
        "dtype": opts.dtype,
        "tissue": opts.tissue,
    }
    if opts.tile_size is not None:  # the default shrinks to fit small images
        expected["tile_size"] = [tile_size, tile_size]
    if opts.level is not None:
        expected["level"] = opts.level
    if opts.precision != "auto":
        expected["precision"] = opts.precision
    return expected


def _run_batch(
    args: tuple[str, ...], outdir: Path, geojson_dir: Path | None, model: Path, opts: RunOptions
) -> None:
    """Run every slide named by ``args`` into ``outdir``; report failures and go on."""
    from tilesegment.batch import expand_slides, plan_batch

    _check_batch_paths(outdir, geojson_dir, opts.tissue)
    items = plan_batch(expand_slides(args), outdir, geojson_dir)
    expected = _expected_params(model, opts)
    prepare_folder(outdir, option="-o")
    if geojson_dir is not None:
        prepare_folder(geojson_dir, option="--geojson")
    failed: list[Path] = []
    n, i = len(items), 0
    with _sigterm_interrupts() as terminated:
        try:
            for i, item in enumerate(items, 1):
                click.echo(f"[{i}/{n}] {item.slide} -> {item.output}", err=True)
                try:
                    _run_item(item, model, opts, expected)
                except Exception as exc:  # reported, counted, and the batch goes on
                    log.debug("%s failed", item.slide, exc_info=True)
                    failed.append(item.slide)
                    click.echo(f"failed: {_describe(exc, item)}", err=True)
        except KeyboardInterrupt as exc:
            click.echo(f"stopped: {items[i - 1].output}: {exc or 'interrupted'}", err=True)
            succeeded = i - 1 - len(failed)
            click.echo(
                f"batch stopped at slide {i} of {n}: {succeeded} succeeded, {len(failed)} "
                f"failed, {n - i + 1} not done (run again with --resume)",
                err=True,
            )
            sys.exit(143 if terminated else 130)
    counts = f"{n - len(failed)} succeeded, {len(failed)} failed"
    if failed:
        click.echo(f"batch: {counts}: {', '.join(map(str, failed))}", err=True)
        sys.exit(1)
    click.echo(f"batch: {counts}", err=True)


def _run_item(item: BatchItem, model: Path, opts: RunOptions, expected: dict[str, Any]) -> None:
    """One slide of a batch: skip it if finished, else run it; then its GeoJSON if asked."""
    from tilesegment.batch import finished
    from tilesegment.infer.pipeline import run_slide

    complete = opts.resume and finished(item, expected)
    if complete:
        click.echo(f"done: {item.output} was already complete; skipped", err=True)
    else:
        summary = run_slide(item.slide, item.output, model, opts)
        complete = bool(summary.extra.get("already_complete"))
        if complete:
            click.echo(f"done: {item.output} was already complete; nothing to resume", err=True)
        else:
            _echo_summary(summary)
    if item.geojson is not None and not (complete and item.geojson.exists()):
        _export_instances(item.output, item.geojson)


_WRITE_ADVICE = {
    "no space": "free space, then rerun with --resume",
    "not writable": "choose a writable folder",
}


def _describe(exc: Exception, item: BatchItem) -> str:
    """One line for a failed slide, starting with its path; unexpected errors name their type."""
    slide = item.slide
    failure = write_failure(exc, item.output)
    if failure is not None:
        kind, message = failure
        message = f"{message}; {_WRITE_ADVICE[kind]}"
    else:
        message = _one_line(exc)
        if not isinstance(exc, TilesegmentError):
            message = f"{type(exc).__name__}: {message} (rerun with --log-level debug for details)"
    return message if message.startswith(str(slide)) else f"{slide}: {message}"


def _register_optional_commands() -> None:
    """Commands defined next to their stage; each module imports only click at top level."""
    from tilesegment.export_cli import export
    from tilesegment.train.cli import evaluate, train

    main.add_command(train)
    main.add_command(evaluate)
    main.add_command(export)


_register_optional_commands()
