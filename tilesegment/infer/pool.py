"""The device worker pool: one process per device, each with its own model copy and reader.

Design
------
* **Processes, spawned.** ``torch.multiprocessing``'s ``spawn`` context (CUDA cannot be
  forked). A worker receives paths and small specs only (:class:`~tilesegment.infer.pipeline.
  _Context`, the tile grid), loads the checkpoint from its path (never a pickled module), opens
  its own slide reader and reopens the output store.
* **Tiles travel as specs, pixels never cross a process boundary.** The parent sends *units*
  (a block of chunks with the grid indices of their tiles); the worker reads the block from
  the slide itself (decoding in its own reader threads, in parallel with the other workers),
  predicts, assembles whole chunks and writes them to the store. A chunk belongs to one unit
  and a unit to one worker at a time, so no two writers ever touch a chunk. The only traffic
  back is "chunk (i, j) is written": the parent then records it in the durable done log.
  Shipping pixels (shared memory) or probabilities back would cost copies and a parent-side
  bottleneck for no gain, since every worker can read the slide file directly.
* **Bounded.** Each worker holds at most ``depth`` units (one computing, the rest prefetching
  and queued); the parent holds only the plan (chunk specs), so memory does not grow with the
  slide.
* **Threads.** CPU workers split the cores: ``torch.set_num_threads(cores // workers)`` and
  ``read_threads // workers`` reader threads each (at least one).
* **Faults.** A worker that raises or exits has its in-flight units re-queued (only their
  unfinished chunks) and is respawned, up to ``max_retries`` attempts per unit and
  ``max_retries * workers`` respawns; then the run stops with the failed tiles. Errors about
  the input (:class:`SlideReadError`, :class:`ConfigError`, :class:`ModelError`,
  :class:`StoreError`) are deterministic and stop the run at once with the same error.
* **Parent death.** Workers ask the kernel to SIGKILL them when the parent dies (Linux
  ``PR_SET_PDEATHSIG``) and exit when their pipe closes, so a killed run leaves no orphan
  writing into the output a resumed run owns.
* **SIGINT, SIGTERM.** Workers ignore them; the parent tells them to stop after their
  current batch, records the chunks they finish writing, then re-raises.

CUDA workers use channels-last, ``torch.inference_mode``, bf16/fp16 autocast, a reused pinned
host buffer for the host-to-device copy and, with ``compile``, ``torch.compile``; a batch
that runs out of device memory is split in halves (see :class:`~tilesegment.infer.pipeline.
BatchSize`).

Test-only fault hook
--------------------
``TILESEGMENT_FAULT_INJECT="worker=0,after=3,mode=exit"`` (read only inside workers, never by
the parent or the in-process path) makes worker slot 0 fail after writing 3 chunks. Keys:
``worker`` (slot; default any), ``after`` (chunks written first; 0 = at the first tile),
``tile=ROW.COL`` (fail when that tile is about to be predicted, whatever the worker),
``mode`` = ``exit`` (``os._exit(86)``), ``kill`` (SIGKILL itself) or ``raise``
(``RuntimeError``), ``gen`` = ``first`` (default: only the first process of the slot, so the
respawned worker succeeds) or ``all``; ``startup=SECONDS`` makes the worker sleep that long
before loading the model (a slow start-up, to test signals during it; no fault then unless
``after``, ``tile`` or ``mode`` is also given). It exists to test fault tolerance and is not a
feature.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import queue
import resource
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Any

import numpy as np

from tilesegment.destinations import NO_SPACE
from tilesegment.errors import ConfigError, ModelError, SlideReadError, StoreError
from tilesegment.infer.capacity import cap_cpu_workers
from tilesegment.infer.pipeline import (
    ChunkTask,
    Unit,
    WorkPlan,
    _Context,
    _core_px,
    open_source,
    stream_units,
)
from tilesegment.infer.predict import Predictor
from tilesegment.infer.spawn import HELD_SIGNALS, run_worker

log = logging.getLogger(__name__)

FAULT_ENV = "TILESEGMENT_FAULT_INJECT"

#: Errors a retry cannot fix: they stop the run at once, with the same class.
_DETERMINISTIC = (SlideReadError, ConfigError, ModelError, StoreError)


# ---------------------------------------------------------------------------------------------
# devices and precision


def resolve_devices(device: str, workers: int | None = None) -> list[str]:
    """One torch device string per worker process.

    ``"auto"`` is every visible GPU, else the CPU; ``"cpu"`` is ``workers`` CPU workers (one
    by default); ``"cuda:0,cuda:1"`` one worker per listed device (``"cuda"`` = ``"cuda:0"``).
    """
    spec = device.strip().lower()
    if spec == "auto":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        entries = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    else:
        entries = [d.strip() for d in spec.split(",") if d.strip()]
    if not entries:
        raise ConfigError(f"--devices {device!r} names no device")
    out = []
    for entry in entries:
        if entry == "cpu":
            out.append("cpu")
            continue
        name, _, index = entry.partition(":")
        if name != "cuda" or (index and not index.isdigit()):
            raise ConfigError(f"--devices: {entry!r} is not cpu, cuda or cuda:N")
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        i = int(index or 0)
        if i >= count:
            raise ConfigError(
                f"--devices: {entry} is not available (this machine has {count} CUDA devices); "
                "use --devices cpu"
            )
        out.append(f"cuda:{i}")
    if workers is not None:
        if out != ["cpu"]:
            raise ConfigError("--workers sets the number of CPU workers; use it with --devices cpu")
        out = ["cpu"] * cap_cpu_workers(workers)
    return out


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix maths natively (AVX-512 BF16 or AMX on x86-64).

    Elsewhere torch emulates bf16 on the CPU, which is slower than fp32, so ``auto`` keeps fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: str) -> str:
    """The autocast precision for ``device``.

    ``auto`` is bf16 on a CPU with native bf16 (about twice the fp32 speed; outputs within
    2/255 of fp32) and fp32 on other CPUs; on CUDA it is bf16 where the device supports it,
    else fp16. fp32 gives the tightest tiling invariance (within 1/255 of a whole-image pass).
    """
    is_cuda = device.startswith("cuda")
    if precision == "auto":
        if not is_cuda:
            return "bf16" if cpu_has_native_bf16() else "fp32"
        import torch

        with torch.cuda.device(device):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not is_cuda:
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {precision!r} must be auto, fp32, bf16 or fp16")
    return precision


class PinnedPredictor(Predictor):
    """A CUDA predictor that stages each uint8 batch in one reused page-locked host buffer, so
    the host-to-device copy is a DMA that does not block the host.

    The buffer is overwritten only after the previous batch's work on the device is done
    (an event recorded after it is synchronised first), so reuse is safe whoever calls.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._staging = None
        self._in_use = None

    def probabilities(self, batch: np.ndarray):
        import torch

        if self._in_use is not None:
            self._in_use.synchronize()
        if self._staging is None or self._staging.numel() < batch.size:
            self._staging = torch.empty(batch.size, dtype=torch.uint8).pin_memory()
        view = self._staging[: batch.size].view(batch.shape).numpy()
        np.copyto(view, batch)
        out = super().probabilities(view)
        self._in_use = torch.cuda.Event()
        self._in_use.record()
        return out


