"""The run: :func:`run_slide` takes the output's lock, creates or reopens it, plans the work,
hands the plan to an executor, then finalises the store and writes the report.

Data flows through the rooms of :mod:`tilesegment.infer` in this order: :mod:`~.options`
(what to do), :mod:`~.source` (which pixels), :mod:`~.plan` (tiles, chunks, units),
:mod:`~.executors` (who computes: here, a worker pool or dask), each running :mod:`~.stream`
(read → predict → assemble → write) per unit, :mod:`~.record` (each written chunk made durable
in the done log), :mod:`~.report` (what the run did). A killed run resumes with
``resume=True`` and produces the same bytes.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tilesegment import __version__
from tilesegment.errors import ConfigError, ModelError, SlideReadError, TilesegmentError
from tilesegment.geometry import TileGrid
from tilesegment.infer.capacity import WorkersChoice, auto_workers
from tilesegment.infer.devices import (
    reset_peak_rss,
    resolve_devices,
    resolve_precision,
    tune_malloc,
)
from tilesegment.infer.executors.base import Executor, RunContext
from tilesegment.infer.identity import IDENTITY_KEYS, SlideIdentity, check_identity, identify
from tilesegment.infer.options import (
    RunOptions,
    check_options,
    default_read_threads,
    resolve_compile,
    tta_param,
)
from tilesegment.infer.plan import (
    WorkPlan,
    plan_grid,
    plan_work,
    resolve_tile_size,
    shard_chunks,
    tiles_per_chunk,
    tiles_to_compute,
)
from tilesegment.infer.record import Recorder
from tilesegment.infer.report import RunRecord, RunSummary, write_report
from tilesegment.infer.source import (
    Source,
    home_source,
    mpp_note,
    open_source,
    tissue_map,
    user_tissue_mask,
)
from tilesegment.io import SlideReader, open_slide
from tilesegment.machine import available_memory_mb, usable_cores
from tilesegment.model.checkpoint import ModelSpec, checkpoint_paths, file_sha256, load_checkpoint
from tilesegment.model.unet import UNet
from tilesegment.store import ClassSpec, OutputStore, is_complete
from tilesegment.store.layout import NGFF_04, TISSUE, sidecar_path
from tilesegment.store.resume import (
    DoneLog,
    RunLock,
    adopt_legacy_state,
    check_params,
    read_record,
    remove_partial_files,
    reset_state,
    write_params,
)

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after flushing its finished chunks; resumable.

    Still a :class:`KeyboardInterrupt`; its message says how far the run got.
    """


def preview_path(output: str | Path) -> Path:
    """``OUT.preview.png`` beside ``OUT.zarr``."""
    return sidecar_path(output, "preview.png")


def run_slide(
    slide: str | Path,
    output: str | Path,
    model: str | Path,
    options: RunOptions | None = None,
) -> RunSummary:
    """Segment ``slide`` with the checkpoint ``model`` into the OME-Zarr ``output``.

    The output is marked complete only after every chunk, pyramid level and metadata document is
    written; any failure leaves it visibly incomplete (see :mod:`tilesegment.store`) and
    resumable with ``resume=True``. A JSON report is written into the output either way.

    Raises
    ------
    StoreError
        Another run holds ``output`` (its lock names it), or the output cannot be written.
    RunInterrupted
        SIGINT (KeyboardInterrupt) arrived; finished chunks were flushed and recorded.
    WorkerError
        Tiles still failed after ``max_retries`` retries on the worker pool.
    """
    opts = options or RunOptions()
    check_options(opts)
    if opts.read_threads is None:
        opts = replace(opts, read_threads=default_read_threads(usable_cores()))
    tune_malloc()  # flat peak RSS whatever the slide size (see the function)
    reset_peak_rss()  # the report's peak is this run's, not an earlier run's in this process
    run = RunRecord.start()
    run.tta = opts.tta
    net, spec = load_checkpoint(model, device="cpu")
    tile_size = resolve_tile_size(net.geometry, opts.tile_size or _started_with(output, opts))
    devices = resolve_devices(opts.device, opts.workers)
    precisions = sorted({resolve_precision(opts.precision, d) for d in devices})
    if opts.in_process and len(devices) > 1:
        raise ConfigError("several devices or workers need worker processes (in_process=False)")
    with open_slide(slide) as reader:
        source = open_source(reader, spec, opts)
        if (note := mpp_note(spec, opts.mpp)) is not None:
            log.warning("%s", note)
        grid = plan_grid(source.image_shape, net.geometry, tile_size)
        tissue_mask = user_tissue_mask(reader, opts.tissue)
        # Inputs are valid: take the output before reading anything slow.
        with RunLock(output):
            job = _Job(
                slide=Path(slide),
                model=Path(model),
                output=Path(output),
                opts=opts,
                reader=reader,
                source=source,
                grid=grid,
                net=net,
                spec=spec,
                devices=devices,
                precisions=precisions,
                tissue_mask=tissue_mask,
            )
            return _run_locked(job, run)


