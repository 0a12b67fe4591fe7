"""The machine a run uses: devices and their precision, CPU cores, malloc tuning, peak RSS, and
the environment worker processes start with."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator

from tilesegment.errors import ConfigError
from tilesegment.infer.capacity import cap_cpu_workers

#: Environment every process that runs torch for tilesegment starts with (the CLI sets it for
#: itself; worker processes get it at spawn): OpenMP threads wait passively instead of spinning,
#: which keeps small convolutions fast on busy cores (docs/architecture.md, Measured choices).
#: It only takes effect before torch is first imported; an explicit value in the environment wins.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV` under what the environment already sets."""
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


@contextlib.contextmanager
def spawn_env() -> Iterator[None]:
    """Set :data:`WORKER_ENV` (where unset) while processes are started, then restore it, so
    that spawned workers import torch with it without changing the host's environment."""
    missing = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    os.environ.update(missing)
    try:
        yield
    finally:
        for k in missing:
            os.environ.pop(k, None)


@contextlib.contextmanager
def torch_threads_at_most(cores: int) -> Iterator[int]:
    """Run torch with at most ``cores`` threads inside the block (then as before); yields the
    count. torch starts one thread per core of the affinity mask and ignores a cgroup CPU
    quota: in a container allowed 2 CPUs of a 64-core host it would run 64 threads."""
    import torch

    before = torch.get_num_threads()
    threads = max(1, min(before, cores))
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if threads != before:
            torch.set_num_threads(before)


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


def cpu_seconds() -> float:
    """CPU seconds (user + system) this process and the children it waited for have used:
    every thread's, and the compiler's that ``torch.compile`` starts."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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

    * Cap the arenas (unless ``MALLOC_ARENA_MAX`` is set), so that the freed tile-sized buffers
      the reader, writer, Zarr and OpenMP threads keep in arenas of their own do not make peak
      RSS creep up with the number of tiles.
    * Undo a small ``MALLOC_TRIM_THRESHOLD_`` (dask's nanny sets 65536 in every worker it
      spawns), which turns off glibc's adaptive mmap threshold and makes every feature map a
      fresh ``mmap``; the thresholds go back to the values glibc's adaptation reaches on its own
      (32 MB mmap, 64 MB trim).

    The measurements behind both are in docs/architecture.md (Measured choices).

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
