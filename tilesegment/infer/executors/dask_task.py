"""The body of a dask task of a run (:func:`compute_unit`) and what it receives and returns.

Runs in a dask worker process: the checkpoint comes from the per-process predictor cache, the
slide reader, tissue map and store handles are opened once per run and process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilesegment.geometry import TileGrid
from tilesegment.infer.devices import cpu_seconds, peak_rss_mb
from tilesegment.infer.options import RunOptions
from tilesegment.infer.plan import Unit
from tilesegment.infer.source import open_source
from tilesegment.infer.stream import ListSource, stream_units
from tilesegment.model.checkpoint import ModelSpec
from tilesegment.store.layout import ChunkKey

#: The prefix of the dask keys of a run's unit tasks.
UNIT_KEY_PREFIX = "tilesegment-unit-"


@dataclass(frozen=True, slots=True)
class PackedMask:
    """A boolean tissue mask, 8 pixels a byte (a 2048² thumbnail mask is 512 kB)."""

    bits: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        return cls(np.packbits(mask.astype(bool), axis=None), (mask.shape[0], mask.shape[1]))

    def unpack(self) -> np.ndarray:
        h, w = self.shape
        return np.unpackbits(self.bits, count=h * w).reshape(h, w).astype(bool)


@dataclass(frozen=True, slots=True)
class UnitJob:
    """What every unit task of one run needs besides its unit. Small and picklable.

    Paths are absolute, so workers with another working directory find the same files.
    """

    token: str
    """Unique per run: names the run's tasks and keys the per-process tissue-map cache."""
    slide: str
    model: str
    output: str
    options: RunOptions
    """The run's options with ``level`` and ``mpp`` resolved (every worker reads the same
    pixels)."""
    grid: TileGrid
    device: str
    """Torch device of every worker."""
    precision: str
    """Resolved by the driver (not ``auto``), so that every worker computes alike."""
    torch_threads: int | None
    """torch threads per worker process; None: the dask worker's thread count."""
    tissue: PackedMask | None
    """The run's tissue mask (None: every tile is computed)."""
    image_shape: tuple[int, int]


@dataclass(frozen=True, slots=True)
class UnitResult:
    """What a task reports back: the chunks it wrote and how it went."""

    keys: tuple[ChunkKey, ...]
    """Chunk-grid keys of the chunks written (all of the unit's)."""
    worker: str
    """Name of the dask worker (``0``, ``1``... on a LocalCluster)."""
    host: str
    pid: int
    threads: int
    precision: str
    tiles: int
    core_px: int
    seconds: float
    peak_rss_mb: float
    decode_warnings: tuple[dict[str, Any], ...] = ()
    """Corrupt-but-decodable segments this worker's reader has found so far in the run."""
    forward_seconds: float = 0.0
    """Seconds of this task in the network's forward pass."""
    load_seconds: float = 0.0
    """Seconds this task spent loading the model (0 unless it was the process's first)."""
    first_batch_seconds: float = 0.0
    """The first forward pass of a task that loaded the model (with any compilation)."""
    process_cpu_seconds: float = 0.0
    """CPU seconds of the worker process (all its threads) from the start of its first task of
    the run to this task's end."""


class _JobResources:
    """What a worker process opens once per run (not once per task): the slide reader and its
    source, the tissue map, and one output-store handle per dask thread."""

    def __init__(self, job: UnitJob, spec: ModelSpec, cpu0: float) -> None:
        from tilesegment.io import open_slide

        self.token = job.token
        self.cpu0 = cpu0
        """The process's CPU seconds when its first task of the run began."""
        self.reader = open_slide(job.slide)
        try:
            self.source = open_source(self.reader, spec, job.options)
        except BaseException:
            self.reader.close()
            raise
        self.tissue = None
        if job.tissue is not None:
            from tilesegment.tissue import TissueMap

            self.tissue = TissueMap(job.tissue.unpack(), job.image_shape)
        self._stores: dict[int, Any] = {}

    def store(self, output: str):
        """This thread's handle on the output store."""
        from tilesegment.store import OutputStore

        key = threading.get_ident()
        if key not in self._stores:
            self._stores[key] = OutputStore.open(output, mode="r+")
        return self._stores[key]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.reader.close()


_RESOURCES: dict[str, _JobResources] = {}


_RESOURCES_LOCK = threading.Lock()


def _job_resources(job: UnitJob, spec: ModelSpec, cpu0: float) -> _JobResources:
    """The run's resources in this process, opened by its first task (which began at ``cpu0``
    CPU seconds). One run at a time per worker is the rule: a new run's first task closes the
    previous run's (memory stays flat)."""
    with _RESOURCES_LOCK:
        res = _RESOURCES.get(job.token)
        if res is None:
            for old in _RESOURCES.values():
                old.close()
            _RESOURCES.clear()
            res = _JobResources(job, spec, cpu0)
            _RESOURCES[job.token] = res
        return res


def _worker_identity() -> tuple[str, int | None]:
    """(name, thread count) of the dask worker running this task, or this process's pid."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return str(os.getpid()), None
    return str(worker.name), worker.state.nthreads


def compute_unit(job: UnitJob, unit: Unit) -> UnitResult:
    """Compute and write every chunk of ``unit``; the body of a dask task.

    Runs in a worker process: reads the unit's pixels from the slide, predicts with the
    process's cached predictor and writes whole chunks (probabilities, mask, tissue) into the
    output. Errors propagate to the driver.
    """
    import torch

    from tilesegment.infer.executors.cache import cached_predictor, loads

    cpu0 = cpu_seconds()
    name, worker_threads = _worker_identity()
    threads = job.torch_threads or worker_threads or torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    t_load, loads_before = time.perf_counter(), loads()
    predictor = cached_predictor(
        job.model,
        job.device,
        job.precision,
        compile=job.options.compile,
        tta=job.options.tta,
    )
    loaded = loads() > loads_before
    load_seconds = time.perf_counter() - t_load if loaded else 0.0
    spec = predictor.spec
    res = _job_resources(job, spec, cpu0)
    keys: list[ChunkKey] = []
    t0 = time.perf_counter()
    stats = stream_units(
        ListSource([unit]),
        reader=res.source.reader,
        level=res.source.level,
        grid=job.grid,
        predictor=predictor,
        classes=spec.unet.classes,
        channels=spec.unet.in_channels,
        store=res.store(job.output),
        tissue=res.tissue,
        batch_size=job.options.batch_size,
        read_threads=1,  # one unit: its block is read with one read_region
        on_chunk=lambda task: keys.append(task.key),
    )
    return UnitResult(
        keys=tuple(keys),
        worker=name,
        host=socket.gethostname(),
        pid=os.getpid(),
        threads=threads,
        precision=job.precision,
        tiles=stats.tiles,
        core_px=stats.core_px,
        seconds=time.perf_counter() - t0,
        peak_rss_mb=peak_rss_mb(),
        decode_warnings=tuple(w.as_dict() for w in res.reader.decode_warnings()),
        forward_seconds=stats.forward_seconds,
        load_seconds=load_seconds,
        first_batch_seconds=stats.first_batch_seconds if loaded else 0.0,
        process_cpu_seconds=cpu_seconds() - res.cpu0,
    )


def same(job: UnitJob) -> UnitJob:
    """Identity: lets the job live in the cluster as a recomputable task result."""
    return job