def _started_with(output: str | Path, opts: RunOptions) -> int | None:
    """On ``--resume`` without ``--tile-size``, the tile size the run was started with (so a
    run started under an older default resumes); otherwise None (the default)."""
    if not opts.resume:
        return None
    try:
        record = read_record(Path(output))
    except TilesegmentError:
        return None  # the resume check reports the unreadable record
    tile = None if record is None else record[0].get("tile_size")
    if isinstance(tile, list) and tile and all(isinstance(t, int) for t in tile):
        # The larger side: a side shrunk to fit a small image shrinks again the same way.
        return max(tile)
    return None


@dataclass(frozen=True, slots=True)
class _Job:
    """The validated inputs of a run."""

    slide: Path
    model: Path
    output: Path
    opts: RunOptions
    reader: SlideReader
    source: Source
    grid: TileGrid
    net: UNet
    spec: ModelSpec
    devices: list[str]
    """One entry per worker process the options ask for (``["cpu"]`` for ``--workers auto``,
    decided once the work is planned: :func:`_choose_workers`)."""
    precisions: list[str]
    tissue_mask: Any = None
    """The user's ``--tissue MASK`` as a boolean array (None for auto or none)."""


def _run_params(
    job: _Job, slide: SlideIdentity, chunk_shape: tuple[int, int], run: RunRecord
) -> tuple[dict, dict, dict]:
    """(params, attrs, info) of a run: what decides the output's bytes (checked on resume), the
    provenance stored in the output's attributes, and what may change between attempts."""
    opts, source, grid = job.opts, job.source, job.grid
    model_sha = file_sha256(checkpoint_paths(job.model)[0])
    params = {
        **slide.params(),  # name, bytes and content fingerprint: checked on --resume
        "image_shape": list(source.image_shape),
        "level": source.source_level,
        "mpp": None if source.mpp is None else list(source.mpp),
        "model_sha256": model_sha,
        "tile_size": list(grid.input_shape),
        "stride": list(grid.stride),
        "halo": grid.halo,
        "chunk_shape": list(chunk_shape),
        "tissue": _tissue_param(opts.tissue),
        "dtype": opts.dtype,
        "precision": ",".join(job.precisions),
    }
    if opts.format != NGFF_04:  # absent from records of 0.4 runs (and of older versions)
        params["format"] = opts.format
        params["shard_chunks"] = list(shard_chunks(opts, chunk_shape))
    if (tta := tta_param(opts.tta)) is not None:  # absent without it, as before --tta existed
        params["tta"] = tta
    if source.downsample is not None:  # absent for other models, as before it existed
        params["downsample"] = source.downsample
    attrs = {
        "tilesegment_version": __version__,
        "slide": str(job.slide.resolve()),
        "level": source.source_level,
        "level0_per_px": source.level0_per_px,
        "model": job.spec.name,
        "model_sha256": model_sha,
        "tile_size": list(grid.input_shape),
        "stride": list(grid.stride),
        "halo": grid.halo,
        "tissue": opts.tissue,
    }
    if tta is not None:
        attrs["tta"] = tta
    if source.downsample is not None:
        attrs["downsample"] = _home_record(source)
    if job.spec.instances is not None:  # how postprocess makes instances (seeded growth)
        attrs["instances"] = job.spec.instances.to_json()
    info = {
        "command": list(opts.command or sys.argv),
        "batch_size": opts.batch_size,
        "devices": job.devices,
        "created": run.started,
        "slide_mtime": slide.mtime,  # a hint only (see tilesegment.infer.identity)
    }
    return params, attrs, info


