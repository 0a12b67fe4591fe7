"""Conformance tests every slide reader passes, backend choice by content, and bad inputs."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from tests.conftest import data_path
from tests.io import cases
from tests.io.cases import CaseFactory
from tilesegment.errors import SlideReadError
from tilesegment.io import open_slide, sniff_format
from tilesegment.io.image import ImageReader, _as_samples
from tilesegment.io.openslide import OpenSlideReader
from tilesegment.io.tiff import TiffReader
from tilesegment.io.zarr import ZarrReader
from tilesegment.testing.readers import Case, ReaderTests


def _open_case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    factory: CaseFactory = request.param
    made = factory(tmp_path)
    request.addfinalizer(made.reader.close)
    return made


def _ids(factories: list[CaseFactory]) -> list[str]:
    return [factory.__name__ for factory in factories]


class TestTiffReader(ReaderTests):
    @pytest.fixture(params=cases.TIFF_CASES, ids=_ids(cases.TIFF_CASES))
    def case(self, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
        made = _open_case(request, tmp_path)
        assert isinstance(made.reader, TiffReader)
        return made


class TestOpenSlideReader(ReaderTests):
    @pytest.fixture(params=cases.OPENSLIDE_CASES, ids=_ids(cases.OPENSLIDE_CASES))
    def case(self, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
        made = _open_case(request, tmp_path)
        assert isinstance(made.reader, OpenSlideReader)
        return made


class TestImageReader(ReaderTests):
    @pytest.fixture(params=cases.IMAGE_CASES, ids=_ids(cases.IMAGE_CASES))
    def case(self, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
        made = _open_case(request, tmp_path)
        assert isinstance(made.reader, ImageReader)
        return made


class TestZarrReader(ReaderTests):
    @pytest.fixture(params=cases.ZARR_CASES, ids=_ids(cases.ZARR_CASES))
    def case(self, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
        made = _open_case(request, tmp_path)
        assert isinstance(made.reader, ZarrReader)
        return made


# ---------------------------------------------------------------- specific behaviour


def test_cmu_slide_geometry(cmu_slide: Path) -> None:
    """(y, x) order: the CMU region is 2967 px high and 2220 px wide."""
    with open_slide(cmu_slide) as reader:
        assert reader.info.shape == (2967, 2220)
        assert reader.info.vendor == "aperio"
        assert reader.info.properties["openslide.vendor"] == "aperio"


def test_openslide_matches_tifffile_on_boxes_at_integer_levels() -> None:
    """The two backends agree pixel for pixel where OpenSlide does not resample."""
    path = data_path("slides", "boxes.tiff")
    with OpenSlideReader(path) as slide, TiffReader(path) as tiff:
        assert slide.info.level_shapes == tiff.info.level_shapes
        assert slide.info.level_downsamples == pytest.approx(tiff.info.level_downsamples)
        for level in (0, 1):
            np.testing.assert_array_equal(
                slide.read_region(level, 17, 23, 40, 50), tiff.read_region(level, 17, 23, 40, 50)
            )


def test_transparent_openslide_pixels_are_white(tmp_path: Path) -> None:
    """RGBA from OpenSlide composites on white: a fully transparent tile is glass."""
    image = np.zeros((128, 128, 4), np.uint8)  # black, fully transparent
    image[:, 64:] = (10, 20, 30, 255)
    path = tmp_path / "alpha.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", extrasamples=["unassalpha"])
    with OpenSlideReader(path) as reader:
        region = reader.read_region(0, 0, 0, 128, 128)
    assert (region[:, :64] == 255).all()
    assert (region[:, 64:] == (10, 20, 30)).all()


def test_premultiplied_alpha_tiff_composites_on_white(tmp_path: Path) -> None:
    color = np.array([[[40, 80, 120, 128]]], np.uint8)  # premultiplied: colour already * a
    path = tmp_path / "assoc.tif"
    tifffile.imwrite(path, color, photometric="rgb", extrasamples=["assocalpha"])
    with open_slide(path) as reader:
        assert reader.read_region(0, 0, 0, 1, 1)[0, 0].tolist() == [167, 207, 247]


def test_palette_and_miniswhite_tiff(tmp_path: Path) -> None:
    indices = cases.noise((20, 30), seed=20)
    colormap = np.random.default_rng(21).integers(0, 65536, (3, 256), dtype=np.uint16)
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap)
    with open_slide(path) as reader:
        assert reader.info.channels == 3
        expected = (colormap >> 8).astype(np.uint8).T[indices]
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 20, 30), expected)
    gray = cases.noise((20, 30), seed=22)
    path = tmp_path / "miniswhite.tif"
    tifffile.imwrite(path, gray, photometric="miniswhite")
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 20, 30)[..., 0], 255 - gray)


def test_tiff_stack_reads_first_plane_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack = cases.noise((5, 40, 50), seed=23)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with caplog.at_level("WARNING"), open_slide(path) as reader:
        assert reader.info.shape == (40, 50)
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 40, 50)[..., 0], stack[0])
    assert "first plane" in caplog.text


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((1e4 / 0.5, 1e4 / 0.25), "CENTIMETER", (0.25, 0.5)),  # (x, y) px/cm -> (y, x) µm
        ((25400 / 0.5, 25400 / 0.5), "INCH", (0.5, 0.5)),
        ((72, 72), "INCH", None),  # display default: 352.8 µm/px
        ((28.3465, 28.3465), "CENTIMETER", None),  # the same 72 dpi written in cm
        ((2.0, 2.0), "MICROMETER", (0.5, 0.5)),
        ((4.0, 4.0), "NONE", None),  # no unit
    ],
)
def test_tiff_mpp_from_resolution_tags(
    tmp_path: Path, resolution: tuple[float, float], unit: str, expected: tuple | None
) -> None:
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, cases.noise((8, 8)), resolution=resolution, resolutionunit=unit)
    with open_slide(path) as reader:
        if expected is None:
            assert reader.info.mpp is None
        else:
            assert reader.info.mpp == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"PhysicalSizeX": 0.5}, (0.5, 0.5)),  # one size only: square pixels
        ({"PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.5}, (0.5, 0.25)),
        ({}, None),
    ],
)
def test_ome_tiff_mpp(tmp_path: Path, metadata: dict, expected: tuple | None) -> None:
    path = tmp_path / "mpp.ome.tif"
    tifffile.imwrite(path, cases.noise((16, 24)), ome=True, metadata={"axes": "YX", **metadata})
    with open_slide(path) as reader:
        assert reader.info.vendor == "ome-tiff"
        if expected is None:
            assert reader.info.mpp is None
        else:
            assert reader.info.mpp == pytest.approx(expected)


def test_gray_alpha_png_stays_one_channel(tmp_path: Path) -> None:
    """Gray+alpha is gray: one channel, composited on white like RGBA."""
    la = cases.noise((20, 25, 2), seed=26)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    with open_slide(path) as reader:
        assert reader.info.channels == 1
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 20, 25), cases.on_white(la))


def test_32bit_gray_pillow_images_are_read_as_16_bit() -> None:
    """Older Pillow opens 16-bit PNGs in mode "I": values in 0..65535 are scaled like 16-bit."""
    values = np.array([[0, 257, 65535]], np.int32)
    samples, alpha = _as_samples(Image.fromarray(values))
    assert not alpha
    assert samples[..., 0].tolist() == [[0, 1, 255]]
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        _as_samples(Image.fromarray(values - 1))


def test_tiff_probe_reads_one_tile_not_the_image(tmp_path: Path) -> None:
    """Opening decodes the top-left tile only: a corrupt tile elsewhere fails on read, by name."""
    image = cases.noise((256, 256, 3), seed=24)
    path = tmp_path / "corrupt_tile.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(b"\x00garbage" * (count // 8))
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 64, 64), image[:64, :64])
        with pytest.raises(SlideReadError, match=r"corrupt_tile\.tif.*y=200, x=190, h=10, w=10"):
            reader.read_region(0, 200, 190, 10, 10)


@pytest.mark.parametrize(
    ("layout", "box", "segments"),
    [
        ({"tile": (64, 64)}, (10, 10, 20, 20), 1),  # inside one tile
        ({"tile": (64, 64)}, (60, 60, 10, 10), 4),  # across a 2x2 tile corner
        ({"rowsperstrip": 16}, (20, 100, 10, 300), 1),  # inside one strip
    ],
)
def test_tiff_regions_read_only_their_segments(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: dict,
    box: tuple[int, int, int, int],
    segments: int,
) -> None:
    """A region reads the strips/tiles it overlaps, never the whole image."""
    image = cases.noise((1024, 768, 3), seed=25)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, compression="zlib", photometric="rgb", **layout)
    reads: list[int] = []
    original = tifffile.tifffile.FileCache.read

    def counting_read(self: object, fh: object, offset: int, bytecount: int, *args: int) -> bytes:
        reads.append(bytecount)
        return original(self, fh, offset, bytecount, *args)

    monkeypatch.setattr(tifffile.tifffile.FileCache, "read", counting_read)
    with open_slide(path) as reader:
        assert len(reads) == 1, "the open-time probe decodes exactly one segment"
        reads.clear()
        y, x, h, w = box
        np.testing.assert_array_equal(reader.read_region(0, *box), image[y : y + h, x : x + w])
    assert len(reads) == segments


def test_ome_zarr_5d_reads_first_timepoint_and_combines_scales(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = cases.noise((2, 3, 1, 40, 30), seed=27)  # t, c, z, y, x
    path = tmp_path / "tczyx.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("s0", shape=data.shape, chunks=(1, 3, 1, 16, 16), dtype="uint8")[:] = data
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"
    ]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1] * 5}]}
            ],
            "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 500, 250]}],
        }
    ]
    with caplog.at_level("WARNING"), open_slide(path) as reader:
        assert reader.info.mpp == pytest.approx((0.5, 0.25))
        assert reader.info.vendor == "ome-zarr-0.4"
        np.testing.assert_array_equal(
            reader.read_region(0, 0, 0, 40, 30), np.moveaxis(data[0, :, 0], 0, -1)
        )
    assert "t=2" in caplog.text


# ---------------------------------------------------------------- backend selection by content


def _write_tiff(path: Path) -> None:
    tifffile.imwrite(path, cases.noise((30, 40, 3)), photometric="rgb")


def _write_png(path: Path) -> None:
    Image.fromarray(cases.noise((30, 40, 3))).save(path, format="PNG")


def _write_jpeg(path: Path) -> None:
    Image.fromarray(cases.smooth((30, 40, 3))).save(path, format="JPEG")


@pytest.mark.parametrize(
    ("name", "write", "reader_type"),
    [
        ("tiff_named.png", _write_tiff, TiffReader),
        ("png_named.tif", _write_png, ImageReader),
        ("jpeg_named.svs", _write_jpeg, ImageReader),
        ("no_extension", _write_tiff, TiffReader),
    ],
)
def test_backend_is_chosen_by_content(
    tmp_path: Path, name: str, write: object, reader_type: type
) -> None:
    path = tmp_path / name
    write(path)  # type: ignore[operator]
    with open_slide(path) as reader:
        assert isinstance(reader, reader_type)
        assert reader.info.shape == (30, 40)


def test_vendor_slide_with_wrong_extension_uses_openslide(tmp_path: Path) -> None:
    path = tmp_path / "slide.png"
    shutil.copy(data_path("slides", "small.svs"), path)
    with open_slide(path) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.info.vendor == "aperio"


def test_generic_tiled_tiff_prefers_tifffile() -> None:
    with open_slide(data_path("slides", "boxes.tiff")) as reader:
        assert isinstance(reader, TiffReader)


def test_sniff_format() -> None:
    assert sniff_format(b"MM\x00*\x00\x00\x00\x08") == "tiff"
    assert sniff_format(b"II+\x00\x08\x00\x00\x00") == "tiff"  # BigTIFF
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"") is None


def test_open_slide_accepts_str_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    _write_tiff(path)
    with open_slide(str(path)) as reader:
        assert reader.info.path == path


# ---------------------------------------------------------------- bad inputs


def _assert_one_line(error: SlideReadError, path: Path) -> None:
    message = str(error)
    assert path.name in message
    assert "\n" not in message and "\r" not in message
    assert isinstance(error, OSError)


def _make_zero_size_tiff(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*zero-size array", UserWarning)
        tifffile.imwrite(path, np.zeros((0, 10), np.uint8))


def _make_zero_size_zarr(path: Path) -> None:
    zarr.create_array(store=str(path), shape=(0, 10), chunks=(1, 10), dtype="uint8")


def _make_bad_zarr_shape(path: Path) -> None:
    zarr.create_array(store=str(path), shape=(2, 3, 10, 10), dtype="uint8")


def _make_float_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((10, 10), np.float32))


def _make_ycbcr_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="ycbcr")


def _make_empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _make_text_file(path: Path) -> None:
    path.write_text("patient,slide\n1,a.svs\n")


def _make_plain_directory(path: Path) -> None:
    path.mkdir()
    (path / "readme.txt").write_text("not zarr")


def _make_group_without_multiscales(path: Path) -> None:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=(10, 10), dtype="uint8")


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("missing.svs", None, "no such file"),
        ("empty.svs", _make_empty_file, r"empty file \(0 bytes\)"),
        ("notes.svs", _make_text_file, "unrecognised file header.*text"),
        ("zero.tif", _make_zero_size_tiff, "zero size"),
        ("zero.zarr", _make_zero_size_zarr, "zero size"),
        ("four_d.zarr", _make_bad_zarr_shape, r"shape \(2, 3, 10, 10\)"),
        ("float.tif", _make_float_tiff, "unsupported sample type float32"),
        ("ycbcr.tif", _make_ycbcr_tiff, "YCbCr colour without JPEG compression"),
        ("folder", _make_plain_directory, "directory without Zarr metadata"),
        ("group.zarr", _make_group_without_multiscales, "multiscales"),
    ],
)
def test_bad_inputs_fail_to_open(tmp_path: Path, name: str, make: object, match: str) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)  # type: ignore[operator]
    with pytest.raises(SlideReadError, match=match) as raised:
        open_slide(path)
    _assert_one_line(raised.value, path)


def test_broken_svs_is_not_a_tiff() -> None:
    path = data_path("bad", "broken.svs")
    with pytest.raises(SlideReadError, match="unrecognised file header") as raised:
        open_slide(path)
    _assert_one_line(raised.value, path)
    assert str(raised.value).startswith(str(path))
    assert "expected a whole-slide image" in str(raised.value)


def test_errors_survive_pickling() -> None:
    """Worker processes send errors back to the parent: the message must not change."""
    path = data_path("bad", "broken.svs")
    with pytest.raises(SlideReadError) as raised:
        open_slide(path)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert isinstance(copy, SlideReadError)
    assert str(copy) == str(raised.value)


def test_unopenable_tiff_names_the_compression() -> None:
    path = data_path("bad", "unopenable.tiff")
    with pytest.raises(SlideReadError, match="compression 52479") as raised:
        open_slide(path)
    _assert_one_line(raised.value, path)
    assert raised.value.__cause__ is not None


def test_unreadable_svs_opens_then_fails_on_read() -> None:
    path = data_path("bad", "unreadable.svs")
    with open_slide(path) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.info.shape == (16, 16)
        with pytest.raises(SlideReadError, match=r"y=2, x=3, h=4, w=5.*level 0") as raised:
            reader.read_region(0, 2, 3, 4, 5)
    _assert_one_line(raised.value, path)


def test_truncated_png_opens_then_fails_on_read(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(cases.noise((200, 200, 3))).save(good)
    path = tmp_path / "truncated.png"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with open_slide(path) as reader:
        with pytest.raises(SlideReadError, match=r"y=0, x=0, h=1, w=1") as raised:
            reader.read_region(0, 0, 0, 1, 1)
    _assert_one_line(raised.value, path)
