"""What every executor shares: the :class:`Executor` protocol, the context it runs in, what it
reports back (:class:`ExecutorStats`), and the retry policy.

An executor computes the units of a :class:`~tilesegment.infer.plan.WorkPlan`, writes their
chunks into the output (itself or in its workers) and hands each written chunk to the run's
:class:`~tilesegment.infer.record.Recorder`. It never touches the run's report: the run reads
:meth:`Executor.stats` when the executor returns or raises.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tilesegment.errors import InputError, WorkerError
from tilesegment.infer.options import RunOptions
from tilesegment.infer.plan import ChunkTask, WorkPlan
from tilesegment.infer.record import Recorder
from tilesegment.model.checkpoint import ModelSpec
from tilesegment.store.destinations import NO_SPACE
from tilesegment.store.resume import remove_partial_files

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunContext:
    """What every executor needs besides the plan; picklable (paths, options, small arrays)."""

    slide: Path
    model: Path
    output: Path
    options: RunOptions
    """With ``level``, ``mpp`` and ``compile`` resolved, so every worker computes alike."""
    spec: ModelSpec
    tissue: Any
    """The run's :class:`~tilesegment.tissue.TissueMap` or None."""


@dataclass(slots=True)
class ExecutorStats:
    """What an executor did, for the run report (filled in as it goes, read at the end)."""

    seconds: float = 0.0
    devices: list[dict[str, Any]] = field(default_factory=list)
    """One entry per worker (see :func:`device_entry`)."""
    worker_peak_rss_mb: float = 0.0
    errors: list[str] = field(default_factory=list)
    failed_tiles: list[tuple[int, int]] = field(default_factory=list)
    decode_warnings: list[dict[str, Any]] = field(default_factory=list)
    """Corrupt-but-decodable segments the workers' readers found (``DecodeWarning.as_dict``)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of the executor's own overheads, for the report's ``seconds`` (the pool's
    ``workers_ready``: from its start until every worker could compute; ``workers_stop``:
    from the last chunk until every worker had exited)."""


class Executor(Protocol):
    """Computes every unit of a plan; raises what stopped it.

    Raises an :class:`~tilesegment.errors.InputError` at once (retrying cannot help),
    :class:`~tilesegment.errors.WorkerError` for tiles that still failed after
    ``max_retries`` retries (see :func:`failed_tiles_error`), KeyboardInterrupt after the
    chunks finished so far are recorded.
    """

    def run(self, plan: WorkPlan, recorder: Recorder) -> None: ...

    def stats(self) -> ExecutorStats: ...


def retryable(exc: BaseException) -> bool:
    """Whether computing a unit again may succeed after ``exc``: not for bad input, nor on a
    full or read-only filesystem, where every worker would fail the same way (the run stops
    at once with the error itself, which the command line turns into one line)."""
    if isinstance(exc, InputError):
        return False
    return not (isinstance(exc, OSError) and exc.errno in NO_SPACE | {errno.EROFS})


class Attempts:
    """Failed attempts per unit against ``max_retries`` retries."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self._failures: Counter[int] = Counter()

    def __getitem__(self, uid: int) -> int:
        return self._failures[uid]

    def failed(self, uid: int) -> bool:
        """Count a failure of unit ``uid``; True when it has no retry left."""
        self._failures[uid] += 1
        return self._failures[uid] > self.max_retries


def failed_tiles_error(
    stats: ExecutorStats,
    tasks: Iterable[ChunkTask],
    max_retries: int,
    last_error: str,
    where: str = "",
    *,
    why: str | None = None,
) -> WorkerError:
    """Note the tiles of ``tasks`` as failed in ``stats``; the WorkerError that names them
    and why they failed (default: after ``max_retries`` retries)."""
    stats.failed_tiles = sorted(ij for task in tasks for ij in task.tiles)
    shown = ", ".join(f"({i}, {j})" for i, j in stats.failed_tiles[:8])
    more = f" and {len(stats.failed_tiles) - 8} more" if len(stats.failed_tiles) > 8 else ""
    if why is None:
        attempts = "1 attempt" if max_retries == 0 else f"{max_retries + 1} attempts"
        why = f"after {attempts}{where}"
    return WorkerError(
        f"{len(stats.failed_tiles)} tiles failed {why} (tiles {shown}{more}); "
        f"last error: {last_error}"
    )


def device_entry(
    worker: str | int,
    device: str,
    threads: int,
    precision: str,
    *,
    tiles: int,
    core_px: int,
    busy_seconds: float,
    restarts: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """One worker's line of the report: what it computed, how fast, how often it restarted."""
    mpx = core_px / 1e6
    return {
        "worker": worker,
        "device": device,
        "threads": threads,
        "precision": precision,
        "tiles": tiles,
        "megapixels": mpx,
        "busy_seconds": round(busy_seconds, 3),
        "mpx_per_s": round(mpx / busy_seconds, 4) if busy_seconds > 0 else None,
        "restarts": restarts,
        **extra,
    }


def remove_worker_leftovers(output: Path) -> None:
    """Delete the temporary files of workers killed mid-write (their chunks were written again
    since, by the retry)."""
    removed = remove_partial_files(output)
    if removed:
        log.info("removed %d temporary files left by workers that died", removed)
