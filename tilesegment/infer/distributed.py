"""The dask executor: a run's units of work spread over a ``dask.distributed`` cluster.

``tilesegment run SLIDE -o OUT.zarr --scheduler tcp://host:8786`` uses the workers of an
existing scheduler; ``--dask-workers N`` starts a :class:`distributed.LocalCluster` of ``N``
worker processes (one thread each, localhost) for the run and stops it afterwards.

Design
------
* **Specs, not pixels.** The run is planned exactly as for the local executors
  (:func:`~tilesegment.infer.pipeline.plan_work`). Each dask task receives a
  :class:`UnitJob` (absolute paths of the slide, the checkpoint and the output; the resolved
  options; the tile grid; the tissue mask bit-packed) and one
  :data:`~tilesegment.infer.pipeline.Unit`. The job travels once per run as the result of one
  small task that every unit task depends on (dask copies it to each worker once, and
  recomputes it if the workers holding it die); a unit is a few chunk specs.
* **Workers do the work.** A task opens the slide itself, predicts with the process's
  :func:`~tilesegment.infer.cache.cached_predictor` (the checkpoint is loaded once per
  worker process, from its path), writes its own whole chunks into the output (which must be
  on a filesystem every worker shares with the driver), and returns the keys of the chunks it
  wrote. A chunk belongs to one unit, so no two tasks write the same chunk.
* **The driver records.** The ``run`` process records each returned chunk in the durable done
  log (:mod:`tilesegment.infer.resume`), so ``--resume``, the run lock, the completion marker
  and the report work as for a local run, and finalises the output itself.
* **Bounded.** At most ``2 x`` the cluster's worker threads units are submitted at a time
  (topped up as they complete), so the driver's memory does not grow with the slide.
* **Faults.** A worker that dies mid-task has its task rescheduled by dask (up to
  ``distributed.scheduler.allowed-failures`` deaths). A task that raises is submitted again,
  up to ``max_retries`` times; errors about the input (:class:`SlideReadError`,
  :class:`ConfigError`, :class:`ModelError`, :class:`StoreError`) stop the run at once.
  Units that still fail are reported with their tiles, and the output stays resumable.
* **Identical output.** Workers use the precision the driver resolved and, on a
  ``LocalCluster``, the same torch thread count as the worker pool (cores // workers), so the
  bytes equal a pool run with as many workers. A different thread count can change float
  rounding, and so a rare uint8 value by 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tilesegment.errors import ConfigError, ModelError, SlideReadError, StoreError, WorkerError
from tilesegment.geometry import TileGrid
from tilesegment.infer.pipeline import (
    ChunkKey,
    ChunkTask,
    ListSource,
    RunOptions,
    Unit,
    WorkPlan,
    _Context,
    _core_px,
    _progress,
    _Run,
    add_decode_warnings,
    chunk_files,
    open_source,
    raise_failed_tiles,
    remove_worker_leftovers,
    stream_units,
)
from tilesegment.infer.pool import peak_rss_mb
from tilesegment.infer.resume import DoneLog

if TYPE_CHECKING:
    import distributed

    from tilesegment.model.checkpoint import ModelSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tilesegment[cluster]'"

#: Errors a retry cannot fix: they stop the run at once, with the same class.
_DETERMINISTIC = (SlideReadError, ConfigError, ModelError, StoreError)

#: Units in flight per worker thread of the cluster.
INFLIGHT_PER_THREAD = 2


def require_distributed() -> Any:
    """The ``distributed`` module; :class:`ConfigError` with the install command if absent."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(
            f"--scheduler and --dask-workers need dask.distributed, which is not installed "
            f"({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return distributed


# ---------------------------------------------------------------------------------------------
# what a task receives and returns


@dataclass(frozen=True, slots=True)
class PackedMask:
    """A boolean tissue mask, 8 pixels a byte (a 2048² thumbnail mask is 512 kB)."""

    bits: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        return cls(np.packbits(mask.astype(bool), axis=None), (mask.shape[0], mask.shape[1]))

    def unpack(self) -> np.ndarray:
        h, w = self.shape
        return np.unpackbits(self.bits, count=h * w).reshape(h, w).astype(bool)


