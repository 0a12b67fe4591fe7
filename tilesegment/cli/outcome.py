"""What ``tilesegment run`` prints and does once a slide is done (for one slide or a batch): the
summary lines, the instance export, and SIGTERM taken as an interrupt."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from tilesegment.infer.report import RunSummary


def echo_summary(summary: RunSummary) -> None:
    """What a finished run did, on stderr: totals, one line per worker, memory, files."""
    h, w = summary.image_shape
    x = summary.extra
    mpp = f"{x['mpp']:.4g} um/px" if x["mpp"] else "unknown um/px"
    tissue = "" if x["tissue_fraction"] is None else f", tissue {x['tissue_fraction']:.1%}"
    if x.get("tissue_found") is False:
        tissue += " (NO TISSUE FOUND)"
    resumed = f", {x['tiles_resumed']} done before" if x["tiles_resumed"] else ""
    tta = "" if x.get("tta", "none") == "none" else f", test-time augmentation {x['tta']}"
    if down := x.get("downsample"):  # segmented on the image shrunk by the model's factor
        tta += f", segmented at {' x '.join(map(str, down['network_grid']))} px (downsample "
        tta += f"{down['factor']:g})"
    # The rate is over the pixels computed, never the image's: skipped tiles cost nothing.
    rate = summary.mpx_per_s
    speed = "no tile computed" if rate is None else f"{rate:.2f} Mpx/s computed"
    click.echo(
        f"done: {summary.output} ({h} x {w} px at {mpp} from level {x['level']}; "
        f"{x['tiles_processed']} of {summary.tiles} tiles of {summary.tile_size[0]} px processed, "
        f"{x['tiles_skipped']} skipped{tissue}{resumed}{tta}; {summary.seconds:.1f} s, {speed})",
        err=True,
    )
    if x.get("workers"):
        click.echo(f"  {x['workers']}", err=True)
    for d in x["devices"]:
        rate = f"{d['mpx_per_s']:.2f} Mpx/s" if d["mpx_per_s"] else "idle"
        restarts = f", {d['restarts']} restarts" if d["restarts"] else ""
        click.echo(
            f"  worker {d['worker']}: {d['device']} {d['precision']} x{d['threads']} threads, "
            f"{d['tiles']} tiles, {rate}{restarts}",
            err=True,
        )
    rss = x["peak_rss_mb"]
    workers_rss = f", workers {rss['workers']:.0f} MB" if rss["workers"] else ""
    click.echo(f"  peak RSS: main {rss['main']:.0f} MB{workers_rss}", err=True)
    click.echo(f"report: {x['report_path']}", err=True)
    if x["preview"]:
        click.echo(f"preview: {x['preview']}", err=True)


def export_instances(output: Path, geojson: Path) -> None:
    """Label the instances of a finished ``output`` and write its table and ``geojson``."""
    from tilesegment.postprocess import postprocess_output

    result = postprocess_output(output, geojson=geojson)
    tables = ", ".join(str(t) for t in result.tables)
    click.echo(
        f"instances: {result.instances} in labels/nuclei; GeoJSON {result.geojson}; "
        f"table {tables or 'not written'}",
        err=True,
    )


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[list[int]]:
    """Turn SIGTERM into KeyboardInterrupt inside the block; yields the signals received."""
    import signal

    received: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
