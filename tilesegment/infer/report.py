"""The run report: what a run did, kept in one :class:`RunRecord` as it goes and written as
JSON beside the output at the end of every run (complete, interrupted or failed).

The report's path comes from :mod:`tilesegment.store.layout` (``OUT.report.json``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tilesegment import __version__
from tilesegment.geometry import TileGrid
from tilesegment.infer.capacity import WorkersChoice
from tilesegment.infer.devices import peak_rss_mb
from tilesegment.infer.executors.base import ExecutorStats
from tilesegment.infer.options import RunOptions
from tilesegment.infer.plan import WorkPlan
from tilesegment.infer.record import Recorder
from tilesegment.infer.source import Source
from tilesegment.store.layout import report_path
from tilesegment.store.resume import now_iso, write_durably


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a finished run did."""

    output: Path
    tiles: int
    image_shape: tuple[int, int]
    tile_size: tuple[int, int]
    seconds: float
    megapixels: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mpx_per_s(self) -> float | None:
        """Computed (processed) Mpx per streaming second; None when no tile was computed.

        Not image Mpx: tiles skipped for lack of tissue or done before a resume cost nothing.
        """
        return self.extra.get("processed_mpx_per_s")


@dataclass
class RunRecord:
    """Everything the report of one run says, filled in as the run goes. Not thread-safe: the
    coordinating thread owns it (workers report to the :class:`Recorder`)."""

    started: str
    """ISO 8601 local time the run started."""
    t0: float
    """``time.perf_counter()`` at the start."""
    resumed: bool = False
    compiled: bool = False
    tta: str = "none"
    """Test-time augmentation of the run (``--tta``)."""
    tiles_processed: int = 0
    core_px: int = 0
    chunks_written: int = 0
    stream_seconds: float = 0.0
    devices: list[dict[str, Any]] = field(default_factory=list)
    failed_tiles: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    worker_peak_rss_mb: float = 0.0
    tissue: dict[str, Any] = field(default_factory=dict)
    """How the tissue map was made (mode, how, fraction, found)."""
    reader: Any = None
    """The run's own reader (thumbnail, in-process tiles): its decode warnings go in the report."""
    decode_warnings: dict[tuple[int, int, int], dict[str, Any]] = field(default_factory=dict)
    """Corrupt-but-decodable segments reported by worker readers, by (level, row, column)."""
    workers: WorkersChoice | None = None
    """How many CPU processes computed and why (None for GPU and dask runs)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of the steps around the stream: ``setup`` (model, slide, tissue, output, plan:
    from the start to the first unit), ``finalize`` (pyramids, metadata), ``preview``."""

    @classmethod
    def start(cls) -> RunRecord:
        return cls(started=now_iso(), t0=time.perf_counter())

    def absorb(self, stats: ExecutorStats, recorder: Recorder) -> None:
        """Take what the executor and the recorder counted."""
        self.stream_seconds = stats.seconds
        self.devices = stats.devices
        self.worker_peak_rss_mb = stats.worker_peak_rss_mb
        self.errors.extend(stats.errors)
        self.add_decode_warnings(stats.decode_warnings)
        self.phases.update(stats.phases)
        self.failed_tiles = list(stats.failed_tiles)
        self.tiles_processed = recorder.tiles
        self.core_px = recorder.core_px
        self.chunks_written = recorder.chunks

    def add_decode_warnings(self, warnings: Iterable[Mapping[str, Any]]) -> None:
        """Merge :meth:`DecodeWarning.as_dict` records (each segment once)."""
        for w in warnings:
            self.decode_warnings.setdefault((w["level"], w["row"], w["column"]), dict(w))

    def decode_warnings_doc(self) -> dict[str, Any]:
        """The report's ``decode_warnings``: tiles/strips of the slide that decoded with errors."""
        if self.reader is not None:
            self.add_decode_warnings(w.as_dict() for w in self.reader.decode_warnings())
        tiles = [self.decode_warnings[k] for k in sorted(self.decode_warnings)]
        return {"count": len(tiles), "tiles": tiles}

    def processed_rate(self) -> float | None:
        """Computed Mpx per streaming second, None when no tile was computed (a rate over no
        pixels, or over a stream that did not run, means nothing)."""
        if self.core_px == 0 or self.stream_seconds <= 0:
            return None
        return self.core_px / 1e6 / self.stream_seconds

    def phase(self, name: str, since: float) -> None:
        """Record ``name`` as having taken from ``since`` (``time.perf_counter()``) to now."""
        self.phases[name] = time.perf_counter() - since

    def peak_rss(self) -> dict[str, float]:
        return {"main": round(peak_rss_mb(), 1), "workers": round(self.worker_peak_rss_mb, 1)}

    def report(
        self,
        output: Path,
        opts: RunOptions,
        params: dict[str, Any],
        plan: WorkPlan,
        status: str,
    ) -> dict[str, Any]:
        """The JSON document of the report, with the history of earlier attempts."""
        to_do = plan.tiles_total - plan.tiles_no_tissue - plan.tiles_done_before
        h, w = params["image_shape"]
        doc: dict[str, Any] = {
            "status": status,
            "output": str(output),
            "started": self.started,
            "finished": now_iso(),
            "host": platform.node(),
            "pid": os.getpid(),
            "command": list(opts.command or sys.argv),
            "resumed": self.resumed,
            "params": params,
            "options": {k: v for k, v in asdict(opts).items() if k != "command"},
            "compiled": self.compiled,
            "tta": self.tta,
            "tiles": {
                "total": plan.tiles_total,
                "processed": self.tiles_processed,
                "skipped_no_tissue": plan.tiles_no_tissue,
                "done_before": plan.tiles_done_before,
                "failed": len(self.failed_tiles),
                "not_done": max(0, to_do - self.tiles_processed),
                "failed_tiles": [list(t) for t in self.failed_tiles],
            },
            "chunks": {"written": self.chunks_written, "done_before": plan.chunks_done_before},
            "megapixels": {"image": h * w / 1e6, "processed": self.core_px / 1e6},
            "seconds": {
                "total": round(time.perf_counter() - self.t0, 3),
                "stream": round(self.stream_seconds, 3),
                **{k: round(v, 3) for k, v in self.phases.items()},
            },
            "mpx_per_s": None if (rate := self.processed_rate()) is None else round(rate, 4),
            "tissue": self.tissue,
            "workers": None if self.workers is None else self.workers.to_json(),
            "devices": self.devices,
            "peak_rss_mb": self.peak_rss(),
            "versions": versions(),
            "errors": self.errors,
            "decode_warnings": self.decode_warnings_doc(),
        }
        # Earlier attempts on this output (interrupted or failed runs), oldest first.
        doc["history"] = []
        previous = read_report(output)
        if previous is not None:
            keep = ("status", "started", "finished", "command", "tiles", "seconds")
            doc["history"] = [*previous.get("history", []), {k: previous.get(k) for k in keep}]
        return doc

    def summary(
        self,
        output: Path,
        grid: TileGrid,
        source: Source,
        tissue: Any,
        preview: Path | None,
        *,
        plan: WorkPlan | None = None,
    ) -> RunSummary:
        """The :class:`RunSummary` the run returns."""
        h, w = source.image_shape
        return RunSummary(
            output=output,
            tiles=len(grid),
            image_shape=source.image_shape,
            tile_size=grid.input_shape,
            seconds=self.stream_seconds,
            megapixels=h * w / 1e6,
            extra={
                "tiles_processed": self.tiles_processed,
                "tiles_skipped": 0 if plan is None else plan.tiles_no_tissue,
                "tiles_resumed": 0 if plan is None else plan.tiles_done_before,
                "tissue_fraction": None if tissue is None else tissue.fraction,
                "tissue_found": None if tissue is None else tissue.found,
                "mpp": None if source.mpp is None else source.mpp[0],
                "level": source.source_level,
                "preview": None if preview is None else str(preview),
                "devices": self.devices,
                "workers": None if self.workers is None else self.workers.describe(),
                "resumed": self.resumed,
                "compiled": self.compiled,
                "tta": self.tta,
                "processed_megapixels": self.core_px / 1e6,
                "processed_mpx_per_s": self.processed_rate(),
                "peak_rss_mb": self.peak_rss(),
            },
        )


def versions() -> dict[str, str]:
    """Versions of tilesegment, Python and the libraries that decide the output's bytes."""
    import numpy
    import torch
    import zarr

    return {
        "tilesegment": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "platform": platform.platform(),
    }


def read_report(output: Path) -> dict[str, Any] | None:
    """The report of the last run on ``output``, None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(report_path(output).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_report(output: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` durably beside ``output``; its path."""
    path = report_path(output)
    write_durably(path, json.dumps(report, indent=2) + "\n")
    return path
