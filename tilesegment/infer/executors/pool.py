"""The worker-pool executor: one spawned process per device, each with its own model copy,
slide reader and store handle. Units go out as specs; "chunk (i, j) is written" comes back and
is recorded by the parent. Failed units are retried on a respawned worker; bad input stops the
run at once. The design, with its reasons, is in ``docs/architecture.md`` (Executors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Any

from tilesegment.infer.devices import spawn_env
from tilesegment.infer.executors.base import (
    Attempts,
    ExecutorStats,
    RunContext,
    device_entry,
    failed_tiles_error,
    remove_worker_leftovers,
    retryable,
)
from tilesegment.infer.executors.spawn import HELD_SIGNALS, run_worker
from tilesegment.infer.plan import ChunkTask, WorkPlan, core_px
from tilesegment.infer.record import Recorder
from tilesegment.machine import usable_cores

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Slot:
    """One device's worker, across respawns."""

    slot: int
    device: str
    threads: int
    generation: int = -1
    process: Any = None
    conn: Any = None
    arguments: bytes | None = None
    """The worker's pickled start-up arguments until it asks for them (``hello``)."""
    ready: bool = False
    inflight: dict[int, None] = field(default_factory=dict)
    current: int | None = None
    """The unit the worker said it is computing (the one to blame if it fails)."""
    error: tuple[bytes | None, str, str] | None = None
    killed_for: str | None = None
    """Why the parent killed the worker (start-up too long, silent too long), if it did."""
    t_heard: float = 0.0
    """When the worker last sent anything (``perf_counter``)."""
    finished: bool = False
    restarts: int = 0
    tiles: int = 0
    core_px: int = 0
    t_ready: float | None = None
    t_last: float | None = None
    busy_s: float = 0.0
    peak_rss_mb: float = 0.0
    precision: str = ""
    t_spawned: float = 0.0
    startup_s: float = 0.0
    """Seconds from spawning to ``ready``, summed over the slot's processes."""
    accounts: dict[str, float] = field(default_factory=dict)
    """Forward, first-batch and CPU seconds the slot's processes reported at ``bye``."""


@dataclass(frozen=True, slots=True)
class PoolResult:
    """What the pool could not do: failed units with their unfinished chunks."""

    failed: dict[int, tuple[ChunkTask, ...]]
    no_worker_left: str | None = None
    """The last worker's error when the pool ran out of workers (then nothing computes the
    failed units), else None."""


class PoolExecutor:
    """The worker pool as an :class:`~tilesegment.infer.executors.base.Executor`: runs the
    plan on a :class:`WorkerPool`, records each chunk a worker reports, and raises the failed
    tiles. Lifecycle: construct, :meth:`run` once. Not thread-safe, not picklable."""

    def __init__(self, ctx: RunContext, devices: list[str]) -> None:
        self.ctx, self.devices = ctx, devices
        self._stats = ExecutorStats()

    def stats(self) -> ExecutorStats:
        return self._stats

    def run(self, plan: WorkPlan, recorder: Recorder) -> None:
        t0 = time.perf_counter()
        pool = WorkerPool(self.ctx, plan, self.devices)
        try:
            result = pool.run(lambda task, slot: recorder.record(task))
        finally:
            self._stats.seconds = time.perf_counter() - t0
            self._stats.devices = pool.device_stats()
            self._stats.worker_peak_rss_mb = pool.peak_rss_mb()
            self._stats.errors.extend(pool.errors)
            self._stats.decode_warnings.extend(pool.decode_warnings)
            self._stats.phases.update(pool.phases)
        if pool.errors:
            remove_worker_leftovers(self.ctx.output)
        if result.failed:
            raise failed_tiles_error(
                self._stats,
                [task for uid in result.failed for task in result.failed[uid]],
                self.ctx.options.max_retries,
                result.no_worker_left or (pool.errors[-1] if pool.errors else "unknown"),
                why="with no worker left to compute them" if result.no_worker_left else None,
            )


