"""``tilesegment evaluate``: score a model on images and labels (a table per image and the mean)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tilesegment.cli.exits import Command
from tilesegment.cli.options import (
    EXISTING,
    EXISTING_FILE,
    LABEL_KINDS,
    device_option,
    json_option,
    model_option,
    precision_option,
    set_threads,
    single_device,
    threads_option,
)


@click.command(cls=Command)
@model_option()
@click.option("--images", type=EXISTING, required=True, help="Image stack (TIFF) or folder.")
@click.option("--labels", type=EXISTING, required=True, help="Label stack or folder.")
@click.option("--label-kind", type=LABEL_KINDS, help="Default: as trained, else detected.")
@click.option("--list", "name_list", type=EXISTING_FILE, help="Only the names in this file.")
@click.option(
    "--min-object-size", type=click.IntRange(0), help="Instances: drop smaller objects (px)."
)
@device_option(several=False)
@precision_option(auto=True, default="fp32")
@threads_option()
@json_option()
def evaluate(
    model_path: Path,
    images: Path,
    labels: Path,
    label_kind: str | None,
    name_list: Path | None,
    min_object_size: int | None,
    device: str,
    precision: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Score a model on IMAGES/LABELS: whole-image predictions, a table per image and mean."""
    from tilesegment.infer.devices import resolve_precision
    from tilesegment.train.data import read_name_list
    from tilesegment.train.evaluate import evaluate_model

    set_threads(threads)
    device = single_device(device)
    precision = resolve_precision(precision, device)
    names = read_name_list(name_list) if name_list else None
    report, spec = evaluate_model(
        model_path,
        images,
        labels,
        label_kind=label_kind,  # type: ignore[arg-type]
        names=names,
        device=device,
        precision=precision,
        min_object_size=min_object_size,
    )
    if as_json:
        doc = {"model": str(model_path), "name": spec.name, **report.to_json()}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"model {spec.name} ({model_path}), {report.kind} labels, {len(report.per_image)}"
               " image(s)")  # fmt: skip
    click.echo(report.table())
