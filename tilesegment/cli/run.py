"""``tilesegment run``: segment one slide, or a batch of them (see :mod:`tilesegment.cli.batch`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from tilesegment.cli.batch import is_batch, run_batch
from tilesegment.cli.exits import Command, writing
from tilesegment.cli.options import (
    device_option,
    dtype_option,
    model_option,
    overwrite_option,
    precision_option,
    progress_option,
    show_progress,
    tile_size_option,
    tta_option,
)
from tilesegment.cli.outcome import echo_summary, export_instances, sigterm_interrupts
from tilesegment.infer.capacity import AUTO_MIN_MPX_PER_WORKER, WORKER_RSS_MB
from tilesegment.infer.options import DEFAULT_TILE_SIZE
from tilesegment.store.layout import FORMATS


class WorkersType(click.ParamType):
    """``--workers``: ``auto`` (None) or a number of CPU worker processes from 1 to 256."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        if value is None or str(value).strip().lower() == "auto":
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither auto nor a whole number", param, ctx)
        if not 1 <= n <= 256:
            self.fail(f"{n} is not in the range 1<=x<=256 (or auto)", param, ctx)
        return n


def _auto_side() -> int:
    """Side in px of the smallest square all-tissue image ``--workers auto`` computes with two
    workers (for the help text)."""
    return int((2 * AUTO_MIN_MPX_PER_WORKER * 1e6) ** 0.5)


def _seconds_option(name: str, default: float, help: str):
    """A ``--NAME SECONDS`` option: a positive number of seconds, its default shown."""
    return click.option(
        name,
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        metavar="SECONDS",
        help=help,
    )