def make_predictor(net, spec, device: str, precision: str, *, compile: bool = False) -> Predictor:
    """The predictor a worker uses on ``device`` (channels-last; pinned staging on CUDA)."""
    import torch

    if device.startswith("cuda"):
        # Make it the current device, so that pinned buffers, events and streams belong to it
        # (not to cuda:0 in every worker).
        torch.cuda.set_device(device)
    cls = PinnedPredictor if device.startswith("cuda") else Predictor
    predictor = cls(net, spec, device=device, precision=precision, channels_last=True)
    if compile:
        predictor.model = CompiledOrEager(predictor.model)
    return predictor


class CompiledOrEager:
    """A model behind ``torch.compile`` that falls back to eager mode for good when compiling
    or running the compiled graph raises (no C++ compiler, an op inductor cannot lower...).

    Attribute access reaches the model (``halo``, ``output_size``...), as with
    ``torch.compile``'s own wrapper. Compilation happens at the first call, per input shape.
    """

    def __init__(self, model) -> None:
        import torch

        self.eager = model
        self.compiled = torch.compile(model)
        self.failed: str | None = None

    def __call__(self, x):
        import torch

        if self.failed is None:
            try:
                return self.compiled(x)
            except torch.OutOfMemoryError:
                raise  # the batch is halved by the caller; compiling is not to blame
            except Exception as exc:  # any failure of the compiler stack
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.failed = f"{type(exc).__name__}: {first}"
                log.warning("torch.compile failed (%s); running the model eagerly", self.failed)
        return self.eager(x)

    def __getattr__(self, name: str):
        if name in ("eager", "compiled", "failed"):  # not set yet (unpickling, __init__)
            raise AttributeError(name)
        return getattr(self.eager, name)


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB.

    ``VmHWM`` from ``/proc/self/status`` on Linux, not ``ru_maxrss``: a spawned process
    inherits the latter from the parent it was forked from (it survives ``exec``), so a worker
    would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _mallopt(option: int, value: int) -> bool:
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(option, value))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count (``VmHWM``) from its current RSS, so that a run's
    report holds its own peak, not that of an earlier run in the same process (a batch of
    slides, a notebook). Linux only (``/proc/self/clear_refs``); returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tune_malloc(arenas: int = 2) -> bool:
    """Tune glibc's malloc for tile-sized buffers in this process.

    * Cap the arenas (unless ``MALLOC_ARENA_MAX`` is set). glibc gives busy threads arenas of
      their own (up to 8 per core); the reader, writer, Zarr and OpenMP threads of a run each
      keep freed tile-sized buffers in theirs, so peak RSS crept up with the number of tiles
      (measured: +27 MB from a 20k² to an 80k² slide, and ~75 MB more overall). Two arenas
      keep it flat at no measurable cost to the forward pass (see benchmarks/RESULTS.md).
    * Undo a small ``MALLOC_TRIM_THRESHOLD_`` (dask's nanny sets 65536 in every worker it
      spawns): it turns off glibc's adaptive mmap threshold, so every feature map of the
      forward pass is a fresh ``mmap`` whose pages fault in again, and the forward pass took
      1.7x as long (75 vs 44 ms per 572 px bf16 tile here). The thresholds go back to the
      values glibc's adaptation reaches on its own (32 MB mmap, 64 MB trim).

    Returns whether the arena limit was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        _mallopt(m_mmap_threshold, 32 * 2**20)
        _mallopt(m_trim_threshold, 64 * 2**20)
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    m_arena_max = -8
    return _mallopt(m_arena_max, arenas)


# ---------------------------------------------------------------------------------------------
# the test-only fault hook


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """A parsed ``TILESEGMENT_FAULT_INJECT`` value (see the module docstring)."""

    worker: int | None = None
    after: int = 1
    tile: tuple[int, int] | None = None
    mode: str = "exit"
    every_generation: bool = False
    startup_s: float = 0.0
    fails: bool = True
    """False when the spec only slows the start-up down."""

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        values: dict[str, Any] = {}
        try:
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, _, value = part.partition("=")
                if key == "worker":
                    values["worker"] = int(value)
                elif key == "after":
                    values["after"] = int(value)
                elif key == "tile":
                    row, col = value.split(".")
                    values["tile"] = (int(row), int(col))
                elif key == "mode" and value in ("exit", "kill", "raise"):
                    values["mode"] = value
                elif key == "gen" and value in ("first", "all"):
                    values["every_generation"] = value == "all"
                elif key == "startup":
                    values["startup_s"] = float(value)
                else:
                    raise ValueError(part)
        except ValueError as exc:
            raise ConfigError(f"{FAULT_ENV}={text!r}: cannot parse {exc}") from exc
        values["fails"] = bool(set(values) & {"after", "tile", "mode"}) or "startup_s" not in values
        return cls(**values)


class FaultInjector:
    """Fires the configured fault in a worker; inert unless ``TILESEGMENT_FAULT_INJECT`` is set."""

    def __init__(self, spec: FaultSpec | None, slot: int, generation: int) -> None:
        self.spec = spec
        self.active = (
            spec is not None
            and spec.worker in (None, slot)
            and (spec.every_generation or generation == 0)
        )
        self._chunks = 0
        self._where = f"worker {slot} generation {generation}"

    @classmethod
    def from_env(cls, slot: int, generation: int) -> FaultInjector:
        text = os.environ.get(FAULT_ENV, "")
        return cls(FaultSpec.parse(text) if text else None, slot, generation)

    def starting(self) -> None:
        """Sleep for the configured start-up delay, if any."""
        if self.active and self.spec.startup_s > 0:
            log.warning("slowing the start-up of %s by %g s", self._where, self.spec.startup_s)
            time.sleep(self.spec.startup_s)

    def tile_started(self, tile) -> None:
        if not self.active or not self.spec.fails:
            return
        if self.spec.tile == tile.index or (self.spec.tile is None and self.spec.after == 0):
            self._fire(f"at tile {tile.index}")

    def chunk_written(self) -> None:
        if not self.active or not self.spec.fails or self.spec.tile is not None:
            return
        self._chunks += 1
        if self._chunks == self.spec.after:
            self._fire(f"after {self._chunks} chunks")

    def _fire(self, when: str) -> None:
        log.warning("injecting a fault (%s) in %s %s", self.spec.mode, self._where, when)
        if self.spec.mode == "exit":
            os._exit(86)
        if self.spec.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault in {self._where} {when}")


# ---------------------------------------------------------------------------------------------
# the worker process


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit if it has."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(70)


class _Outbox:
    """Messages to the parent, from any thread of the worker."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, *msg: Any) -> None:
        try:
            with self._lock:
                self._conn.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            os._exit(70)  # the parent is gone; nothing we write can be recorded


