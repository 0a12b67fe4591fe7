"""The machine this process runs on: the CPU cores it may use and the memory still free for it.

Usable cores are the CPU affinity mask reduced by a cgroup CPU quota; available memory is
``MemAvailable`` reduced by a cgroup memory limit minus its usage (cgroup v2 and v1). Linux
only; elsewhere the CPU count and "unknown memory". Standard library only, so every stage
(readers, the store, post-processing, inference) sizes its thread pools from the same count
instead of ``os.cpu_count()``, which counts the host's cores, not this process's share.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, reduced by a cgroup CPU quota
    (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    for quota in _cgroup_values(("cpu.max", "cpu.cfs_quota_us")):
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cores_up_to(limit: int) -> int:
    """Threads for a pool that gains nothing beyond ``limit``: the usable cores, at most
    ``limit``, at least one.

    >>> 1 <= cores_up_to(4) <= 4
    True
    """
    return max(1, min(limit, usable_cores()))


def available_memory_mb() -> float | None:
    """Memory this process can still use in MB: ``MemAvailable``, reduced by a cgroup memory
    limit minus its usage where one is set; None if unknown (not Linux)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    for free in _cgroup_values(("memory.max", "memory.limit_in_bytes")):
        available = free if available is None else min(available, free)
    return available


def _cgroup_values(names: tuple[str, str]) -> list[float]:
    """The limits the cgroups of this process (and their ancestors) set through ``names``
    (the cgroup v2 file, then the v1 file): CPUs for CPU quotas, free MB for memory limits."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    values = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, name = "/sys/fs/cgroup", names[0]
        elif names[1].split(".")[0] in controllers.split(","):  # cgroup v1
            base, name = f"/sys/fs/cgroup/{controllers}", names[1]
        else:
            continue
        folder = Path(base + path)
        for d in [folder, *folder.parents]:
            if len(d.parts) < len(Path(base).parts):
                break
            value = cgroup_limit(d, name)
            if value is not None:
                values.append(value)
    return values


def cgroup_limit(folder: Path, name: str) -> float | None:
    """One cgroup's limit from ``folder/name``: CPUs for a CPU quota, free MB for memory."""
    try:
        text = (folder / name).read_text().split()
        if name == "cpu.max":  # "max 100000" or "QUOTA PERIOD"
            return None if text[0] == "max" else int(text[0]) / int(text[1])
        if name == "cpu.cfs_quota_us":
            quota = int(text[0])
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
        limit = None if text[0] == "max" else int(text[0])
        if limit is None or limit >= 2**62:  # v1 writes "no limit" as a huge number
            return None
        usage_file = "memory.current" if name == "memory.max" else "memory.usage_in_bytes"
        usage = int((folder / usage_file).read_text())
        return max(0, limit - usage) / 2**20
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None