def _run_locked(job: _Job, run: RunRecord) -> RunSummary:
    """Create or reopen the output, compute what is missing, finalise, report."""
    opts, source, grid, output = job.opts, job.source, job.grid, job.output
    run.reader = job.reader
    tissue, thumbnail, run.tissue = tissue_map(job.reader, source, opts, user_mask=job.tissue_mask)
    ky, kx = tiles_per_chunk(grid, opts.chunk_target_px)
    chunk_shape = (ky * grid.stride[0], kx * grid.stride[1])
    slide = _identify(job.slide)
    params, attrs, info = _run_params(job, slide, chunk_shape, run)
    store, finished = _open_output(
        output, opts, slide, params, info, attrs, source, job.spec, chunk_shape, tissue is not None
    )
    if finished:
        summary = run.summary(output, grid, source, tissue, None)
        summary.extra["already_complete"] = True
        return summary if source.home_shape is None else _on_home_grid(summary, source)
    run.resumed = opts.resume
    with DoneLog(output, fsync=opts.fsync) as done_log:
        files = store.chunk_files
        plan = plan_work(grid, opts, tissue=tissue, done=done_log.done, shards=files.shard_chunks)
        # Decided on the run's whole work, done or not, so that a resumed run compiles (or not)
        # like the interrupted one and writes the same bytes.
        run.compiled = resolve_compile(opts.compile, plan.work_px / 1e6)
        choice = _choose_workers(job, plan)
        if choice is not None:
            log.info("%s", choice.describe())
            run.workers = choice
        run.phase("setup", run.t0)
        context = RunContext(
            slide=job.slide,
            model=job.model,
            output=output,
            options=replace(
                opts, level=source.source_level, mpp=source.slide_mpp, compile=run.compiled
            ),
            spec=job.spec,
            tissue=tissue,
        )
        recorder = Recorder(
            output,
            grid,
            done_log,
            tissue=tissue is not None,
            total_tiles=tiles_to_compute(plan),
            progress=opts.progress,
            files=files,
        )
        _execute(_executor(job, context, choice), plan, recorder, run, opts, params)
    t_final = time.perf_counter()
    if source.home_shape is None:
        store.finalize()
    else:
        store = _bring_back(job, store, tissue, attrs)
    run.phase("finalize", t_final)
    preview = _preview(job, run, store, thumbnail)
    summary = run.summary(output, grid, source, tissue, preview, plan=plan)
    report = run.report(output, opts, params, plan, "complete")
    if source.home_shape is not None:  # the output is on the image's grid, not the network's
        report["downsample"] = _home_record(source)
        summary = _on_home_grid(summary, source)
    summary.extra["report"] = report
    summary.extra["report_path"] = str(write_report(output, report))
    return summary


def _preview(job: _Job, run: RunRecord, store: OutputStore, thumbnail: Any) -> Path | None:
    """Write ``OUT.preview.png`` when asked (and a thumbnail was read); its path."""
    if thumbnail is None or not job.opts.preview:
        return None
    from tilesegment.infer.preview import write_preview

    t_preview = time.perf_counter()
    home = home_source(job.reader, job.source)  # the store's grid
    preview = write_preview(store, thumbnail, preview_path(job.output), source=home)
    run.phase("preview", t_preview)
    return preview


def _bring_back(job: _Job, store: OutputStore, tissue: Any, attrs: dict) -> OutputStore:
    """The output of a downsample model moved from the network's grid onto the slide's level
    0: a new store is built beside it (in the run's state folder) from the network grid's
    float32 probabilities, resampled chunk by chunk with the kernel ``predict`` uses, then
    finalised and put in the output's place. Until then the output is the network grid's
    store, incomplete, so a killed run resumes (its done log has every chunk) and builds
    the new store again."""
    from tilesegment.store.layout import staged_store_path
    from tilesegment.store.regrid import regrid_level0, swap_in
    from tilesegment.tissue import TissueMap

    source, opts = job.source, job.opts
    home, per_px = source.home_shape, source.level0_per_px
    assert home is not None
    chunk = (min(home[0], round(store.chunk_shape[0] * per_px)),
             min(home[1], round(store.chunk_shape[1] * per_px)))  # fmt: skip
    final = OutputStore.create(
        staged_store_path(job.output),
        image_shape=home,
        classes=store.classes,
        chunk_shape=chunk,
        mpp=source.home_mpp,
        dtype=opts.dtype,
        overwrite=True,
        attrs={**attrs, "level": 0, "level0_per_px": 1.0},
        format=opts.format,
        shard_shape=_shard_shape(opts, chunk),
    )
    render = None
    if tissue is not None:
        final.create_label(TISSUE, dtype="uint8", colours={1: (60, 180, 75, 128)})
        render = TissueMap(tissue.mask, home).render
    regrid_level0(store, final, 1.0 / per_px, tissue=render)
    final.finalize()
    swap_in(final.path, job.output)
    return OutputStore.open(job.output, mode="r+")


