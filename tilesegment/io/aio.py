"""Reading Zarr arrays so that a failed or interrupted read leaves no asyncio task behind.

``zarr.Array.__getitem__`` runs every read on zarr's one process-wide event loop thread. When a
chunk fails to decode (a corrupt or truncated TIFF), or the caller is interrupted while it waits
(Ctrl-C, or SIGTERM turned into ``KeyboardInterrupt`` during the thumbnail), zarr returns at once
and leaves the read's other chunk tasks pending on that loop. At interpreter exit zarr closes the
loop under them, and asyncio prints hundreds to thousands of lines ("Task was destroyed but it is
pending!", "RuntimeError: Event loop is closed") after our one-line error.

:func:`read_selection` runs the read with zarr's public async API on an event loop that serves
only the calling thread, in a thread of its own, and does not return or re-raise before every
task the read started has ended: on a decode error the read's other tasks are cancelled and
awaited; on ``KeyboardInterrupt`` in the caller the read is cancelled and the caller waits for
that to finish. The loop runs in its own thread so that signals (delivered to the main thread)
never interrupt asyncio's or zarr's own code half-way, and it is reused across reads (a new loop
per read, as ``asyncio.run`` makes, halved the read rate of 572-px tiles).

Private to :mod:`tilesegment.io`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import zarr

CANCEL_WAIT_S = 30.0
"""How long an interrupted caller waits for its read's tasks to end (decodes in flight finish)."""


class _LoopThread:
    """An event loop in a daemon thread, serving the reads of one calling thread.

    Lifecycle: made on the calling thread's first read, kept in a ``threading.local``; when that
    thread ends and the object is collected, the loop is stopped and closed (which shuts down its
    default executor, where tifffile decodes tiles with ``asyncio.to_thread``).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # the thread must not reference self, or self would live as long as the loop runs
        threading.Thread(
            target=_serve, args=(self.loop,), name="tilesegment-read-loop", daemon=True
        ).start()

    def __del__(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


_local = threading.local()


def _loop_thread() -> _LoopThread:
    served = getattr(_local, "served", None)
    if served is None:
        served = _local.served = _LoopThread()
    return served


def _reset_after_fork() -> None:
    global _local
    _local = threading.local()  # the parent's loop threads do not exist in the child


os.register_at_fork(after_in_child=_reset_after_fork)


async def _read_then_settle(array: zarr.Array, selection: tuple[int | slice, ...]) -> Any:
    """Read; whatever happens, then cancel and await every other task on this loop."""
    try:
        return await array.async_array.getitem(selection)
    finally:
        current = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for task in left:
            task.cancel()
        # return_exceptions: each outcome is retrieved, so asyncio logs nothing at exit
        await asyncio.gather(*left, return_exceptions=True)


def _hand_over(outcome: Future[Any], task: asyncio.Task[Any]) -> None:
    """Copy a finished task's result, error or cancellation to the caller's future."""
    if outcome.done():
        return
    if task.cancelled():
        outcome.set_exception(asyncio.CancelledError())
    elif task.exception() is not None:
        outcome.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        outcome.set_result(task.result())


def read_selection(array: zarr.Array, selection: tuple[int | slice, ...]) -> np.ndarray:
    """``array[selection]``, read so that nothing of it is left running when this returns.

    Raises what the read raises (decode errors), or the caller's ``KeyboardInterrupt``, only
    after the read's tasks have ended (waiting at most :data:`CANCEL_WAIT_S` when interrupted).
    Every coroutine is made in the loop's thread, so an interrupt in the caller never leaves one
    unawaited. Thread-safe: each calling thread has its own loop. Works from async code too (a
    Jupyter cell): the read runs on its own loop's thread, the caller's thread only waits.
    """
    loop = _loop_thread().loop
    outcome: Future[Any] = Future()
    stop = threading.Event()
    started: list[asyncio.Task[Any]] = []

    def start() -> None:  # runs in the loop's thread
        if not stop.is_set():
            task = loop.create_task(_read_then_settle(array, selection))
            task.add_done_callback(functools.partial(_hand_over, outcome))
            started.append(task)

    def cancel() -> None:  # runs in the loop's thread, after start (callbacks run in order)
        if started:
            started[0].cancel()  # its done callback completes ``outcome``
        elif not outcome.done():
            outcome.set_result(None)  # never started: nothing to wait for

    try:
        loop.call_soon_threadsafe(start)
        return np.asarray(outcome.result())
    except BaseException:
        stop.set()
        loop.call_soon_threadsafe(cancel)
        wait([outcome], timeout=CANCEL_WAIT_S)
        raise