class WorkerPool:
    """Runs a :class:`~tilesegment.infer.plan.WorkPlan` on one worker process per device.

    Lifecycle: construct, call :meth:`run` once (it starts, feeds, supervises and stops the
    workers; on return or on an exception no worker is left running), then read
    :meth:`device_stats`. Not thread-safe, not picklable.
    """

    def __init__(
        self,
        ctx: RunContext,
        plan: WorkPlan,
        devices: list[str],
        *,
        depth: int = 2,
        stop_timeout_s: float = 60.0,
    ) -> None:
        import torch.multiprocessing as tmp

        self.ctx = ctx
        self.plan = plan
        self.devices = list(devices)
        self.max_retries = ctx.options.max_retries
        self.depth = depth
        self.stop_timeout_s = stop_timeout_s
        self.startup_timeout_s = ctx.options.startup_timeout_s
        self.stall_timeout_s = ctx.options.stall_timeout_s
        self.errors: list[str] = []
        self.decode_warnings: list[dict[str, Any]] = []
        """Corrupt-but-decodable segments the workers' readers found (``DecodeWarning.as_dict``)."""
        self.phases: dict[str, float] = {}
        """``workers_ready`` and ``workers_stop`` seconds (see ExecutorStats.phases)."""
        self._mp = tmp.get_context("spawn")
        per_worker = max(1, usable_cores() // len(self.devices))
        self._read_threads = max(1, ctx.options.read_threads // len(self.devices))
        self._slots = [_Slot(i, d, per_worker) for i, d in enumerate(self.devices)]
        self._respawns_left = self.max_retries * len(self.devices)
        self._tasks = [{t.key: t for t in unit} for unit in plan.units]

    # -- supervision -------------------------------------------------------------------------

    def run(self, on_chunk: Callable[[ChunkTask, int], None]) -> PoolResult:
        """Compute every unit; ``on_chunk(task, slot)`` for each chunk a worker has written."""
        units = self.plan.units
        self._remaining = [set(self._tasks[uid]) for uid in range(len(units))]
        self._on_chunk = on_chunk
        pending: deque[int] = deque(range(len(units)))
        attempts = Attempts(self.max_retries)
        failed: dict[int, tuple[ChunkTask, ...]] = {}
        no_worker_left = None
        self._t0 = time.perf_counter()
        try:
            for i, s in enumerate(self._slots):
                self._spawn(s)
                for started in self._slots[:i]:  # their arguments, so they load in parallel
                    self._drain(started)
            while True:
                live = [s for s in self._slots if s.process is not None]
                if not pending and not any(s.inflight for s in live):
                    break
                if not live:
                    for uid in pending:
                        failed[uid] = self._unfinished(uid)
                    no_worker_left = self.errors[-1] if self.errors else "unknown"
                    self.errors.append("no worker left to run the remaining tiles")
                    break
                self._dispatch(pending)
                waitables = [s.conn for s in live] + [s.process.sentinel for s in live]
                ready = set(mp_connection.wait(waitables, timeout=1.0))
                for s in live:
                    if s.conn in ready:
                        self._drain(s)
                    if s.process.sentinel in ready:
                        self._drain(s)
                        self._on_exit(s, pending, attempts, failed)
                    else:
                        self._enforce_deadlines(s)
            t_stop = time.perf_counter()
            self._stop_all()
            self.phases["workers_stop"] = time.perf_counter() - t_stop
        except KeyboardInterrupt:
            log.warning("interrupted: letting the workers write their finished chunks")
            try:
                self._stop_all()
            except KeyboardInterrupt:
                log.warning("interrupted again: killing the workers")
            raise
        except BaseException:
            self._stop_failing()
            raise
        finally:
            self._kill_all()
        return PoolResult(failed, no_worker_left)

    def _stop_failing(self) -> None:
        """Stop the other workers of a run that has failed (bad input, a full or read-only
        disk) instead of killing them: each ends its batch and exits on its own, so what it
        holds is released. (A killed worker that has compressed a chunk leaves numcodecs'
        Blosc semaphore behind, and multiprocessing's resource tracker then warns about it
        after the run's one-line error.) A chunk that cannot be recorded now, the disk being
        full, is computed again on --resume; the run's own error is the one raised."""
        on_chunk = self._on_chunk

        def record_if_possible(task: ChunkTask, slot: int) -> None:
            with contextlib.suppress(OSError):
                on_chunk(task, slot)

        self._on_chunk = record_if_possible
        try:
            self._stop_all()
        except Exception as exc:  # the original error matters more; the kill below follows
            log.debug("stopping the workers after the run failed: %s", exc)

    def _spawn(self, s: _Slot) -> None:
        parent, child = self._mp.Pipe(duplex=True)
        s.generation += 1
        s.ready = False
        s.error = None
        s.killed_for = None
        s.finished = False
        s.inflight = {}
        s.current = None
        s.t_ready = s.t_last = None
        s.t_spawned = time.perf_counter()
        s.arguments = pickle.dumps(
            (
                os.getpid(),
                self.ctx,
                self.plan.grid,
                s.device,
                s.threads,
                self._read_threads,
                logging.getLogger("tilesegment").getEffectiveLevel(),
            )
        )
        # Only small arguments go with start(): the start-up arguments follow over the
        # connection when the worker asks (see tilesegment.infer.executors.spawn).
        process = self._mp.Process(
            target=run_worker,
            args=(s.slot, s.generation, child),  # the connection travels as multiprocessing
            name=f"tilesegment-worker-{s.slot}",  # passes it (an inherited file descriptor)
            daemon=True,
        )
        # A signal inside start() would cut the spawn data short; hold it back until the child
        # has read it (a fraction of a second). The worker imports torch with WORKER_ENV; the
        # parent's environment is restored.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            with spawn_env():
                process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        s.process = process
        child.close()  # the worker's end lives only in the worker: its death breaks the pipe
        s.conn = parent
        log.info("started worker %d on %s (pid %d)", s.slot, s.device, s.process.pid)

    def _enforce_deadlines(self, s: _Slot) -> None:
        """Kill a worker stuck on a hung GPU, a hung filesystem...: one not ready
        ``startup_timeout_s`` after its spawn (it holds no work: a failed start-up), or one
        holding work that has sent nothing for ``stall_timeout_s`` (its unit counts a failed
        attempt, as if it had crashed). Its exit is then handled as any worker's."""
        if s.killed_for is not None:
            return
        now = time.perf_counter()
        if not s.ready and now - s.t_spawned > self.startup_timeout_s:
            s.killed_for = (
                f"was killed: not ready {now - s.t_spawned:.0f} s after it was started "
                f"(--startup-timeout {self.startup_timeout_s:g})"
            )
        elif s.ready and s.inflight and now - s.t_heard > self.stall_timeout_s:
            s.killed_for = (
                f"was killed: silent {now - s.t_heard:.0f} s while computing "
                f"(--stall-timeout {self.stall_timeout_s:g})"
            )
        else:
            return
        log.warning("worker %d (pid %d) %s", s.slot, s.process.pid, s.killed_for)
        s.process.kill()

    def _dispatch(self, pending: deque[int]) -> None:
        """Top every ready worker up to ``depth`` units, round robin."""
        progress = True
        while pending and progress:
            progress = False
            for s in self._slots:
                if not pending or s.process is None or not s.ready:
                    continue
                if len(s.inflight) >= self.depth:
                    continue
                uid = pending.popleft()
                if not s.inflight:  # an idle worker's silence counts from now
                    s.t_heard = time.perf_counter()
                try:
                    s.conn.send(("unit", self._unfinished(uid)))
                except (BrokenPipeError, OSError):
                    pending.appendleft(uid)  # the worker is dying; its sentinel will tell
                    continue
                s.inflight[uid] = None
                progress = True

    def _send_arguments(self, s: _Slot) -> None:
        """Send the worker that said hello its start-up arguments. The parent holds no copy of
        the worker's end of the connection, so if the worker dies first or meanwhile the send
        fails instead of blocking; the worker's sentinel then reports the death."""
        arguments, s.arguments = s.arguments, None
        if arguments is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.conn.send_bytes(arguments)

    def _unfinished(self, uid: int) -> tuple[ChunkTask, ...]:
        return tuple(t for t in self.plan.units[uid] if t.key in self._remaining[uid])

    def _drain(self, s: _Slot) -> None:
        """Handle every message waiting on the worker's pipe."""
        while True:
            try:
                if not s.conn.poll():
                    return
                msg = s.conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            now = s.t_heard = time.perf_counter()
            if kind == "hello":
                self._send_arguments(s)
            elif kind == "ready":
                s.ready = True
                s.t_ready = s.t_last = now
                s.startup_s += now - s.t_spawned
                s.precision = msg[1]["precision"]
                if s.generation == 0 and all(x.ready or x.generation > 0 for x in self._slots):
                    self.phases.setdefault("workers_ready", now - self._t0)
            elif kind == "start":
                s.current = msg[1]
            elif kind == "chunk":
                uid, key = msg[1], tuple(msg[2])
                if key in self._remaining[uid]:
                    self._remaining[uid].discard(key)
                    task = self._tasks[uid][key]
                    self._on_chunk(task, s.slot)
                    s.tiles += len(task.tiles)
                    s.core_px += core_px(self.plan.grid, task)
                if not self._remaining[uid]:
                    s.inflight.pop(uid, None)
                s.t_last = now
            elif kind == "error":
                s.error = msg[1:]
            elif kind == "bye":
                s.finished = True
                s.peak_rss_mb = max(s.peak_rss_mb, msg[1]["peak_rss_mb"])
                for key, value in msg[1]["seconds"].items():
                    s.accounts[key] = s.accounts.get(key, 0.0) + value
                self.decode_warnings.extend(msg[1]["decode_warnings"])

    def _on_exit(
        self,
        s: _Slot,
        pending: deque[int],
        attempts: Attempts,
        failed: dict[int, tuple[ChunkTask, ...]],
    ) -> None:
        """A worker process ended: re-queue its units, respawn it, or give up on them."""
        s.process.join()
        code = s.process.exitcode
        self._close(s)
        if s.finished and code == 0 and not s.inflight:
            return
        if s.error is not None:
            blob, text, tb = s.error
            reason = f"raised {text}"
            log.debug("worker %d traceback:\n%s", s.slot, tb)
            exc = _unpack(blob)
            if exc is not None and not retryable(exc):
                raise exc
        else:
            reason = s.killed_for or _exit_reason(code)
        when = "" if s.ready or s.killed_for else " during start-up"
        message = f"worker {s.slot} ({s.device}, pid {s.process.pid}) {reason}{when}"
        self.errors.append(message)
        requeue = f"; re-queuing its {len(s.inflight)} units of work" if s.inflight else ""
        log.warning("%s%s", message, requeue)
        # Only the unit being computed counts an attempt; the ones queued behind it are
        # innocent and go back first.
        for uid in reversed(s.inflight):
            if uid != s.current:
                pending.appendleft(uid)
        if s.current in s.inflight:
            uid = s.current
            if attempts.failed(uid):
                failed[uid] = self._unfinished(uid)
                n = _n_tiles(failed[uid])
                log.error("giving up on %d tiles after %d attempts", n, attempts[uid])
            else:
                pending.append(uid)
        s.inflight = {}
        s.current = None
        if self._respawns_left > 0 and pending:
            self._respawns_left -= 1
            s.restarts += 1
            self._spawn(s)
        else:
            s.process = None

    def _close(self, s: _Slot) -> None:
        if s.t_ready is not None and s.t_last is not None:
            s.busy_s += s.t_last - s.t_ready
            s.t_ready = s.t_last = None
        if s.conn is not None:
            s.conn.close()
            s.conn = None

    def _stop_all(self) -> None:
        """Ask every worker to stop after its current batch; record what they finish.

        A worker still starting (importing torch, loading the model) has written nothing and
        would read the request only once started, which takes seconds per worker on a busy
        machine: it is killed at once, so that a signal during start-up is honoured promptly.
        """
        for s in self._slots:
            if s.process is not None and s.conn is not None:
                self._drain(s)  # a worker may have become ready meanwhile
                if not s.ready:
                    self._kill(s, "still starting")
        live = [s for s in self._slots if s.process is not None and s.conn is not None]
        for s in live:
            with contextlib.suppress(BrokenPipeError, OSError):
                s.conn.send(("stop",))
        deadline = time.monotonic() + self.stop_timeout_s
        while live and time.monotonic() < deadline:
            waitables = [s.conn for s in live] + [s.process.sentinel for s in live]
            ready = set(mp_connection.wait(waitables, timeout=0.5))
            for s in list(live):
                if s.conn in ready:
                    self._drain(s)
                if s.process.sentinel in ready:
                    self._drain(s)
                    s.process.join()
                    self._report_stop(s)
                    self._close(s)
                    s.process = None
                    live.remove(s)

    def _report_stop(self, s: _Slot) -> None:
        """Say how a worker asked to stop ended, if not cleanly. Every chunk it reported is
        written (a chunk is reported only once stored), so the output stands; the report and
        the log still tell, since a worker that crashes on its way out may be failing."""
        code = s.process.exitcode
        if s.error is not None:
            message = f"worker {s.slot} ({s.device}) raised {s.error[1]}"
        elif code != 0 or not s.finished:
            said = "after its goodbye" if s.finished else "without saying goodbye"
            message = (
                f"worker {s.slot} ({s.device}, pid {s.process.pid}) {_exit_reason(code)} "
                f"{said} once asked to stop; the chunks it reported are written"
            )
        else:
            return
        self.errors.append(message)
        log.warning("%s", message)

    def _kill_all(self) -> None:
        for s in self._slots:
            if s.process is not None:
                self._kill(s)

    def _kill(self, s: _Slot, why: str = "") -> None:
        if s.process.is_alive():
            reason = f" ({why})" if why else ""
            log.warning("killing worker %d (pid %d)%s", s.slot, s.process.pid, reason)
            s.process.kill()
        s.process.join()
        self._close(s)
        s.process = None

    # -- results -----------------------------------------------------------------------------

    def device_stats(self) -> list[dict[str, Any]]:
        """Per worker slot: device, threads, tiles, Mpx, busy seconds, Mpx/s, restarts."""
        out = []
        for s in self._slots:
            busy = s.busy_s
            if s.t_ready is not None and s.t_last is not None:
                busy += s.t_last - s.t_ready
            out.append(
                device_entry(
                    s.slot,
                    s.device,
                    s.threads,
                    s.precision,
                    tiles=s.tiles,
                    core_px=s.core_px,
                    busy_seconds=busy,
                    restarts=s.restarts,
                    peak_rss_mb=round(s.peak_rss_mb, 1),
                    startup_seconds=round(s.startup_s, 3),
                    **{k: round(v, 3) for k, v in s.accounts.items()},
                )
            )
        return out

    def peak_rss_mb(self) -> float:
        """The largest peak RSS a worker reported (each measures its own; the kernel's
        ``RUSAGE_CHILDREN`` figure would include the parent's peak, see :func:`peak_rss_mb`)."""
        return max((s.peak_rss_mb for s in self._slots), default=0.0)


def _exit_reason(code: int | None) -> str:
    """How a worker process ended, from its exit code (negative: the signal that killed it)."""
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _unpack(blob: bytes | None) -> BaseException | None:
    if blob is None:
        return None
    try:
        exc = pickle.loads(blob)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None


def _n_tiles(tasks: tuple[ChunkTask, ...]) -> int:
    return sum(len(t.tiles) for t in tasks)
