"""``tilesegment evaluate``: score a model on images and labels (a table per image, the mean and
the pooled scores; ``--json`` for all numbers; ``--figure`` for a grid of the worst and best
images)."""

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
    mpp_option,
    precision_option,
    set_threads,
    single_device,
    threads_option,
    tta_option,
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
    "--min-object-size",
    type=click.IntRange(0),
    help="Instances: drop smaller objects (px at the model's µm/px).",
)
@click.option(
    "--instances",
    "instance_method",
    type=click.Choice(["model", "components"]),
    default="model",
    show_default=True,
    help="Instances: as the model declares (`run`'s: seeded interiors grown into the "
    "boundary class, or components) or, to compare, the 4-connected components of the "
    "nucleus class with boundary pixels given back to them.",
)
@mpp_option(
    "µm/px of the images. When it differs from the model's, each image is resampled to the "
    "model's µm/px as `run` does, predicted, and scored on its own grid. Default: the model's."
)
@click.option(
    "--figure",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG grid (image, ground truth, prediction, errors) of the worst and best "
    "images by the headline metric (AJI, Dice or mean Dice).",
)
@click.option(
    "--figure-n",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Rows of worst and of best images in --figure.",
)
@device_option(several=False)
@precision_option(auto=True, default="fp32")
@tta_option()
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
    instance_method: str,
    mpp: float | None,
    figure: Path | None,
    figure_n: int,
    device: str,
    precision: str,
    tta: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Score a model on IMAGES/LABELS: whole-image predictions, a table per image, the mean
    and the pooled scores (instances: AJI and AJI+, each also aggregated over the images,
    PQ/DQ/SQ, Dice, object F1 at IoU 0.5; masks: Dice and IoU per class)."""
    from tilesegment.infer.devices import resolve_precision
    from tilesegment.train.evaluate import evaluate_model

    if figure is not None:  # refused before any image is predicted
        from tilesegment.train.figure import check_figure_path

        check_figure_path(figure)
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
        tta=tta,
        min_object_size=min_object_size,
        image_mpp=mpp,
        keep_examples=figure is not None,
        seeded=instance_method == "model",
    )
    rows = None
    if figure is not None:
        from tilesegment.train.figure import write_figure

        rows = write_figure(report, figure, n=figure_n, colours=spec.class_colours)
    if as_json:
        doc = {"model": str(model_path), "name": spec.name, "tta": tta, **report.to_json()}
        if figure is not None:
            doc["figure"] = {"path": str(figure), "rows": rows}
        click.echo(json.dumps(doc, indent=2))
        return
    kind = f"{report.kind} labels{_instances_note(report.instance_method)}"
    notes = f"{_mpp_note(mpp, spec)}{_tta_note(tta)}"
    click.echo(f"model {spec.name} ({model_path}), {kind}, {len(report.per_image)} image(s){notes}")
    click.echo(report.table())
    if figure is not None:
        click.echo(
            f"figure: {figure} ({len(rows or [])} rows, worst and best by {report.headline})"
        )


def _instances_note(method: str | None) -> str:
    return "" if method is None else f" (instances: {method})"


def _tta_note(tta: str) -> str:
    return "" if tta == "none" else f", test-time augmentation {tta}"


def _mpp_note(image_mpp: float | None, spec) -> str:
    if spec.downsample is not None:
        return f", predicted on the images shrunk {spec.downsample:g}x, scored on their own grid"
    if image_mpp is None or spec.mpp is None:
        return ""
    return f", images at {image_mpp:g} µm/px, predicted at the model's {spec.mpp:g} µm/px"
