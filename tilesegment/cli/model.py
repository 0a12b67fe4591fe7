"""``tilesegment model init`` (a fresh checkpoint) and ``tilesegment models`` (the shipped ones)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from tilesegment.cli.exits import BadInput, Command, Group
from tilesegment.cli.options import json_option, overwrite_option


@click.group(cls=Group)
def model() -> None:
    """Create and inspect model checkpoints (NAME.safetensors + NAME.json)."""


@model.command("init")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--depth", type=click.IntRange(1, 7), default=4, show_default=True)
@click.option("--base-channels", type=click.IntRange(1), default=64, show_default=True)
@click.option("--in-channels", type=click.Choice(["1", "3"]), default="3", show_default=True)
@click.option("--classes", type=click.IntRange(2), default=2, show_default=True)
@click.option("--batch-norm/--no-batch-norm", default=False, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--upsampling", type=click.Choice(["transpose", "bilinear"]), default="transpose")
@click.option("--mpp", type=click.FloatRange(0, min_open=True), help="um/px the model expects.")
@click.option("--seed", type=int, default=0, show_default=True)
@overwrite_option("checkpoint")
def model_init(
    out: Path,
    depth: int,
    base_channels: int,
    in_channels: str,
    classes: int,
    batch_norm: bool,
    dropout: float,
    upsampling: str,
    mpp: float | None,
    seed: int,
    overwrite: bool,
) -> None:
    """Write a freshly initialised checkpoint OUT.safetensors + OUT.json."""
    from tilesegment.model import ModelSpec, UNetConfig, checkpoint_paths, new_model
    from tilesegment.model import save_checkpoint as save

    weights, config = checkpoint_paths(out)
    if not overwrite and (weights.exists() or config.exists()):
        raise BadInput(f"{config} already exists; pass --overwrite to replace it")
    cfg = UNetConfig(
        depth=depth,
        base_channels=base_channels,
        in_channels=int(in_channels),
        classes=classes,
        batch_norm=batch_norm,
        dropout=dropout,
        upsampling=upsampling,  # type: ignore[arg-type]
    )
    spec = ModelSpec.default(cfg, name=weights.stem, mpp=mpp)
    spec = dataclasses.replace(spec, training={"init": "random", "seed": seed})
    net = new_model(spec, seed=seed)
    w, c = save(net, spec, out)
    n_params = sum(p.numel() for p in net.parameters())
    click.echo(
        f"wrote {c} and {w.name}: depth {depth}, {base_channels} base channels, "
        f"{n_params / 1e6:.2f} M parameters, halo {net.halo} px, valid inputs "
        f"{net.valid_input_sizes(1)[0]} + {net.pooling}k"
    )


@click.command("models", cls=Command)
@json_option()
def models_cmd(as_json: bool) -> None:
    """List the models shipped with tilesegment (usable as `run --model NAME`)."""
    from tilesegment.model.registry import DEFAULT_MODEL, shipped_models

    found = shipped_models()
    if as_json:
        doc = [
            {
                "name": m.name,
                "path": str(m.path),
                "mpp": m.mpp,
                "downsample": m.downsample,
                "classes": list(m.classes),
            }
            for m in found
        ]
        click.echo(json.dumps(doc, indent=2))
        return
    if not found:
        click.echo("no models are shipped with this installation")
    for m in found:
        mark = " (default)" if m.name == DEFAULT_MODEL else ""
        click.echo(f"{m.name}{mark}: {', '.join(m.classes)}; {scale_text(m.mpp, m.downsample)}. "
                   f"{m.summary}")  # fmt: skip


def scale_text(mpp: float | None, downsample: float | None) -> str:
    """The scale a model declares, in words.

    >>> scale_text(0.25, None), scale_text(None, 3.0), scale_text(None, None)
    ('0.25 um/px', 'any um/px, images shrunk 3x', 'any um/px')
    """
    if mpp:
        return f"{mpp:g} um/px"
    return "any um/px" + (f", images shrunk {downsample:g}x" if downsample else "")


@model.command("info")
@click.argument("name_or_path", metavar="MODEL")
@json_option()
def model_info(name_or_path: str, as_json: bool) -> None:
    """Show what the checkpoint MODEL (a path or a shipped name) declares: classes, input,
    scale (um/px or downsample), geometry and training summary."""
    from tilesegment.model.checkpoint import load_spec
    from tilesegment.model.registry import resolve_model

    spec = load_spec(resolve_model(name_or_path))
    doc = spec.to_json()
    if as_json:
        doc.pop("training", None)
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(
        f"{spec.name}: {', '.join(spec.class_names)}; {scale_text(spec.mpp, spec.downsample)}\n"
        f"  input {spec.channel_order}, depth {spec.unet.depth}, {spec.unet.base_channels} base "
        f"channels, halo {doc['halo']} px, valid inputs {doc['valid_input_sizes']}\n"
        f"  {spec.training.get('summary') or 'no training summary'}"
    )
