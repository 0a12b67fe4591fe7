"""The entry point of a pool worker process, importable without torch.

``multiprocessing``'s spawn start method pickles a process's target and arguments into a pipe,
and the parent's ``Process.start()`` returns only once the child has read them all. The child
unpickles as it reads, so a target in a module that imports torch (or arguments whose classes
do) made every child import torch before the parent could go on: ``start()`` took 3-4 s per
worker on a 2-core machine, the workers started one after the other, and a SIGTERM that arrived
meanwhile cut the payload short (the child then died with "pickle data was truncated").

Here the target is light and the arguments travel as one ``bytes`` object, read before anything
heavy is imported: ``start()`` returns as soon as the child's interpreter is up, and the workers
import torch in parallel. The parent blocks SIGINT and SIGTERM during ``start()`` (see
:meth:`tilesegment.infer.executors.pool.WorkerPool._spawn`), which the child inherits; it
unblocks them here, after ignoring them (the parent tells its workers when to stop).
"""

from __future__ import annotations

import gc
import pickle
import signal

#: The signals the parent holds back while it starts a worker.
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def run_worker(payload: bytes, conn) -> None:
    """Unpickle the worker's arguments and run
    :func:`tilesegment.infer.executors.pool_worker.worker_main` with them and ``conn``, its end
    of the pipe to the parent."""
    for signum in HELD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    from tilesegment.infer.executors.pool_worker import worker_main

    worker_main(*pickle.loads(payload), conn)
    # The parent waits for this process to end: skip the ~1 s of collections the interpreter
    # runs over torch's objects while it tears down (see tilesegment.cli.main).
    gc.freeze()
