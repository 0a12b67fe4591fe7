"""Synthetic H&E-like pyramidal slides for tests and benchmarks, written tile by tile.

Pixels are a pure function of global level-0 coordinates (glass, a few tissue patches, dark
nucleus-like blobs on a jittered grid), so any size can be generated with bounded memory, and
every pyramid level is the same scene sampled at a coarser grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

GLASS = np.array([242, 240, 244], dtype=np.float32)
STROMA = np.array([226, 160, 196], dtype=np.float32)
NUCLEUS = np.array([92, 58, 140], dtype=np.float32)


def _patches(size: tuple[int, int], tissue_fraction: float, seed: int, n: int = 6) -> np.ndarray:
    """``n`` ellipses (cy, cx, ry, rx) of tissue covering about ``tissue_fraction`` of the slide."""
    rng = np.random.default_rng(seed)
    h, w = size
    # Area of n ellipses with radii r = a * min(h, w) / 2 is n * pi * r^2.
    r = np.sqrt(tissue_fraction * h * w / (n * np.pi))
    cy = rng.uniform(r, max(r + 1, h - r), n)
    cx = rng.uniform(r, max(r + 1, w - r), n)
    ry = r * rng.uniform(0.8, 1.2, n)
    rx = r * r / ry
    return np.stack([cy, cx, ry, rx], axis=1)


def render(
    y0: int,
    x0: int,
    h: int,
    w: int,
    *,
    size: tuple[int, int],
    downsample: float = 1.0,
    tissue_fraction: float = 0.3,
    seed: int = 0,
    patches: int = 6,
    nucleus_spacing: float = 24.0,
) -> np.ndarray:
    """Pixels (h, w, 3) uint8 of the box (y0, x0, h, w) of the level with ``downsample``."""
    ys = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * downsample
    xs = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * downsample
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    tissue = np.zeros((h, w), dtype=bool)
    for cy, cx, ry, rx in _patches(size, tissue_fraction, seed, patches):
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    out = np.broadcast_to(GLASS, (h, w, 3)).copy()
    if tissue.any():
        # Nuclei on a jittered grid; each grid cell's jitter comes from a hash of its index.
        s = nucleus_spacing
        gy, gx = np.floor(yy / s), np.floor(xx / s)
        hsh = (gy.astype(np.int64) * 73856093) ^ (gx.astype(np.int64) * 19349663) ^ seed
        jy = ((hsh % 1000) / 1000.0) * 0.5 + 0.25
        jx = (((hsh // 1000) % 1000) / 1000.0) * 0.5 + 0.25
        radius = 4.0 + 3.0 * (((hsh // 1000000) % 1000) / 1000.0)
        d2 = (yy - (gy + jy) * s) ** 2 + (xx - (gx + jx) * s) ** 2
        nucleus = (d2 <= radius**2) & tissue
        texture = 8.0 * np.sin(yy * 0.37) * np.cos(xx * 0.29)
        out[tissue] = STROMA + texture[tissue, None]
        out[nucleus] = NUCLEUS + texture[nucleus, None]
    return np.clip(out, 0, 255).astype(np.uint8)


def write_slide(
    path: str | Path,
    size: tuple[int, int],
    *,
    tile: int = 256,
    levels: int | None = None,
    compression: str | None = "jpeg",
    tissue_fraction: float = 0.3,
    seed: int = 0,
    patches: int = 6,
    mpp: float = 0.5,
) -> Path:
    """Write a tiled pyramidal TIFF (level 0 + SubIFDs downsampled by 2) of an H&E-like scene.

    Memory is one tile at a time. ``levels`` defaults to halving until the level fits 2048 px.
    The resolution tags record ``mpp`` (µm/px) in centimetre units.
    """
    import tifffile

    path = Path(path)
    h, w = size
    if levels is None:
        levels = 1
        while max(h, w) / 2 ** (levels - 1) > 2048:
            levels += 1
    kwargs = {"compression": compression}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    res = (1e4 / mpp, 1e4 / mpp)

    def tiles(level: int) -> Iterator[np.ndarray]:
        ds = 2**level
        lh, lw = -(-h // ds), -(-w // ds)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                block = render(
                    ty,
                    tx,
                    tile,
                    tile,
                    size=size,
                    downsample=ds,
                    tissue_fraction=tissue_fraction,
                    seed=seed,
                    patches=patches,
                )
                yield block

    with tifffile.TiffWriter(path, bigtiff=h * w * 3 > 2**31) as tif:
        for level in range(levels):
            ds = 2**level
            shape = (-(-h // ds), -(-w // ds), 3)
            tif.write(
                tiles(level),
                shape=shape,
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                subifds=levels - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                resolution=(res[0] / ds, res[1] / ds),
                resolutionunit="CENTIMETER",
                metadata=None,
                **kwargs,
            )
    return path


def jpeg_tile(pixels: np.ndarray) -> bytes:
    """``pixels`` (tile, tile, 3) as the JPEG segment tifffile writes for an RGB tile (YCbCr,
    2x2 subsampling, quality 90), so that it can be written pre-compressed."""
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        pixels,
        tile=pixels.shape[:2],
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        metadata=None,
    )
    buffer.seek(0)
    with tifffile.TiffFile(buffer) as tif:
        page = tif.pages.first
        fh = tif.filehandle
        fh.seek(page.dataoffsets[0])
        return fh.read(page.databytecounts[0])


def write_glass_slide(
    path: str | Path,
    size: tuple[int, int],
    *,
    tissue_box: tuple[int, int, int, int] | None = None,
    tile: int = 512,
    mpp: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write a *single-level* tiled JPEG TIFF of glass with one H&E-like patch of tissue.

    The tissue (an ellipse filling about half of ``tissue_box`` = (y, x, h, w), with
    nuclei, see :func:`render`) is rendered tile by tile; every glass tile is the same JPEG
    segment, compressed once and written again (tifffile writes an iterator of pre-compressed
    tile bytes as is). So memory is one tile, and a 60000² file (3.6 Gpx, 13924 tiles of
    512 px) takes about a second to write and ~70 MB on disk. No pyramid: the file is what a
    scanner or converter exporting only full resolution produces.
    """
    import tifffile

    path = Path(path)
    h, w = size
    glass = jpeg_tile(np.broadcast_to(GLASS.astype(np.uint8), (tile, tile, 3)).copy())

    def tiles() -> Iterator[bytes]:
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                if tissue_box is not None:
                    by, bx, bh, bw = tissue_box
                    if ty < by + bh and by < ty + tile and tx < bx + bw and bx < tx + tile:
                        local = (ty - by, tx - bx, tile, tile)
                        pixels = render(
                            *local, size=(bh, bw), tissue_fraction=0.5, seed=seed, patches=1
                        )
                        yield jpeg_tile(pixels)
                        continue
                yield glass

    res = 1e4 / mpp
    tifffile.imwrite(
        path,
        tiles(),
        shape=(h, w, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        bigtiff=h * w * 3 > 2**31,
        metadata=None,
    )
    return path
