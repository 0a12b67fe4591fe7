"""The worker process of the pool: loads its own model copy, opens its own reader and store,
streams the units its parent sends and reports each chunk it has written."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from typing import Any

from tilesegment.infer.devices import cpu_seconds, peak_rss_mb, resolve_precision, tune_malloc
from tilesegment.infer.executors.base import RunContext
from tilesegment.infer.executors.faults import FaultInjector
from tilesegment.infer.plan import ChunkTask, Unit
from tilesegment.infer.source import open_source
from tilesegment.infer.stream import StreamStats, stream_units

log = logging.getLogger(__name__)


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

    Implements :class:`~tilesegment.infer.stream.UnitSource`. ``stop`` is set by the
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


def pack_error(exc: BaseException) -> tuple[bytes | None, str, str]:
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, f"{type(exc).__name__}: {exc}", traceback.format_exc()


def _setup_process(slot: int, parent_pid: int, log_level: int) -> None:
    """Die with the parent, tune malloc, leave signals to the parent, log with the slot."""
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


def _goodbye(stats: StreamStats, decode_warnings: list[dict]) -> dict[str, Any]:
    """What a worker tells its parent when its stream has ended: its peak memory, batch size,
    decode warnings and where its time went (the report's per-worker accounts)."""
    return {
        "peak_rss_mb": peak_rss_mb(),
        "batch_size": stats.batch_size,
        "decode_warnings": decode_warnings,
        "seconds": {
            "forward_seconds": stats.forward_seconds,
            "first_batch_seconds": stats.first_batch_seconds,
            "cpu_seconds": cpu_seconds(),
        },
    }


def worker_main(
    slot: int,
    generation: int,
    parent_pid: int,
    ctx: RunContext,
    grid,
    device: str,
    threads: int,
    read_threads: int,
    log_level: int,
    conn,
) -> None:
    """The body of a worker process (started through
    :func:`tilesegment.infer.executors.spawn.run_worker`)."""
    _setup_process(slot, parent_pid, log_level)
    out = _Outbox(conn)
    try:
        import torch

        from tilesegment.infer.predict import make_predictor
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
        predictor = make_predictor(
            net, spec, device, precision, compile=ctx.options.compile, tta=ctx.options.tta
        )
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
        out.send("bye", _goodbye(stats, decode_warnings))
        fault.finished()
    except BaseException as exc:
        out.send("error", *pack_error(exc))
        sys.exit(1)  # a normal exit, so that finalisers release shared semaphores
