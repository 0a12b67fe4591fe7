"""How many CPU worker processes a run takes: the cap on ``--workers N`` and the rule of
``--workers auto`` (the default on a CPU), from the usable cores and available memory that
:mod:`tilesegment.machine` reads. Standard library only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tilesegment.machine import available_memory_mb, usable_cores

log = logging.getLogger(__name__)


#: Peak RSS of one CPU worker process with the default model and tile, in MB: 598-617 MB
#: compiled (bf16) in a 20000² default run of the shipped 3-class nuclei-he on 828 px tiles
#: (524-547 on 572 px tiles; 457 eager), plus ~40 MB for fp32 activations on CPUs without
#: bf16 (benchmarks/RESULTS.md). Caps ``--workers`` by free memory and is the per-worker cost
#: of ``--workers auto``.
WORKER_RSS_MB = 660


def cap_cpu_workers(workers: int, option: str = "--workers") -> int:
    """``workers``, capped by the usable CPU cores and by the memory available for workers.

    More workers than cores only add copies of the model and the torch runtime (each worker
    gets at least one thread); more than memory allows ends in the OOM killer. A capped value
    is logged as a warning naming ``option`` and both limits. Never less than one.
    """
    cores = usable_cores()
    memory_mb = available_memory_mb()
    by_memory = None if memory_mb is None else max(1, int(memory_mb // WORKER_RSS_MB))
    cap = min(cores, by_memory) if by_memory is not None else cores
    if workers <= cap:
        return workers
    memory = "unknown" if memory_mb is None else f"{memory_mb / 1024:.1f} GB"
    log.warning(
        "%s %d capped to %d: %d usable CPU cores (affinity and cgroup quota), %s of "
        "memory available at ~%d MB per worker",
        option,
        workers,
        cap,
        cores,
        memory,
        WORKER_RSS_MB,
    )
    return cap


#: Tissue megapixels per worker process from which ``--workers auto`` runs worker processes
#: instead of in-process: where the pool's speed repays its start-up (see :func:`auto_workers`
#: and docs/architecture.md, Measured choices).
AUTO_MIN_MPX_PER_WORKER = 25.0


@dataclass(frozen=True, slots=True)
class WorkersChoice:
    """How many CPU processes a run computes in, and why (recorded in the run report)."""

    processes: int
    """CPU worker processes; 0 computes in-process (the model in the run's own process)."""
    rule: str
    """``"auto"`` (:func:`auto_workers`) or what the user asked (``"--workers 3"``)."""
    reason: str
    """One line: the inputs the rule saw and the limit that decided."""

    def describe(self) -> str:
        """``workers auto: 2 worker processes (...)``: the decision in one line."""
        n = self.processes
        what = "in-process" if n == 0 else f"{n} worker process{'es' if n > 1 else ''}"
        return f"workers {self.rule.removeprefix('--workers ')}: {what} ({self.reason})"

    def to_json(self) -> dict[str, object]:
        return {"rule": self.rule, "processes": self.processes, "reason": self.reason}


def auto_workers(work_mpx: float, *, cores: int, memory_mb: float | None) -> WorkersChoice:
    """The rule of ``--workers auto`` on a CPU: one single-thread worker process per usable
    core when every worker gets at least :data:`AUTO_MIN_MPX_PER_WORKER` Mpx of tissue to
    compute and the memory holds every worker plus one more (~:data:`WORKER_RSS_MB` MB each);
    otherwise in-process.

    Parameters
    ----------
    work_mpx : float
        Output megapixels the run computes (the cores of the tiles with tissue).
    cores : int
        Usable CPU cores (:func:`tilesegment.machine.usable_cores`).
    memory_mb : float or None
        Available memory in MB (:func:`tilesegment.machine.available_memory_mb`); None when
        unknown, which does not limit the workers.

    Examples
    --------
    >>> auto_workers(4.0, cores=2, memory_mb=8000).describe()
    'workers auto: in-process (4.0 Mpx of tissue, under 25 Mpx per worker for 2 workers)'
    >>> auto_workers(400.0, cores=2, memory_mb=8000).processes
    2
    >>> auto_workers(400.0, cores=2, memory_mb=1900).processes  # 2 workers + 1 need 1980 MB
    0
    """
    workers = cores
    by_memory = None if memory_mb is None else int(memory_mb // WORKER_RSS_MB) - 1
    if by_memory is not None:
        workers = min(workers, by_memory)
    memory = "unknown memory" if memory_mb is None else f"{memory_mb / 1024:.1f} GB available"
    if cores < 2:
        return WorkersChoice(0, "auto", f"{cores} usable CPU core")
    if workers < 2:
        return WorkersChoice(
            0, "auto", f"{memory}, under 3 x ~{WORKER_RSS_MB} MB for 2 workers and a spare"
        )
    need = AUTO_MIN_MPX_PER_WORKER * workers
    if work_mpx < need:
        return WorkersChoice(
            0,
            "auto",
            f"{work_mpx:.1f} Mpx of tissue, under {AUTO_MIN_MPX_PER_WORKER:g} Mpx per worker "
            f"for {workers} workers",
        )
    return WorkersChoice(
        workers,
        "auto",
        f"{work_mpx:.1f} Mpx of tissue >= {AUTO_MIN_MPX_PER_WORKER:g} Mpx per worker; "
        f"{cores} usable cores, {memory} at ~{WORKER_RSS_MB} MB per worker",
    )