def _on_home_grid(summary: RunSummary, source: Source) -> RunSummary:
    """The summary of a downsample model's run, for the output it wrote (level 0's grid)."""
    home = source.home_shape or source.image_shape
    extra = {**summary.extra, "mpp": source.slide_mpp, "level": 0}
    extra["downsample"] = _home_record(source)
    return replace(summary, image_shape=home, megapixels=home[0] * home[1] / 1e6, extra=extra)


def _home_record(source: Source) -> dict[str, Any]:
    """How a downsample model's output was made, for its attributes and the report."""
    return {
        "factor": source.downsample,
        "network_grid": list(source.image_shape),
        "level0_per_network_px": source.level0_per_px,
        "output_grid": list(source.home_shape or ()),
    }


def _choose_workers(job: _Job, plan: WorkPlan) -> WorkersChoice | None:
    """The worker processes of a CPU run: as many as ``--workers N`` (capped) or ``in_process``
    ask, or what ``--workers auto`` decides on the whole run's tissue, done or not, so that a
    resumed run decides like the interrupted one
    (:func:`~tilesegment.infer.capacity.auto_workers`). None for dask and GPU runs, whose
    options alone decide."""
    opts = job.opts
    if opts.scheduler is not None or opts.dask_workers is not None or job.devices[0] != "cpu":
        return None
    if opts.in_process is not None:
        n = 0 if opts.in_process else len(job.devices)
        return WorkersChoice(n, f"in_process={opts.in_process}", "as asked")
    if opts.workers is not None:
        n = len(job.devices)
        capped = "" if n == opts.workers else f", capped from {opts.workers}"
        return WorkersChoice(0 if n == 1 else n, f"--workers {opts.workers}", f"as asked{capped}")
    return auto_workers(plan.work_px / 1e6, cores=usable_cores(), memory_mb=available_memory_mb())


def _executor(job: _Job, ctx: RunContext, choice: WorkersChoice | None) -> Executor:
    """The executor the options ask for: dask, in-process, or one worker process per device
    (per CPU worker)."""
    opts = job.opts
    if opts.scheduler is not None or opts.dask_workers is not None:
        from tilesegment.infer.executors.dask import DaskExecutor

        return DaskExecutor(ctx, job.devices[0], job.precisions[0])
    in_process = bool(opts.in_process) if choice is None else choice.processes == 0
    if in_process:
        from tilesegment.infer.executors.local import LocalExecutor

        return LocalExecutor(ctx, job.source, job.net, job.devices[0], job.precisions[0])
    from tilesegment.infer.executors.pool import PoolExecutor

    devices = job.devices if choice is None else ["cpu"] * choice.processes
    return PoolExecutor(ctx, devices)


def _execute(
    executor: Executor,
    plan: WorkPlan,
    recorder: Recorder,
    run: RunRecord,
    opts: RunOptions,
    params: dict,
) -> None:
    """Run ``executor`` over ``plan``; on failure or interrupt write the report and re-raise
    (a public error naming the incomplete output, or :class:`RunInterrupted`)."""
    output = recorder.output
    try:
        with recorder:
            try:
                executor.run(plan, recorder)
            finally:
                run.absorb(executor.stats(), recorder)
    except TilesegmentError as exc:
        _finish_failed(recorder.done_log, output, plan, run, opts, params, "failed", exc)
        # The same public error class (so the same exit code), plus where the output is;
        # --resume is advised only where it can help (not for a corrupt slide or model).
        public = next(c for c in type(exc).__mro__ if c.__module__ == "tilesegment.errors")
        advice = (
            "running it again will fail the same way"
            if isinstance(exc, (SlideReadError, ConfigError, ModelError))
            else "resume with --resume"
        )
        raise public(f"{exc}; {output} was left incomplete ({advice})") from exc
    except Exception as exc:
        _finish_failed(recorder.done_log, output, plan, run, opts, params, "failed", exc)
        raise
    except KeyboardInterrupt as exc:
        _finish_failed(recorder.done_log, output, plan, run, opts, params, "interrupted", exc)
        left = plan.tiles_total - plan.tiles_no_tissue - plan.tiles_done_before
        raise RunInterrupted(
            f"interrupted after {run.tiles_processed} of {left} tiles; finished chunks "
            "are recorded: resume with --resume"
        ) from None


