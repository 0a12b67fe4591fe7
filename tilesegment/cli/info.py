"""``tilesegment info SLIDE``: levels, resolution and format of a slide, without its pixels."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tilesegment.cli.exits import Command
from tilesegment.cli.options import json_option


@click.command(cls=Command)
@click.argument("slide", type=click.Path(path_type=Path))
@json_option()
def info(slide: Path, as_json: bool) -> None:
    """Show levels, resolution and format of SLIDE without reading its pixels."""
    from tilesegment.io import open_slide

    with open_slide(slide) as reader:
        i = reader.info
    doc = {
        "path": str(i.path),
        "backend": i.backend,
        "vendor": i.vendor,
        "channels": i.channels,
        "mpp": list(i.mpp) if i.mpp else None,
        "levels": [
            {"level": k, "height": s[0], "width": s[1], "downsample": d}
            for k, (s, d) in enumerate(zip(i.level_shapes, i.level_downsamples, strict=True))
        ],
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    mpp = f"{i.mpp[0]:.4g} x {i.mpp[1]:.4g} um/px (y, x)" if i.mpp else "unknown"
    click.echo(f"{i.path}\n  format   {i.vendor} (via {i.backend})")
    click.echo(f"  channels {i.channels}\n  mpp      {mpp}\n  levels")
    for lv in doc["levels"]:
        click.echo(
            f"    {lv['level']}: {lv['height']} x {lv['width']} (h x w), "
            f"downsample {lv['downsample']:.4g}"
        )
