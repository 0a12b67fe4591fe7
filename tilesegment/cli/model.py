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
            {"name": m.name, "path": str(m.path), "mpp": m.mpp, "classes": list(m.classes)}
            for m in found
        ]
        click.echo(json.dumps(doc, indent=2))
        return
    if not found:
        click.echo("no models are shipped with this installation")
    for m in found:
        mark = " (default)" if m.name == DEFAULT_MODEL else ""
        mpp = f"{m.mpp:g} um/px" if m.mpp else "any um/px"
        click.echo(f"{m.name}{mark}: {', '.join(m.classes)}; {mpp}. {m.summary}")
