"""The dask executor: a run's units of work spread over a ``dask.distributed`` cluster.

``--scheduler tcp://host:8786`` uses the workers of an existing scheduler; ``--dask-workers N``
starts a LocalCluster of ``N`` single-threaded worker processes for the run. Tasks receive
specs (paths, options, the grid, one unit) and write their own chunks into the output (on a
filesystem every worker shares); the driver records them. The design, with its reasons, is in
``docs/architecture.md`` (Executors).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilesegment.errors import ConfigError, WorkerError
from tilesegment.infer.capacity import cap_cpu_workers
from tilesegment.infer.devices import worker_env
from tilesegment.infer.executors.base import (
    Attempts,
    ExecutorStats,
    RunContext,
    device_entry,
    failed_tiles_error,
    remove_worker_leftovers,
    retryable,
)
from tilesegment.infer.executors.dask_task import (
    UNIT_KEY_PREFIX,
    PackedMask,
    UnitJob,
    UnitResult,
    compute_unit,
    same,
)
from tilesegment.infer.options import require_distributed
from tilesegment.infer.plan import Unit, WorkPlan
from tilesegment.infer.record import Recorder
from tilesegment.machine import usable_cores

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)

#: Units in flight per worker thread of the cluster.
INFLIGHT_PER_THREAD = 2


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
            env=worker_env(),  # set in each worker before it imports torch
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        if logging.getLogger("tilesegment").getEffectiveLevel() > logging.DEBUG:
            from tilesegment.infer.executors.dask_logs import QuietUnitFailuresPlugin

            client.register_plugin(QuietUnitFailuresPlugin())
        yield client


def make_job(
    ctx: RunContext, plan: WorkPlan, device: str, precision: str, local_workers: int | None
) -> UnitJob:
    """The :class:`UnitJob` of a run (see :class:`DaskExecutor`); ``local_workers``: the size
    of the LocalCluster the run starts (None with a scheduler)."""
    opts = ctx.options
    threads = None if local_workers is None else max(1, usable_cores() // local_workers)
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
                "host": r.host,
                "device": device,
                "threads": r.threads,
                "precision": r.precision,
                "tiles": 0,
                "core_px": 0,
                "busy_seconds": 0.0,
                "peak_rss_mb": 0.0,
                "forward_seconds": 0.0,
                "startup_seconds": 0.0,
                "first_batch_seconds": 0.0,
                "cpu_by_pid": {},
            },
        )
        d["tiles"] += r.tiles
        d["core_px"] += r.core_px
        d["busy_seconds"] += r.seconds
        d["peak_rss_mb"] = max(d["peak_rss_mb"], r.peak_rss_mb)
        d["forward_seconds"] += r.forward_seconds
        d["startup_seconds"] += r.load_seconds
        d["first_batch_seconds"] += r.first_batch_seconds
        cpu = d["cpu_by_pid"]  # each process's CPU in the run so far: the latest figure counts
        cpu[r.pid] = max(cpu.get(r.pid, 0.0), r.process_cpu_seconds)
        self.pids[r.worker].add(r.pid)

    def report(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.by_worker, key=lambda n: (len(n), n)):
            d = self.by_worker[name]
            entry = device_entry(
                name,
                d["device"],
                d["threads"],
                d["precision"],
                tiles=d["tiles"],
                core_px=d["core_px"],
                busy_seconds=d["busy_seconds"],
                restarts=max(len(self.pids[name]) - 1, self.departures[name]),
                executor="dask",
                host=d["host"],
                peak_rss_mb=round(d["peak_rss_mb"], 1),
                pids=sorted(self.pids[name]),
                # As the pool's accounts, but start-up is the model's load in the first task
                # (the dask worker process was already running) and the CPU is each worker
                # process's, all threads, from its first task of the run to its last.
                startup_seconds=round(d["startup_seconds"], 3),
                forward_seconds=round(d["forward_seconds"], 3),
                first_batch_seconds=round(d["first_batch_seconds"], 3),
                cpu_seconds=round(sum(d["cpu_by_pid"].values()), 3),
            )
            out.append(entry)
        return out

    def peak_rss_mb(self) -> float:
        return max((d["peak_rss_mb"] for d in self.by_worker.values()), default=0.0)


class DaskExecutor:
    """Computes every unit of a plan on a dask cluster and records the chunks of each finished
    one. Connects to ``ctx.options.scheduler`` or starts a LocalCluster of
    ``ctx.options.dask_workers`` workers. Lifecycle: construct, :meth:`run` once.
    Not thread-safe, not picklable."""

    def __init__(self, ctx: RunContext, device: str, precision: str) -> None:
        self.ctx, self.device, self.precision = ctx, device, precision
        self._stats = ExecutorStats()

    def stats(self) -> ExecutorStats:
        return self._stats

    def run(self, plan: WorkPlan, recorder: Recorder) -> None:
        """Returns when every unit is written; raises :class:`WorkerError` naming the tiles
        that still failed after ``max_retries`` retries (the others are written and recorded),
        the input error of a deterministic failure, or KeyboardInterrupt (after recording the
        units that had finished)."""
        opts = self.ctx.options
        if not plan.units:
            return
        local = None
        if opts.scheduler is None:  # a local cluster: capped like --workers, with a warning
            local = cap_cpu_workers(opts.dask_workers or 1, option="--dask-workers")
        job = make_job(self.ctx, plan, self.device, self.precision, local)
        driver = _Driver(self.ctx, plan, job, recorder, self._stats)
        with connect(opts.scheduler, local) as client:
            log.info("%d units of work on dask scheduler %s", len(plan.units), client.scheduler)
            try:
                driver.run(client)
            finally:
                self._stats.seconds = time.perf_counter() - driver.t0
                self._stats.devices = driver.workers.report()
                self._stats.worker_peak_rss_mb = driver.workers.peak_rss_mb()
        remove_worker_leftovers(Path(self.ctx.output))
        if driver.failed:
            raise failed_tiles_error(
                self._stats,
                [task for unit in driver.failed.values() for task in unit],
                opts.max_retries,
                self._stats.errors[-1],
                where=" on dask",
            )


class _Driver:
    """Submits a run's units to a dask client, a bounded number at a time, and records the
    chunks of each finished one. Lifecycle: construct, :meth:`run` once. Not thread-safe."""

    def __init__(
        self,
        ctx: RunContext,
        plan: WorkPlan,
        job: UnitJob,
        recorder: Recorder,
        stats: ExecutorStats,
    ) -> None:
        self.ctx, self.plan, self.job, self.recorder, self.stats = ctx, plan, job, recorder, stats
        self.workers = _WorkerStats()
        self.failed: dict[int, Unit] = {}
        self.t0 = time.perf_counter()
        self._tasks = [{t.key: t for t in unit} for unit in plan.units]
        self._attempts = Attempts(ctx.options.max_retries)
        self._pending = list(range(len(plan.units)))[::-1]  # popped from the end: in order
        self._inflight: dict[Any, int] = {}
        self._names: dict[str, str] = {}
        self._threads = 0
        self._watched_at = -math.inf

    def run(self, client: distributed.Client) -> None:
        distributed = require_distributed()
        self.t0 = time.perf_counter()
        self._client = client
        self._job_future = client.submit(
            same, self.job, key=f"tilesegment-job-{self.job.token}", pure=False
        )
        self._completed = distributed.as_completed(loop=client.loop)
        try:
            self._top_up()
            for future in self._completed:
                uid = self._inflight.pop(future)
                try:
                    result = future.result()
                except CancelledError as exc:  # not by us: the scheduler is gone or restarted
                    raise WorkerError(
                        f"dask cancelled unit {uid} ({exc}); is the scheduler still running?"
                    ) from exc
                except Exception as exc:
                    log.debug(
                        "unit %d raised on its dask worker:\n%s",
                        uid,
                        "".join(traceback.format_tb(future.traceback())),
                    )
                    if not retryable(exc):
                        raise
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
            self.workers.lost(name)
            message = f"dask worker {name} ({address}) left the cluster during the run"
            log.warning("%s; dask reschedules its tasks", message)
            self.stats.errors.append(message)
        for address, info in workers.items():
            self._names[address] = str(info.get("name", address))
        self._threads = sum(int(info.get("nthreads", 1)) for info in workers.values())
        return self._threads

    def _top_up(self) -> None:
        """Submit units until ``INFLIGHT_PER_THREAD`` per worker thread are in flight."""
        window = INFLIGHT_PER_THREAD * max(1, self._watch_workers())
        while self._pending and len(self._inflight) < window:
            uid = self._pending.pop()
            key = f"{UNIT_KEY_PREFIX}{self.job.token}-{uid}-{self._attempts[uid]}"
            future = self._client.submit(
                compute_unit, self._job_future, self.plan.units[uid], key=key, pure=False
            )
            self._inflight[future] = uid
            self._completed.add(future)

    def _retry_or_fail(self, uid: int, exc: Exception) -> None:
        first = self.plan.units[uid][0].tiles[0]
        message = f"unit {uid} (from tile {first}) failed: {type(exc).__name__}: {exc}"
        self.stats.errors.append(message)
        if self._attempts.failed(uid):
            log.error("%s; giving up after %d attempts", message, self._attempts[uid])
            self.failed[uid] = self.plan.units[uid]
        else:
            log.warning("%s; retrying (attempt %d)", message, self._attempts[uid] + 1)
            self._pending.append(uid)

    def _record(self, uid: int, result: UnitResult) -> None:
        """Record the chunks of a finished unit."""
        tasks = self._tasks[uid]
        missing = set(tasks) - set(result.keys)
        if missing:  # stream_units writes every chunk of a unit or raises
            raise WorkerError(f"unit {uid} returned without its chunks {sorted(missing)}")
        self.workers.add(result, self.job.device)
        self.stats.decode_warnings.extend(result.decode_warnings)
        for key in result.keys:
            self.recorder.record(tasks[key])