class _Inbox:
    """Units from the parent, received by a thread so the worker never blocks on the pipe.

    Implements :class:`~tilesegment.infer.pipeline.UnitSource`. ``stop`` is set by the
    parent's stop message; a closed pipe (the parent died) ends the process.
    """

    def __init__(self, conn) -> None:
        self._conn = conn
        self._queue: queue.Queue[Unit | None] = queue.Queue()
        self.stop = threading.Event()
        threading.Thread(target=self._receive, name="ts-inbox", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                os._exit(70)
            if msg[0] == "unit":
                self._queue.put(msg[1])
            else:  # "stop"
                self.stop.set()
                self._queue.put(None)
                return

    def next(self, *, block: bool) -> Unit | None:
        if self.stop.is_set():
            return None
        try:
            return self._queue.get(block=block)
        except queue.Empty:
            return None


def _pack_error(exc: BaseException) -> tuple[bytes | None, str, str]:
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, f"{type(exc).__name__}: {exc}", traceback.format_exc()


def worker_main(
    slot: int,
    generation: int,
    parent_pid: int,
    ctx: _Context,
    grid,
    device: str,
    threads: int,
    read_threads: int,
    log_level: int,
    conn,
) -> None:
    """The body of a worker process (started through :func:`tilesegment.infer.spawn.run_worker`)."""
    _die_with_parent(parent_pid)
    tune_malloc()
    # The parent decides when to stop (a terminal's Ctrl-C or a scheduler's SIGTERM reach the
    # whole process group); it tells the workers, and they die with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,
        format=f"%(levelname)s %(name)s [worker {slot}]: %(message)s",
        stream=sys.stderr,
    )
    out = _Outbox(conn)
    try:
        import torch

        from tilesegment.io import open_slide
        from tilesegment.model.checkpoint import load_checkpoint
        from tilesegment.store import OutputStore

        fault = FaultInjector.from_env(slot, generation)
        fault.starting()
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        net, spec = load_checkpoint(ctx.model, device="cpu")
        precision = resolve_precision(ctx.options.precision, device)
        predictor = make_predictor(net, spec, device, precision, compile=ctx.options.compile)
        with open_slide(ctx.slide) as reader:
            source = open_source(reader, spec, ctx.options)
            store = OutputStore.open(ctx.output, mode="r+")
            out.send("ready", {"pid": os.getpid(), "threads": threads, "precision": precision})
            inbox = _Inbox(conn)

            def on_chunk(task: ChunkTask) -> None:
                out.send("chunk", task.unit, task.key)
                fault.chunk_written()

            stats = stream_units(
                inbox,
                reader=source.reader,
                level=source.level,
                grid=grid,
                predictor=predictor,
                classes=spec.unet.classes,
                channels=spec.unet.in_channels,
                store=store,
                tissue=ctx.tissue,
                batch_size=ctx.options.batch_size,
                read_threads=read_threads,
                on_chunk=on_chunk,
                on_tile=fault.tile_started,
                on_unit=lambda unit: out.send("start", unit[0].unit),
                stop=inbox.stop,
            )
            decode_warnings = [w.as_dict() for w in reader.decode_warnings()]
        out.send(
            "bye",
            {
                "peak_rss_mb": peak_rss_mb(),
                "batch_size": stats.batch_size,
                "decode_warnings": decode_warnings,
            },
        )
    except BaseException as exc:
        out.send("error", *_pack_error(exc))
        sys.exit(1)  # a normal exit, so that finalisers release shared semaphores


