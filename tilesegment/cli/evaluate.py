"""``tilesegment evaluate``: score a model on images and labels (a table per image and the mean)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tilesegment.cli.exits import Command
from tilesegment.cli.options import (
    EXISTING_FILE,
    LABEL_KINDS,
    device_option,
    images_option,
    json_option,
    label_pattern_option,
    labels_option,
    model_option,
    precision_option,
    set_threads,
    single_device,
    threads_option,
)


@click.command(cls=Command)
@model_option()
@images_option()
@labels_option()
@label_pattern_option()
@click.option("--label-kind", type=LABEL_KINDS, help="Default: as trained, else detected.")
@click.option(
    "--list",
    "name_list",
    type=EXISTING_FILE,
    help="Only the names in this file (one a line), or the image<TAB>label pairs it lists.",
)
@click.option(
    "--min-object-size", type=click.IntRange(0), help="Instances: drop smaller objects (px)."
)
@device_option(several=False)
@precision_option(auto=True, default="fp32")
@threads_option()
@json_option()
def evaluate(
    model_path: Path,
    images: Path | None,
    labels: Path | None,
    label_pattern: str | None,
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
    from tilesegment.train.evaluate import evaluate_model

    set_threads(threads)
    device = single_device(device)
    precision = resolve_precision(precision, device)
    report, spec = evaluate_model(
        model_path,
        images,
        labels,
        label_pattern=label_pattern,
        name_list=name_list,
        label_kind=label_kind,  # type: ignore[arg-type]
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