@dataclass(frozen=True, slots=True)
class UnitJob:
    """What every unit task of one run needs besides its unit. Small and picklable.

    Paths are absolute, so workers with another working directory find the same files.
    """

    token: str
    """Unique per run: names the run's tasks and keys the per-process tissue-map cache."""
    slide: str
    model: str
    output: str
    options: RunOptions
    """The run's options with ``level`` and ``mpp`` resolved (every worker reads the same
    pixels)."""
    grid: TileGrid
    device: str
    """Torch device of every worker."""
    precision: str
    """Resolved by the driver (not ``auto``), so that every worker computes alike."""
    torch_threads: int | None
    """torch threads per worker process; None: the dask worker's thread count."""
    tissue: PackedMask | None
    """The run's tissue mask (None: every tile is computed)."""
    image_shape: tuple[int, int]


@dataclass(frozen=True, slots=True)
class UnitResult:
    """What a task reports back: the chunks it wrote and how it went."""

    keys: tuple[ChunkKey, ...]
    """Chunk-grid keys of the chunks written (all of the unit's)."""
    worker: str
    """Name of the dask worker (``0``, ``1``... on a LocalCluster)."""
    host: str
    pid: int
    threads: int
    precision: str
    tiles: int
    core_px: int
    seconds: float
    peak_rss_mb: float
    decode_warnings: tuple[dict[str, Any], ...] = ()
    """Corrupt-but-decodable segments this worker's reader has found so far in the run."""


class _JobResources:
    """What a worker process opens once per run (not once per task): the slide reader and its
    source, the tissue map, and one output-store handle per dask thread."""

    def __init__(self, job: UnitJob, spec: ModelSpec) -> None:
        from tilesegment.io import open_slide

        self.token = job.token
        self.reader = open_slide(job.slide)
        try:
            self.source = open_source(self.reader, spec, job.options)
        except BaseException:
            self.reader.close()
            raise
        self.tissue = None
        if job.tissue is not None:
            from tilesegment.tissue import TissueMap

            self.tissue = TissueMap(job.tissue.unpack(), job.image_shape)
        self._stores: dict[int, Any] = {}

    def store(self, output: str):
        """This thread's handle on the output store."""
        from tilesegment.store import OutputStore

        key = threading.get_ident()
        if key not in self._stores:
            self._stores[key] = OutputStore.open(output, mode="r+")
        return self._stores[key]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.reader.close()


_RESOURCES: dict[str, _JobResources] = {}
_RESOURCES_LOCK = threading.Lock()


def _job_resources(job: UnitJob, spec: ModelSpec) -> _JobResources:
    """The run's resources in this process, opened by its first task. One run at a time per
    worker is the rule: a new run's first task closes the previous run's (memory stays flat)."""
    with _RESOURCES_LOCK:
        res = _RESOURCES.get(job.token)
        if res is None:
            for old in _RESOURCES.values():
                old.close()
            _RESOURCES.clear()
            res = _JobResources(job, spec)
            _RESOURCES[job.token] = res
        return res