# ---------------------------------------------------------------------------------------------
# the parent side


@dataclass(eq=False)
class _Slot:
    """One device's worker, across respawns."""

    slot: int
    device: str
    threads: int
    generation: int = -1
    process: Any = None
    conn: Any = None
    ready: bool = False
    inflight: dict[int, None] = field(default_factory=dict)
    current: int | None = None
    """The unit the worker said it is computing (the one to blame if it fails)."""
    error: tuple[bytes | None, str, str] | None = None
    finished: bool = False
    restarts: int = 0
    tiles: int = 0
    core_px: int = 0
    t_ready: float | None = None
    t_last: float | None = None
    busy_s: float = 0.0
    peak_rss_mb: float = 0.0
    precision: str = ""


@dataclass(frozen=True, slots=True)
class PoolResult:
    """What the pool could not do: failed units with their unfinished chunks."""

    failed: dict[int, tuple[ChunkTask, ...]]


class WorkerPool:
    """Runs a :class:`~tilesegment.infer.pipeline.WorkPlan` on one worker process per device.

    Lifecycle: construct, call :meth:`run` once (it starts, feeds, supervises and stops the
    workers; on return or on an exception no worker is left running), then read
    :meth:`device_stats`. Not thread-safe, not picklable.
    """

    def __init__(
        self,
        ctx: _Context,
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
        self.errors: list[str] = []
        self.decode_warnings: list[dict[str, Any]] = []
        """Corrupt-but-decodable segments the workers' readers found (``DecodeWarning.as_dict``)."""
        self._mp = tmp.get_context("spawn")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        per_worker = max(1, (cores or 1) // len(self.devices))
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
        attempts: Counter[int] = Counter()
        failed: dict[int, tuple[ChunkTask, ...]] = {}
        try:
            for s in self._slots:
                self._spawn(s)
            while True:
                live = [s for s in self._slots if s.process is not None]
                if not pending and not any(s.inflight for s in live):
                    break
                if not live:
                    for uid in pending:
                        failed[uid] = self._unfinished(uid)
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
            self._stop_all()
        except KeyboardInterrupt:
            log.warning("interrupted: letting the workers write their finished chunks")
            try:
                self._stop_all()
            except KeyboardInterrupt:
                log.warning("interrupted again: killing the workers")
            raise
        finally:
            self._kill_all()
        return PoolResult(failed)

    def _spawn(self, s: _Slot) -> None:
        parent, child = self._mp.Pipe(duplex=True)
        s.generation += 1
        s.ready = False
        s.error = None
        s.finished = False
        s.inflight = {}
        s.current = None
        s.t_ready = s.t_last = None
        payload = pickle.dumps(
            (
                s.slot,
                s.generation,
                os.getpid(),
                self.ctx,
                self.plan.grid,
                s.device,
                s.threads,
                self._read_threads,
                logging.getLogger("tilesegment").getEffectiveLevel(),
            )
        )
        process = self._mp.Process(
            target=run_worker,
            args=(payload, child),  # the pipe end travels the way multiprocessing passes it
            name=f"tilesegment-worker-{s.slot}",
            daemon=True,
        )
        # A signal inside start() would cut the payload short; hold it back until the child
        # has read it (a fraction of a second: see tilesegment.infer.spawn).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        s.process = process
        child.close()
        s.conn = parent
        log.info("started worker %d on %s (pid %d)", s.slot, s.device, s.process.pid)

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
                try:
                    s.conn.send(("unit", self._unfinished(uid)))
                except (BrokenPipeError, OSError):
                    pending.appendleft(uid)  # the worker is dying; its sentinel will tell
                    continue
                s.inflight[uid] = None
                progress = True

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
            now = time.perf_counter()
            if kind == "ready":
                s.ready = True
                s.t_ready = s.t_last = now
                s.precision = msg[1]["precision"]
            elif kind == "start":
                s.current = msg[1]
            elif kind == "chunk":
                uid, key = msg[1], tuple(msg[2])
                if key in self._remaining[uid]:
                    self._remaining[uid].discard(key)
                    task = self._tasks[uid][key]
                    self._on_chunk(task, s.slot)
                    s.tiles += len(task.tiles)
                    s.core_px += _core_px(self.plan.grid, task)
                if not self._remaining[uid]:
                    s.inflight.pop(uid, None)
                s.t_last = now
            elif kind == "error":
                s.error = msg[1:]
            elif kind == "bye":
                s.finished = True
                s.peak_rss_mb = max(s.peak_rss_mb, msg[1]["peak_rss_mb"])
                self.decode_warnings.extend(msg[1]["decode_warnings"])

    def _on_exit(
        self,
        s: _Slot,
        pending: deque[int],
        attempts: Counter[int],
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
            if isinstance(exc, _DETERMINISTIC) or _cannot_write(exc):
                raise exc
        elif code is not None and code < 0:
            reason = f"was killed by signal {-code}"
        else:
            reason = f"exited with code {code}"
        message = f"worker {s.slot} ({s.device}, pid {s.process.pid}) {reason}"
        self.errors.append(message)
        log.warning("%s; re-queuing its %d units of work", message, len(s.inflight))
        # Only the unit being computed counts an attempt; the ones queued behind it are
        # innocent and go back first.
        for uid in reversed(s.inflight):
            if uid != s.current:
                pending.appendleft(uid)
        if s.current in s.inflight:
            uid = s.current
            attempts[uid] += 1
            if attempts[uid] > self.max_retries:
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
                    if s.error is not None:
                        self.errors.append(f"worker {s.slot} ({s.device}) raised {s.error[1]}")
                    self._close(s)
                    s.process = None
                    live.remove(s)

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
                {
                    "worker": s.slot,
                    "device": s.device,
                    "threads": s.threads,
                    "precision": s.precision,
                    "tiles": s.tiles,
                    "megapixels": s.core_px / 1e6,
                    "busy_seconds": round(busy, 3),
                    "mpx_per_s": round(s.core_px / 1e6 / busy, 4) if busy > 0 else None,
                    "restarts": s.restarts,
                    "peak_rss_mb": round(s.peak_rss_mb, 1),
                }
            )
        return out

    def peak_rss_mb(self) -> float:
        """The largest peak RSS a worker reported (each measures its own; the kernel's
        ``RUSAGE_CHILDREN`` figure would include the parent's peak, see :func:`peak_rss_mb`)."""
        return max((s.peak_rss_mb for s in self._slots), default=0.0)


def _unpack(blob: bytes | None) -> BaseException | None:
    if blob is None:
        return None
    try:
        exc = pickle.loads(blob)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None


def _cannot_write(exc: BaseException | None) -> bool:
    """A full or read-only filesystem: every worker would fail the same way, so the run stops
    at once (with the error itself, which the command line turns into one line)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE | {errno.EROFS}


def _n_tiles(tasks: tuple[ChunkTask, ...]) -> int:
    return sum(len(t.tiles) for t in tasks)
