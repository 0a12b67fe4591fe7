"""Fixtures for the training tests: one torch thread, tiny synthetic image/label folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def one_thread():
    """Training tests use one torch thread: faster on the shared 2-core machine, and the
    single-process reference of the DDP test then matches a torchrun rank's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_pair(seed: int, shape: tuple[int, int] = (64, 64), n: int = 6):
    """(image (H, W) uint8, instances (H, W) uint16): bright noisy disks on a dark background,
    some of them touching."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    instances = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        cy, cx = rng.integers(6, shape[0] - 6), rng.integers(6, shape[1] - 6)
        r = rng.integers(4, 9)
        instances[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    image = np.where(instances > 0, 190, 50) + rng.normal(0, 12, shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances


def write_folder(
    root: Path, count: int = 4, *, shape=(64, 64), rgb: bool = False, kind: str = "instances"
) -> tuple[Path, Path]:
    """images/*.png and labels/*.tif of ``count`` blob pairs; labels binary (0/255) or ids."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        image, inst = blob_pair(i, shape)
        if rgb:
            image = np.stack([image, image // 2 + 60, 255 - image // 2], axis=-1)
        Image.fromarray(image).save(images / f"img{i}.png")
        label = inst if kind == "instances" else (inst > 0).astype(np.uint8) * 255
        tifffile.imwrite(labels / f"img{i}.tif", label)
    return images, labels
