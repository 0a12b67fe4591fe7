"""The one place a finished chunk is recorded: the durable done log, the run's counters and the
progress bar.

Every executor hands each chunk it has written (its files are on disk) to
:meth:`Recorder.record`, from whichever thread learns of it; the done log makes the record
durable after the chunk's files (see :mod:`tilesegment.store.resume`).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from tilesegment.geometry import TileGrid
from tilesegment.infer.plan import ChunkTask, core_px
from tilesegment.store.layout import ChunkFiles
from tilesegment.store.resume import DoneLog


def progress_bar(total: int, enabled: bool, initial: int = 0, *, unit: str = "tile") -> Any:
    """A tqdm bar of tiles (or ``unit``) on stderr (a silent one when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )


class Recorder:
    """Records finished chunks of one run and counts what was computed.

    Lifecycle: construct, use as a context manager around the executor (it owns the progress
    bar), read :attr:`tiles`, :attr:`core_px` and :attr:`chunks` afterwards. Thread-safe.
    Not picklable: it lives in the coordinating process; workers report chunks to it.
    """

    def __init__(
        self,
        output: Path,
        grid: TileGrid,
        done_log: DoneLog,
        *,
        tissue: bool,
        total_tiles: int,
        progress: bool,
        files: ChunkFiles | None = None,
    ) -> None:
        self.output = output
        self.grid = grid
        self.done_log = done_log
        self.tissue = tissue
        self.files = files or ChunkFiles()
        """Which files hold a chunk (its shard's in NGFF 0.5): made durable before its record."""
        self.tiles = 0
        """Tiles computed by this run (not counting those done before a resume)."""
        self.core_px = 0
        """Output pixels of those tiles."""
        self.chunks = 0
        """Chunks written and recorded by this run."""
        self._total = total_tiles
        self._enabled = progress
        self._bar: Any = None
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()

    def __enter__(self) -> Recorder:
        self._bar = progress_bar(self._total, self._enabled)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def progress(self, tiles: int, px: int) -> None:
        """Count ``tiles`` computed tiles writing ``px`` output pixels (and show them)."""
        with self._lock:
            self.tiles += tiles
            self.core_px += px
            if self._bar is not None:
                self._bar.update(tiles)
                elapsed = time.perf_counter() - self.t0
                self._bar.set_postfix_str(f"{self.core_px / 1e6 / max(elapsed, 1e-9):.2f} Mpx/s")

    def record(self, task: ChunkTask, *, counted: bool = False) -> None:
        """Record the written chunk ``task`` in the done log and the counters.

        ``counted``: its tiles were already counted by :meth:`progress` (an executor that
        reports progress per batch); otherwise they are counted here.
        """
        if not counted:
            self.progress(len(task.tiles), core_px(self.grid, task))
        self.done_log.add(task.key, self.files.files(self.output, task.key, tissue=self.tissue))
        with self._lock:
            self.chunks += 1
