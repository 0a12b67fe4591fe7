"""The valid-convolution U-Net and its checkpoints."""

from __future__ import annotations

from tilesegment.model.checkpoint import (
    InstanceSpec,
    ModelSpec,
    checkpoint_paths,
    load_checkpoint,
    load_spec,
    new_model,
    save_checkpoint,
)
from tilesegment.model.unet import UNet, UNetConfig

__all__ = [
    "InstanceSpec",
    "ModelSpec",
    "UNet",
    "UNetConfig",
    "checkpoint_paths",
    "load_checkpoint",
    "load_spec",
    "new_model",
    "save_checkpoint",
]
