"""Reader test cases: files written on the fly (tifffile, Pillow, zarr) and real shared slides.

Each factory takes a directory and returns a :class:`Case`: the opened reader plus what the test
knows for sure about it (expected pixels of each level, channels, levels, mpp). Expected pixels
are computed here independently of the reader code (Pillow, numpy, tifffile's own ``asarray``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image

from tests.conftest import data_path
from tilesegment.io import open_slide
from tilesegment.io.openslide import OpenSlideReader
from tilesegment.testing.readers import Case


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random uint8 pixels: any axis swap or offset error changes them."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth RGB pattern that survives JPEG with small error, not symmetric in y and x."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    channels = [
        127 + 100 * np.sin(yy / 17.0),
        127 + 100 * np.cos(xx / 23.0),
        127 + 60 * np.sin((yy + 2 * xx) / 31.0),
    ]
    return np.stack(channels[: shape[2]], axis=-1).round().astype(np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """Reference compositing of non-premultiplied RGBA (or LA) on white, in float."""
    alpha = rgba[..., -1:].astype(float) / 255
    out = rgba[..., :-1].astype(float) * alpha + 255 * (1 - alpha)
    return np.rint(out).astype(np.uint8)


def halve(image: np.ndarray) -> np.ndarray:
    """Next pyramid level by 2x2 striding (values need not be a faithful downsample)."""
    return np.ascontiguousarray(image[::2, ::2])


def channels_last(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else image[..., None]


# ---------------------------------------------------------------- TIFF files written by tifffile


def tiff_tiled(tmp: Path) -> Case:
    image = noise((300, 200, 3))
    path = tmp / "tiled.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="rgb")
    return Case(open_slide(path), "tiff", [image], 3)


def tiff_striped(tmp: Path) -> Case:
    image = noise((203, 157, 3), seed=1)
    path = tmp / "striped.tif"
    tifffile.imwrite(path, image, rowsperstrip=16, compression="lzw", photometric="rgb")
    return Case(open_slide(path), "tiff", [image], 3)


def tiff_pyramid(tmp: Path) -> Case:
    """SubIFD pyramid with odd sizes (non-integer downsamples) and a cm resolution of 0.25 µm."""
    level0 = noise((301, 203, 3), seed=2)
    levels = [level0, halve(level0), halve(halve(level0))]
    path = tmp / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (64, 64), "compression": "zlib", "photometric": "rgb"}
        tif.write(
            level0, subifds=2, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit=3, **options
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    return Case(open_slide(path), "tiff", levels, 3, mpp=(0.25, 0.25))


def tiff_jpeg(tmp: Path) -> Case:
    image = smooth((256, 192, 3))
    path = tmp / "jpeg.tif"
    options = {"compression": "jpeg", "compressionargs": {"level": 95}, "photometric": "rgb"}
    tifffile.imwrite(path, image, tile=(64, 64), **options)
    return Case(open_slide(path), "tiff", [image], 3, tolerance=2.0)


def tiff_gray(tmp: Path) -> Case:
    image = noise((250, 190), seed=3)
    path = tmp / "gray.tif"
    tifffile.imwrite(path, image, tile=(32, 32), compression="lzw", photometric="minisblack")
    return Case(open_slide(path), "tiff", [image[..., None]], 1)


def tiff_gray16(tmp: Path) -> Case:
    image = np.random.default_rng(4).integers(0, 65536, (90, 70), dtype=np.uint16)
    path = tmp / "gray16.tif"
    tifffile.imwrite(path, image, photometric="minisblack")
    expected = np.rint(image / 257.0).astype(np.uint8)[..., None]
    return Case(open_slide(path), "tiff", [expected], 1)


def tiff_rgba(tmp: Path) -> Case:
    image = noise((120, 90, 4), seed=5)
    image[:10, :, 3] = 0  # fully transparent band: glass, must come back white
    path = tmp / "rgba.tif"
    tifffile.imwrite(path, image, photometric="rgb", extrasamples=["unassalpha"], tile=(32, 32))
    return Case(open_slide(path), "tiff", [on_white(image)], 3)


def tiff_planar(tmp: Path) -> Case:
    image = noise((80, 110, 3), seed=6)
    path = tmp / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate")
    return Case(open_slide(path), "tiff", [image], 3)


def tiff_ome(tmp: Path) -> Case:
    """OME-TIFF pyramid (SubIFDs) with anisotropic PhysicalSizeY/X: checks the (y, x) order."""
    level0 = noise((256, 320, 3), seed=7)
    levels = [level0, halve(level0)]
    path = tmp / "image.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        metadata = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25}
        options = {"tile": (64, 64), "compression": "zlib", "photometric": "rgb"}
        tif.write(level0, subifds=1, metadata=metadata, **options)
        tif.write(levels[1], subfiletype=1, **options)
    return Case(open_slide(path), "tiff", levels, 3, mpp=(0.25, 0.5))


def real_boxes_tiff(tmp: Path) -> Case:
    """The shared generic pyramidal TIFF (4 levels, deflate); its 72 dpi tag is not an mpp."""
    path = data_path("slides", "boxes.tiff")
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    return Case(open_slide(path), "tiff", levels, 3, mpp=None)


# ---------------------------------------------------------------- OpenSlide (real slides)


def real_cmu_svs(tmp: Path) -> Case:
    path = data_path("slides", "CMU-1-Small-Region.svs")
    expected = tifffile.imread(path, series=0)  # same JPEG tiles decoded by imagecodecs
    return Case(open_slide(path), "openslide", [expected], 3, mpp=(0.499, 0.499), tolerance=1.0)


def real_small_svs(tmp: Path) -> Case:
    path = data_path("slides", "small.svs")
    expected = tifffile.imread(path, series=0)
    return Case(open_slide(path), "openslide", [expected], 3, mpp=(0.499, 0.499), tolerance=1.0)


def real_boxes_via_openslide(tmp: Path) -> Case:
    """OpenSlide on a 4-level pyramid whose levels 2 and 3 have non-integer downsamples."""
    path = data_path("slides", "boxes.tiff")
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    # OpenSlide places level pixels at location / downsample: at 4.016 and 8.086 a box that does
    # not start at 0 is resampled at a sub-pixel offset, so sub-boxes differ slightly.
    return Case(
        OpenSlideReader(path), "openslide", levels, 3, mpp=None, offset_tolerance={2: 8, 3: 12}
    )


# ---------------------------------------------------------------- flat images (Pillow)


def png_rgb(tmp: Path) -> Case:
    image = noise((70, 95, 3), seed=8)
    path = tmp / "rgb.png"
    Image.fromarray(image).save(path)
    return Case(open_slide(path), "image", [image], 3)


def png_gray(tmp: Path) -> Case:
    image = noise((64, 48), seed=9)
    path = tmp / "gray.png"
    Image.fromarray(image).save(path)
    return Case(open_slide(path), "image", [image[..., None]], 1)


def png_gray16(tmp: Path) -> Case:
    image = np.random.default_rng(10).integers(0, 65536, (40, 30), dtype=np.uint16)
    path = tmp / "gray16.png"
    Image.fromarray(image).save(path)
    expected = np.rint(image / 257.0).astype(np.uint8)[..., None]
    return Case(open_slide(path), "image", [expected], 1)


def png_rgba(tmp: Path) -> Case:
    image = noise((50, 60, 4), seed=11)
    image[:, :5, 3] = 0
    path = tmp / "rgba.png"
    Image.fromarray(image, mode="RGBA").save(path)
    return Case(open_slide(path), "image", [on_white(image)], 3)


def png_palette(tmp: Path) -> Case:
    rgb = Image.fromarray(smooth((40, 30, 3))).quantize(colors=16)
    path = tmp / "palette.png"
    rgb.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    return Case(open_slide(path), "image", [expected], 3)


def jpeg_rgb(tmp: Path) -> Case:
    image = smooth((120, 160, 3))
    path = tmp / "photo.jpg"
    Image.fromarray(image).save(path, quality=95)
    return Case(open_slide(path), "image", [image], 3, tolerance=2.0)


# ---------------------------------------------------------------- Zarr


def zarr_v2_rgb(tmp: Path) -> Case:
    image = noise((100, 70, 3), seed=12)
    path = tmp / "rgb_v2.zarr"
    array = zarr.create_array(
        store=str(path), shape=image.shape, chunks=(32, 32, 3), dtype="uint8", zarr_format=2
    )
    array[:] = image
    return Case(open_slide(path), "zarr", [image], 3)


def zarr_v3_gray(tmp: Path) -> Case:
    image = noise((90, 110), seed=13)
    path = tmp / "gray_v3.zarr"
    array = zarr.create_array(
        store=str(path), shape=image.shape, chunks=(32, 32), dtype="uint8", zarr_format=3
    )
    array[:] = image
    return Case(open_slide(path), "zarr", [image[..., None]], 1)


def _write_levels(group: zarr.Group, levels: list[np.ndarray], chunks: tuple[int, ...]) -> None:
    for index, data in enumerate(levels):
        array = group.create_array(str(index), shape=data.shape, chunks=chunks, dtype="uint8")
        array[:] = data


def ome_zarr_v04(tmp: Path) -> Case:
    """NGFF 0.4 (Zarr v2) multiscale image, axes (c, y, x), anisotropic micrometer scale."""
    level0 = noise((3, 128, 96), seed=14)
    stored = [level0, level0[:, ::2, ::2]]
    path = tmp / "image_v04.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    _write_levels(group, stored, (3, 32, 32))
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, s, 2 * s]}]}
        for i, s in enumerate((0.25, 0.5))
    ]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    expected = [np.ascontiguousarray(np.moveaxis(level, 0, -1)) for level in stored]
    return Case(open_slide(path), "zarr", expected, 3, mpp=(0.25, 0.5))


def ome_zarr_v05(tmp: Path) -> Case:
    """NGFF 0.5 (Zarr v3) multiscale image, axes (y, x, c), metadata under ``ome``."""
    level0 = noise((100, 140, 3), seed=15)
    stored = [level0, halve(level0), halve(halve(level0))]
    path = tmp / "image_v05.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    _write_levels(group, stored, (32, 32, 3))
    axes = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
        {"name": "c", "type": "channel"},
    ]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [s, s, 1]}]}
        for i, s in enumerate((0.5, 1.0, 2.0))
    ]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return Case(open_slide(path), "zarr", stored, 3, mpp=(0.5, 0.5))


CaseFactory = Callable[[Path], Case]

TIFF_CASES: list[CaseFactory] = [
    tiff_tiled,
    tiff_striped,
    tiff_pyramid,
    tiff_jpeg,
    tiff_gray,
    tiff_gray16,
    tiff_rgba,
    tiff_planar,
    tiff_ome,
    real_boxes_tiff,
]
OPENSLIDE_CASES: list[CaseFactory] = [real_cmu_svs, real_small_svs, real_boxes_via_openslide]
IMAGE_CASES: list[CaseFactory] = [png_rgb, png_gray, png_gray16, png_rgba, png_palette, jpeg_rgb]
ZARR_CASES: list[CaseFactory] = [zarr_v2_rgb, zarr_v3_gray, ome_zarr_v04, ome_zarr_v05]