@click.command(cls=Command)
@click.argument("slides", nargs=-1, required=True, metavar="SLIDE...")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="OUT.zarr to write; with several slides the folder OUTDIR for OUTDIR/<stem>.zarr.",
)
@model_option(default="nuclei-he")
@tile_size_option(
    default=None,
    help="Input tile edge in px (a valid U-Net input size; default: the model's size nearest "
    f"{DEFAULT_TILE_SIZE}, less for a small image; on --resume, the size the run began with).",
)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--level",
    type=click.IntRange(0),
    help="Pyramid level to read (default: the coarsest at or finer than the model's um/px, or "
    "than level 0 shrunk by its downsample).",
)
@click.option(
    "--mpp",
    type=click.FloatRange(0, min_open=True),
    help="The slide's um/px, when the file lacks it or states it wrongly. A model with a "
    "downsample F (`tilesegment model info`) shrinks every image by F whatever its um/px: "
    "there --mpp only sets the um/px written with the output (said in a warning).",
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
@dtype_option()
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default=FORMATS[0],
    show_default=True,
    help="ngff-0.4: OME-Zarr 0.4 (Zarr v2), a file per chunk; what QuPath reads. ngff-0.5: "
    "OME-Zarr 0.5 (Zarr v3), the same arrays in shards of ~8192 px, a file per shard (a "
    "100000² px slide: ~730 files instead of ~30500), for very large outputs and cluster "
    "filesystems; each worker then holds one shard of stored values in memory (~260 MB with "
    "2 classes) and records its chunks once the whole shard is written.",
)
@device_option(several=True)
@click.option(
    "--workers",
    type=WorkersType(),
    metavar="auto|N",
    default="auto",
    show_default=True,
    help="CPU worker processes, which split the cores. auto: one single-thread worker per "
    f"usable core (affinity, cgroup quota) when the run computes at least "
    f"{AUTO_MIN_MPX_PER_WORKER:g} Mpx of tissue per worker (a {_auto_side()}² all-tissue "
    f"image on 2 cores) and the available memory holds one worker more than that at "
    f"~{WORKER_RSS_MB} MB each (2 workers on 2 cores: ~1.7 GB in all, in-process 0.4-0.8 GB); "
    "in-process otherwise. 1: in-process. N: N workers, capped to the usable cores and the "
    "memory, with a warning. GPU devices ignore it (one worker per device).",
)
@precision_option(auto=True, default="auto")
@tta_option()
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=None,
    help="torch.compile the model (default: when the run computes >= 300 Mpx; falls back "
    "to eager mode if compiling fails).",
)
@click.option(
    "--read-threads",
    type=click.IntRange(1, 64),
    help="Threads that read and decode tiles, split between worker processes (default: a "
    "quarter of the usable cores, at least 2).",
)
@overwrite_option("output")
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
@_seconds_option(
    "--startup-timeout",
    600,
    "Seconds a worker process may take to start (import torch, load the model, open the "
    "slide) before it is killed and started again, counting as a retry.",
)
@_seconds_option(
    "--stall-timeout",
    900,
    "Seconds a worker process computing a unit of work may report nothing (a hung GPU, "
    "a write stuck on a dead filesystem) before it is killed and the unit retried.",
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
@progress_option()
def run(
    slides: tuple[str, ...],
    output: Path,
    model_path: Path,
    tile_size: int | None,
    batch_size: int,
    level: int | None,
    mpp: float | None,
    tissue: str,
    preview: bool,
    geojson: Path | None,
    dtype: str,
    output_format: str,
    device: str,
    workers: int | None,
    precision: str,
    tta: str,
    compile_model: bool | None,
    read_threads: int | None,
    overwrite: bool,
    resume: bool,
    max_retries: int,
    startup_timeout: float,
    stall_timeout: float,
    scheduler: str | None,
    dask_workers: int | None,
    progress: bool | None,
) -> None:
    """Segment SLIDE into the OME-Zarr OUTPUT with a valid U-Net.

    Resolution: a model declares the um/px it was trained at (the slide is resampled to it and
    the output stored at it), or a downsample F for images without um/px (the network sees
    the image shrunk by F, and the output is brought back to the image's own grid with the
    same kernel, so OUTPUT has the image's size and equals `tilesegment predict`'s mask).

    Resumable: a run killed at any point continues with --resume and gives the same bytes.
    Ctrl-C (or SIGTERM) stops after writing the finished chunks (exit code 130 or 143). A JSON
    report is written beside OUTPUT (OUT.zarr -> OUT.report.json). Exit codes: 0 done; 1 a
    failure that running again can fix (a full disk: free space, then --resume); 2 bad input
    that it cannot (unreadable slide or tile, invalid option, broken model, unwritable output).

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
    from tilesegment.infer.options import RunOptions
    from tilesegment.infer.run import run_slide
    from tilesegment.store.destinations import prepare_destination

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
        format=output_format,
        device=device,
        workers=workers,
        precision=precision,
        tta=tta,
        compile=compile_model,
        read_threads=read_threads,
        resume=resume,
        max_retries=max_retries,
        startup_timeout_s=startup_timeout,
        stall_timeout_s=stall_timeout,
        scheduler=scheduler,
        dask_workers=dask_workers,
        progress=show_progress(progress),
    )
    if is_batch(slides):
        run_batch(slides, output, geojson, model_path, opts)
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
    with sigterm_interrupts() as terminated, writing(output, then="run it again with --resume"):
        try:
            summary = run_slide(slide, output, model_path, opts)
        except KeyboardInterrupt as exc:
            click.echo(f"stopped: {output}: {str(exc) or 'interrupted'}", err=True)
            sys.exit(143 if terminated else 130)
    complete_before = bool(summary.extra.get("already_complete"))
    if complete_before:
        click.echo(f"done: {summary.output} was already complete; nothing to resume", err=True)
    else:
        echo_summary(summary)
    # A resumed complete output still gets the GeoJSON it lacks (as in a batch).
    if geojson is not None and not (complete_before and geojson.exists()):
        with writing(geojson, then="run it again with --resume"):
            export_instances(output, geojson)