def _tissue_param(tissue: str) -> str:
    if tissue in ("auto", "none"):
        return tissue
    path = Path(tissue)
    if path.is_file():
        return "mask sha256 " + file_sha256(path)
    return "mask " + path.name  # a Zarr folder: its name


def _identify(slide: Path) -> SlideIdentity:
    try:
        return identify(slide)
    except OSError as exc:
        raise SlideReadError(f"{slide}: cannot read it to fingerprint its content ({exc})") from exc


def _open_output(
    output: Path,
    opts: RunOptions,
    slide: SlideIdentity,
    params: dict[str, Any],
    info: dict[str, Any],
    attrs: dict[str, Any],
    source: Source,
    spec: ModelSpec,
    chunk_shape: tuple[int, int],
    with_tissue: bool,
) -> tuple[OutputStore, bool]:
    """Create the output, or reopen it to resume; (store, already complete)."""
    if opts.resume and output.exists():
        adopt_legacy_state(output)  # outputs of older versions kept it inside the group
        record = read_record(output)
        if record is not None:
            stored, stored_info = record
            store = OutputStore.open(output, mode="r+")
            check_identity(
                stored,
                slide,
                output=output,
                stored_path=store.attrs.get("slide"),
                stored_mtime=stored_info.get("slide_mtime"),
            )
            check_params(stored, params, output=output, ignore=IDENTITY_KEYS)
            if store.is_complete():
                log.info("%s is already complete; nothing to resume", output)
                return store, True
            removed = remove_partial_files(output)
            if removed:
                log.info("removed %d partial chunk files left by the interrupted run", removed)
            log.info("resuming %s", output)
            return store, False
        if is_complete(output):
            log.warning("%s is complete but has no run record to check; leaving it", output)
            return OutputStore.open(output, mode="r+"), True
        log.warning("%s has no run record (killed while being created); starting again", output)
    store = OutputStore.create(
        output,
        image_shape=source.image_shape,
        classes=ClassSpec(spec.class_names, spec.class_colours),
        chunk_shape=chunk_shape,
        mpp=source.mpp,
        # A downsample model's network grid is resampled afterwards: keep its floats.
        dtype=opts.dtype if source.home_shape is None else "float32",
        overwrite=opts.overwrite or opts.resume,
        attrs=attrs,
        format=opts.format,
        shard_shape=_shard_shape(opts, chunk_shape),
    )
    reset_state(output)  # a new output: no done log or report of an earlier one
    if with_tissue:
        store.create_label(TISSUE, dtype="uint8", colours={1: (60, 180, 75, 128)})
    # Last: the record that makes the output resumable.
    write_params(output, params, info)
    return store, False


def _shard_shape(opts: RunOptions, chunk_shape: tuple[int, int]) -> tuple[int, int] | None:
    """Level-0 shard size of a new output (None for NGFF 0.4)."""
    if opts.format == NGFF_04:
        return None
    ky, kx = shard_chunks(opts, chunk_shape)
    return ky * chunk_shape[0], kx * chunk_shape[1]


def _finish_failed(
    done_log: DoneLog,
    output: Path,
    plan: WorkPlan,
    run: RunRecord,
    opts: RunOptions,
    params: dict[str, Any],
    status: str,
    exc: BaseException,
) -> None:
    """Flush the done log and write the report of a run that did not complete."""
    try:
        done_log.flush()
    except TilesegmentError as flush_exc:
        run.errors.append(str(flush_exc))
    if str(exc):
        run.errors.append(f"{type(exc).__name__}: {exc}")
    report = run.report(output, opts, params, plan, status)
    try:
        write_report(output, report)
    except OSError as write_exc:
        log.warning("could not write the run report into %s: %s", output, write_exc)