def _worker_identity() -> tuple[str, int | None]:
    """(name, thread count) of the dask worker running this task, or this process's pid."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return str(os.getpid()), None
    return str(worker.name), worker.state.nthreads


def compute_unit(job: UnitJob, unit: Unit) -> UnitResult:
    """Compute and write every chunk of ``unit``; the body of a dask task.

    Runs in a worker process: reads the unit's pixels from the slide, predicts with the
    process's cached predictor and writes whole chunks (probabilities, mask, tissue) into the
    output. Errors propagate to the driver.
    """
    import torch

    from tilesegment.infer.cache import cached_predictor

    name, worker_threads = _worker_identity()
    threads = job.torch_threads or worker_threads or torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    predictor = cached_predictor(job.model, job.device, job.precision, compile=job.options.compile)
    spec = predictor.spec
    res = _job_resources(job, spec)
    keys: list[ChunkKey] = []
    t0 = time.perf_counter()
    stats = stream_units(
        ListSource([unit]),
        reader=res.source.reader,
        level=res.source.level,
        grid=job.grid,
        predictor=predictor,
        classes=spec.unet.classes,
        channels=spec.unet.in_channels,
        store=res.store(job.output),
        tissue=res.tissue,
        batch_size=job.options.batch_size,
        read_threads=1,  # one unit: its block is read with one read_region
        on_chunk=lambda task: keys.append(task.key),
    )
    return UnitResult(
        keys=tuple(keys),
        worker=name,
        host=socket.gethostname(),
        pid=os.getpid(),
        threads=threads,
        precision=job.precision,
        tiles=stats.tiles,
        core_px=stats.core_px,
        seconds=time.perf_counter() - t0,
        peak_rss_mb=peak_rss_mb(),
        decode_warnings=tuple(w.as_dict() for w in res.reader.decode_warnings()),
    )


def _same(job: UnitJob) -> UnitJob:
    """Identity: lets the job live in the cluster as a recomputable task result."""
    return job


# ---------------------------------------------------------------------------------------------
# the driver


@contextlib.contextmanager
def connect(scheduler: str | None, dask_workers: int | None) -> Iterator[distributed.Client]:
    """A client of the scheduler at ``scheduler``, or of a new LocalCluster of
    ``dask_workers`` single-threaded worker processes (closed on exit)."""
    distributed = require_distributed()
    with _distributed_logs_at(logging.getLogger("tilesegment").getEffectiveLevel()):
        with _client(distributed, scheduler, dask_workers) as client:
            yield client


@contextlib.contextmanager
def _distributed_logs_at(level: int) -> Iterator[None]:
    """Let dask's loggers (INFO by default) say as much as tilesegment's, no more."""
    logger = logging.getLogger("distributed")
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _client(distributed, scheduler: str | None, dask_workers: int | None) -> Iterator[Any]:
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="10s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(
                f"--scheduler {scheduler}: cannot connect ({exc}); start one with "
                "`dask scheduler` (and `dask worker ADDRESS`), or use --dask-workers N"
            ) from exc
        with client:
            yield client
        return
    if dask_workers is None or dask_workers < 1:
        raise ConfigError(f"--dask-workers ({dask_workers}) must be >= 1")
    with (
        distributed.LocalCluster(
            n_workers=dask_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # any free port: runs side by side never clash
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def make_job(ctx: _Context, plan: WorkPlan, device: str, precision: str) -> UnitJob:
    """The :class:`UnitJob` of a run (see :func:`run_on_dask`)."""
    opts = ctx.options
    threads = None if opts.scheduler is not None else max(1, _cores() // opts.dask_workers)
    return UnitJob(
        token=uuid.uuid4().hex[:12],
        slide=str(Path(ctx.slide).resolve()),
        model=str(Path(ctx.model).resolve()),
        output=str(Path(ctx.output).resolve()),
        options=opts,
        grid=plan.grid,
        device=device,
        precision=precision,
        torch_threads=threads,
        tissue=None if ctx.tissue is None else PackedMask.pack(ctx.tissue.mask),
        image_shape=plan.grid.image_shape,
    )


class _WorkerStats:
    """Per dask worker: what its tasks did, for the run report."""

    def __init__(self) -> None:
        self.by_worker: dict[str, dict[str, Any]] = {}
        self.pids: defaultdict[str, set[int]] = defaultdict(set)
        self.departures: Counter[str] = Counter()

    def lost(self, name: str) -> None:
        """Worker ``name`` left the cluster (died, or was retired) during the run."""
        self.departures[name] += 1

    def add(self, r: UnitResult, device: str) -> None:
        d = self.by_worker.setdefault(
            r.worker,
            {
                "worker": r.worker,
                "executor": "dask",
                "host": r.host,
                "device": device,
                "threads": r.threads,
                "precision": r.precision,
                "tiles": 0,
                "core_px": 0,
                "busy_seconds": 0.0,
                "peak_rss_mb": 0.0,
            },
        )
        d["tiles"] += r.tiles
        d["core_px"] += r.core_px
        d["busy_seconds"] += r.seconds
        d["peak_rss_mb"] = max(d["peak_rss_mb"], r.peak_rss_mb)
        self.pids[r.worker].add(r.pid)

    def report(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.by_worker, key=lambda n: (len(n), n)):
            d = dict(self.by_worker[name])
            mpx, busy = d.pop("core_px") / 1e6, d["busy_seconds"]
            d.update(
                megapixels=mpx,
                busy_seconds=round(busy, 3),
                mpx_per_s=round(mpx / busy, 4) if busy > 0 else None,
                restarts=max(len(self.pids[name]) - 1, self.departures[name]),
                peak_rss_mb=round(d["peak_rss_mb"], 1),
                pids=sorted(self.pids[name]),
            )
            out.append(d)
        return out

    def peak_rss_mb(self) -> float:
        return max((d["peak_rss_mb"] for d in self.by_worker.values()), default=0.0)


def run_on_dask(
    ctx: _Context, plan: WorkPlan, device: str, precision: str, done_log: DoneLog, run: _Run
) -> None:
    """Compute every unit of ``plan`` on a dask cluster and record the chunks in ``done_log``.

    Connects to ``ctx.options.scheduler`` or starts a LocalCluster of
    ``ctx.options.dask_workers`` workers. Returns when every unit is written; raises
    :class:`WorkerError` naming the tiles that still failed after ``max_retries`` retries
    (the others are written and recorded), the input error of a deterministic failure, or
    KeyboardInterrupt (after recording the units that had finished).
    """
    opts = ctx.options
    if not plan.units:
        return
    driver = _Driver(ctx, plan, make_job(ctx, plan, device, precision), done_log, run)
    todo = sum(len(t.tiles) for u in plan.units for t in u)
    with (
        connect(opts.scheduler, opts.dask_workers) as client,
        _progress(todo, opts.progress) as bar,
    ):
        log.info("%d units of work on dask scheduler %s", len(plan.units), client.scheduler)
        try:
            driver.run(client, bar)
        finally:
            run.stream_seconds = time.perf_counter() - driver.t0
            run.devices = driver.stats.report()
            run.worker_peak_rss_mb = driver.stats.peak_rss_mb()
    remove_worker_leftovers(Path(ctx.output))
    if driver.failed:
        raise_failed_tiles(
            run,
            [task for unit in driver.failed.values() for task in unit],
            opts.max_retries,
            run.errors[-1],
            where=" on dask",
        )


class _Driver:
    """Submits a run's units to a dask client, a bounded number at a time, and records the
    chunks of each finished one. Lifecycle: construct, :meth:`run` once. Not thread-safe."""

    def __init__(
        self, ctx: _Context, plan: WorkPlan, job: UnitJob, done_log: DoneLog, run: _Run
    ) -> None:
        self.ctx, self.plan, self.job, self.done_log, self.state = ctx, plan, job, done_log, run
        self.stats = _WorkerStats()
        self.failed: dict[int, Unit] = {}
        self.t0 = time.perf_counter()
        self._tasks = [{t.key: t for t in unit} for unit in plan.units]
        self._attempts: Counter[int] = Counter()
        self._pending = list(range(len(plan.units)))[::-1]  # popped from the end: in order
        self._inflight: dict[Any, int] = {}
        self._names: dict[str, str] = {}
        self._threads = 0
        self._watched_at = -math.inf

    def run(self, client: distributed.Client, bar) -> None:
        distributed = require_distributed()
        self.t0 = time.perf_counter()
        self._client, self._bar = client, bar
        self._job_future = client.submit(
            _same, self.job, key=f"tilesegment-job-{self.job.token}", pure=False
        )
        self._completed = distributed.as_completed(loop=client.loop)
        try:
            self._top_up()
            for future in self._completed:
                uid = self._inflight.pop(future)
                try:
                    result = future.result()
                except _DETERMINISTIC:
                    raise
                except CancelledError as exc:  # not by us: the scheduler is gone or restarted
                    raise WorkerError(
                        f"dask cancelled unit {uid} ({exc}); is the scheduler still running?"
                    ) from exc
                except Exception as exc:
                    self._retry_or_fail(uid, exc)
                else:
                    self._record(uid, result)
                # Forget the result: otherwise dask recomputes it if its worker dies later.
                future.release()
                self._top_up()
        except BaseException:
            # Record what finished, drop the rest (computed again on resume).
            for future, uid in list(self._inflight.items()):
                if future.status == "finished":
                    with contextlib.suppress(Exception):
                        self._record(uid, future.result(timeout=1))
            client.cancel([*self._inflight, self._job_future])
            raise

    def _watch_workers(self) -> int:
        """The cluster's worker threads (asked at most once a second); notes departed workers.

        A worker that dies mid-task has the task rescheduled by dask, unseen by the driver;
        this keeps a trace of it in the report.
        """
        now = time.monotonic()
        if now - self._watched_at < 1.0:
            return self._threads
        self._watched_at = now
        workers = self._client.scheduler_info(n_workers=-1).get("workers", {})
        for address in set(self._names) - set(workers):
            name = self._names.pop(address)
            self.stats.lost(name)
            message = f"dask worker {name} ({address}) left the cluster during the run"
            log.warning("%s; dask reschedules its tasks", message)
            self.state.errors.append(message)
        for address, info in workers.items():
            self._names[address] = str(info.get("name", address))
        self._threads = sum(int(info.get("nthreads", 1)) for info in workers.values())
        return self._threads

    def _top_up(self) -> None:
        """Submit units until ``INFLIGHT_PER_THREAD`` per worker thread are in flight."""
        window = INFLIGHT_PER_THREAD * max(1, self._watch_workers())
        while self._pending and len(self._inflight) < window:
            uid = self._pending.pop()
            key = f"tilesegment-unit-{self.job.token}-{uid}-{self._attempts[uid]}"
            future = self._client.submit(
                compute_unit, self._job_future, self.plan.units[uid], key=key, pure=False
            )
            self._inflight[future] = uid
            self._completed.add(future)

    def _retry_or_fail(self, uid: int, exc: Exception) -> None:
        self._attempts[uid] += 1
        first = self.plan.units[uid][0].tiles[0]
        message = f"unit {uid} (from tile {first}) failed: {type(exc).__name__}: {exc}"
        self.state.errors.append(message)
        if self._attempts[uid] > self.ctx.options.max_retries:
            log.error("%s; giving up after %d attempts", message, self._attempts[uid])
            self.failed[uid] = self.plan.units[uid]
        else:
            log.warning("%s; retrying (attempt %d)", message, self._attempts[uid] + 1)
            self._pending.append(uid)

    def _record(self, uid: int, result: UnitResult) -> None:
        """Record the chunks of a finished unit in the done log, the report and the bar."""
        tasks = self._tasks[uid]
        missing = set(tasks) - set(result.keys)
        if missing:  # stream_units writes every chunk of a unit or raises
            raise WorkerError(f"unit {uid} returned without its chunks {sorted(missing)}")
        self.stats.add(result, self.job.device)
        run, tissue = self.state, self.ctx.tissue is not None
        add_decode_warnings(run, result.decode_warnings)
        for key in result.keys:
            task: ChunkTask = tasks[key]
            self.done_log.add(key, chunk_files(self.ctx.output, key, tissue=tissue))
            run.chunks_written += 1
            run.tiles_processed += len(task.tiles)
            run.core_px += _core_px(self.plan.grid, task)
        self._bar.update(result.tiles)
        elapsed = time.perf_counter() - self.t0
        self._bar.set_postfix_str(f"{run.core_px / 1e6 / max(elapsed, 1e-9):.2f} Mpx/s")


__all__ = [
    "INSTALL_HINT",
    "PackedMask",
    "UnitJob",
    "UnitResult",
    "compute_unit",
    "connect",
    "make_job",
    "require_distributed",
    "run_on_dask",
]
