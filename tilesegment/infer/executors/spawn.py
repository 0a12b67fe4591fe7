"""The entry point of a pool worker process, importable without torch.

``multiprocessing``'s spawn start method pickles a process's target and arguments into a pipe,
and the parent's ``Process.start()`` returns only once the child has read them all. Two things
follow, and both shaped this module:

* The child unpickles as it reads, so a target in a module that imports torch (or arguments
  whose classes do) made every child import torch before the parent could go on: ``start()``
  took 3-4 s per worker on a 2-core machine and the workers started one after the other. Here
  the target is light and nothing heavy is imported before the arguments are read.
* The parent writes that pickle while it still holds the child's end of the pipe open. A child
  that dies before reading it (killed at start-up, an interpreter that cannot start) leaves the
  write blocked for good once the pipe's 64 KiB buffer is full: the run hung.

So ``Process.start()`` carries only the slot, the generation and the worker's end of its
connection (a few hundred bytes in all). The worker then says ``("hello",)`` and reads its
start-up arguments (the run context, the grid: one pickled ``bytes``) from the connection. The
parent sends them from its supervision loop, which waits on every worker's connection and
process sentinel, and it holds no copy of the worker's end, so a worker that dies makes the
send fail at once and its sentinel reports the death (see
:meth:`tilesegment.infer.executors.pool.WorkerPool._send_arguments`).

The parent blocks SIGINT and SIGTERM during ``start()`` (a signal there would cut the spawn
data short), which the child inherits; it unblocks them here, after ignoring them (the parent
tells its workers when to stop).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal

from tilesegment.errors import ConfigError
from tilesegment.infer.executors.faults import FaultInjector

#: The signals the parent holds back while it starts a worker.
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def run_worker(slot: int, generation: int, conn) -> None:
    """Ask the parent for the worker's start-up arguments over ``conn`` (the worker's end of
    its connection), then run :func:`tilesegment.infer.executors.pool_worker.worker_main`
    with them."""
    for signum in HELD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    try:
        conn.send(("hello",))
        with contextlib.suppress(ConfigError):  # a malformed hook: worker_main reports it
            FaultInjector.from_env(slot, generation).arguments_requested()
        arguments = conn.recv_bytes()
    except (EOFError, OSError):
        os._exit(70)  # the parent is gone (as in pool_worker), or stopped it starting
    from tilesegment.infer.executors.pool_worker import worker_main

    worker_main(slot, generation, *pickle.loads(arguments), conn)
    # The parent waits for this process to end: skip the ~1 s of collections the interpreter
    # runs over torch's objects while it tears down (see tilesegment.cli.main).
    gc.freeze()
