"""``tilesegment export STORE``: instances, table and QuPath GeoJSON of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tilesegment.cli.exits import Command, writing


@click.command("export", cls=Command)
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--geojson",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the instances as a QuPath GeoJSON FeatureCollection (level-0 px) here.",
)
@click.option(
    "--table",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Per-instance CSV (default: beside STORE, OUT.zarr -> OUT.nuclei.csv).",
)
@click.option(
    "--instances/--no-instances",
    default=None,
    help="Recompute labels/nuclei / require the existing one (default: compute if missing).",
)
@click.option(
    "--min-area",
    "min_area_um2",
    type=click.FloatRange(0),
    help="Drop instances smaller than this, in µm² (px when the mpp is unknown). [default: 10]",
)
@click.option(
    "--class-id",
    type=click.IntRange(0, 255),
    default=1,
    show_default=True,
    help="Class whose pixels form the instances.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    help="Use probability >= THRESHOLD instead of the argmax mask.",
)
@click.option(
    "--connectivity",
    type=click.Choice(["4", "8"]),
    default="4",
    show_default=True,
    help="Pixel neighbourhood; 4 respects the model's 1 px separation borders.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "components", "seeded"]),
    default="auto",
    show_default=True,
    help="Instances as connected components of --class-id, or as interior seeds grown into the "
    "nucleus region (models that declare interior/boundary classes); auto: as the model says.",
)
@click.option(
    "--downsample",
    type=click.FloatRange(0, min_open=True),
    help="Level-0 px per stored px (default: the store's level0_per_px attribute, else 1).",
)
@click.option(
    "--classification",
    default="Nucleus",
    show_default=True,
    help="QuPath class name of the detections.",
)
def export(
    store: Path,
    geojson: Path | None,
    table: Path | None,
    instances: bool | None,
    min_area_um2: float | None,
    class_id: int,
    threshold: float | None,
    connectivity: str,
    method: str,
    downsample: float | None,
    classification: str,
) -> None:
    """Label nucleus instances of the finished output STORE and export a table and GeoJSON."""
    from tilesegment.postprocess import InstanceOptions, default_table_path, postprocess_output
    from tilesegment.store.destinations import prepare_destination

    options: dict[str, Any] = {}
    if min_area_um2 is not None:
        options["min_area_um2"] = min_area_um2
    # The destinations are checked (and their folders made) before the labelling.
    prepare_destination(table or default_table_path(store), option="--table")
    if geojson is not None:
        prepare_destination(geojson, option="--geojson")
    with writing(geojson or store, then="run the export again"):
        result = postprocess_output(
            store,
            InstanceOptions(
                class_id=class_id,
                threshold=threshold,
                connectivity=int(connectivity),
                method=method,
                **options,
            ),
            geojson=geojson,
            table=table,
            instances=instances,
            downsample=downsample,
            classification=classification,
        )
    how = "labelled" if result.computed is not None else "reused labels/nuclei with"
    outputs = [str(p) for p in result.tables]
    if result.geojson is not None:
        outputs.append(str(result.geojson))
    click.echo(f"{how} {result.instances} instances; wrote {', '.join(outputs)}", err=True)
