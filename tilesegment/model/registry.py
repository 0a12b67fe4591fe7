"""Models shipped inside the package, found by name: ``--model nuclei-he`` or a path.

A shipped model is ``tilesegment/models/NAME.json`` + ``NAME.safetensors`` + ``NAME.md`` (its
model card). Nothing is downloaded: the weights are package data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tilesegment.errors import ModelError
from tilesegment.model.checkpoint import checkpoint_paths, not_a_checkpoint

#: Where shipped checkpoints live.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

#: The model ``tilesegment run`` uses when no ``--model`` is given.
DEFAULT_MODEL = "nuclei-he"


@dataclass(frozen=True, slots=True)
class ShippedModel:
    """A checkpoint that ships with the package."""

    name: str
    path: Path
    """Checkpoint path without suffix (``.json`` / ``.safetensors`` beside it)."""
    summary: str
    """One line from the config's training provenance."""
    mpp: float | None
    classes: tuple[str, ...]
    downsample: float | None = None
    """Image px per network px of a model without ``mpp`` (None: 1)."""


def shipped_models() -> list[ShippedModel]:
    """All shipped models, sorted by name."""
    out = []
    for config in sorted(MODELS_DIR.glob("*.json")):
        weights, _ = checkpoint_paths(config)
        if not weights.is_file():
            continue
        doc = json.loads(config.read_text())
        training = doc.get("training", {})
        out.append(
            ShippedModel(
                name=config.stem,
                path=config.with_suffix(""),
                summary=str(training.get("summary", "")),
                mpp=doc.get("mpp"),
                classes=tuple(doc["classes"]["names"]),
                downsample=doc.get("downsample"),
            )
        )
    return out


def resolve_model(name_or_path: str | Path) -> Path:
    """Checkpoint path for a shipped model name or a path (NAME, NAME.json, NAME.safetensors)."""
    value = str(name_or_path)
    foreign = not_a_checkpoint(value)
    if foreign is not None:
        raise foreign
    weights, config = checkpoint_paths(value)
    if config.is_file() or weights.is_file():
        return Path(value)
    for m in shipped_models():
        if m.name == value:
            return m.path
    names = ", ".join(m.name for m in shipped_models()) or "none shipped"
    raise ModelError(
        f"{value}: no such model checkpoint or shipped model (shipped: {names}); "
        "give NAME.json + NAME.safetensors or see `tilesegment models`"
    )
