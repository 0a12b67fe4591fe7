"""Quiet task failures in the workers of the LocalCluster a run starts (``--dask-workers``).

A dask worker logs every failed task with its traceback ("Compute Failed", distributed's
``distributed.worker`` logger), and every task cancelled at shutdown; the run's driver already
reports each failed unit in one line (and stops a run on bad input or a full disk with the
one-line error of the local paths), so on the run's own cluster these records only bury that
line under tracebacks. The filter drops them for the run's tasks only; with ``--log-level
debug`` it is not installed, and the driver logs each failed unit's traceback itself. A
cluster the user runs (``--scheduler``) keeps its logging.

Imported only where ``distributed`` is installed (by the workers, to unpickle the plugin).
"""

from __future__ import annotations

import logging

from distributed import WorkerPlugin

from tilesegment.infer.executors.dask_task import UNIT_KEY_PREFIX


class QuietUnitFailures(logging.Filter):
    """Drops a worker's records about the run's unit tasks failing or being cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Compute Failed") and record.args:
            return not str(record.args[0]).startswith(UNIT_KEY_PREFIX)
        if msg.startswith("Async instruction for") and "ended with CancelledError" in msg:
            return UNIT_KEY_PREFIX not in msg
        return True


class QuietUnitFailuresPlugin(WorkerPlugin):
    """Installs :class:`QuietUnitFailures` on a worker's loggers (and on every worker that
    joins the cluster later, a nanny's replacement among them)."""

    name = "tilesegment-quiet-unit-failures"

    def setup(self, worker) -> None:
        for name in ("distributed.worker", "distributed.worker.state_machine"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, QuietUnitFailures) for f in logger.filters):
                logger.addFilter(QuietUnitFailures())
