"""The in-process executor (the default on a CPU): reader threads read and mirror-pad tiles, the
calling thread runs the model with all torch threads, a writer thread writes finished chunks."""

from __future__ import annotations

import time

from tilesegment.infer.devices import cpu_seconds, torch_threads_at_most
from tilesegment.infer.executors.base import ExecutorStats, RunContext, device_entry
from tilesegment.infer.plan import ChunkTask, WorkPlan
from tilesegment.infer.predict import make_predictor
from tilesegment.infer.record import Recorder
from tilesegment.infer.source import Source
from tilesegment.infer.stream import ListSource, StreamStats, stream_units
from tilesegment.machine import usable_cores
from tilesegment.model.unet import UNet
from tilesegment.store import OutputStore


class LocalExecutor:
    """Runs every unit in this process on one device. Lifecycle: construct, :meth:`run` once.
    Not thread-safe, not picklable (holds the open reader and the network)."""

    def __init__(
        self, ctx: RunContext, source: Source, net: UNet, device: str, precision: str
    ) -> None:
        self.ctx, self.source, self.net = ctx, source, net
        self.device, self.precision = device, precision
        self._stats = ExecutorStats()

    def stats(self) -> ExecutorStats:
        return self._stats

    def run(self, plan: WorkPlan, recorder: Recorder) -> None:
        import torch

        ctx, opts = self.ctx, self.ctx.options
        predictor = make_predictor(
            self.net,
            ctx.spec,
            self.device,
            self.precision,
            compile=bool(opts.compile),
            tta=opts.tta,
        )
        store = OutputStore.open(ctx.output, mode="r+")
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        tiles0, px0 = recorder.tiles, recorder.core_px
        threads = torch.get_num_threads()
        stats = StreamStats()
        try:
            with torch_threads_at_most(usable_cores()) as threads:
                stats = self._stream(plan, predictor, store, recorder)
        finally:
            seconds = time.perf_counter() - t0
            self._stats.seconds = seconds
            self._stats.devices = [
                device_entry(
                    "in-process",
                    self.device,
                    threads,
                    self.precision,
                    tiles=recorder.tiles - tiles0,
                    core_px=recorder.core_px - px0,
                    busy_seconds=seconds,
                    forward_seconds=round(stats.forward_seconds, 3),
                    first_batch_seconds=round(stats.first_batch_seconds, 3),
                    cpu_seconds=round(cpu_seconds() - cpu0, 3),
                )
            ]

    def _stream(
        self, plan: WorkPlan, predictor, store: OutputStore, recorder: Recorder
    ) -> StreamStats:
        ctx, opts = self.ctx, self.ctx.options

        def on_chunk(task: ChunkTask) -> None:
            recorder.record(task, counted=True)

        return stream_units(
            ListSource(plan.units),
            reader=self.source.reader,
            level=self.source.level,
            grid=plan.grid,
            predictor=predictor,
            classes=ctx.spec.unet.classes,
            channels=ctx.spec.unet.in_channels,
            store=store,
            tissue=ctx.tissue,
            batch_size=opts.batch_size,
            read_threads=opts.read_threads,
            on_chunk=on_chunk,
            on_batch=recorder.progress,
        )
