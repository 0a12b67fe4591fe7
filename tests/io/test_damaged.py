"""Damaged input: scale from every TIFF dialect, truncated and corrupt files, special files,
corrupt JPEG tiles that still decode, and the one-line error contract of the command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import data_path
from tests.io import cases
from tilesegment.errors import SlideReadError
from tilesegment.io import DecodeWarning, open_slide
from tilesegment.io.openslide import OpenSlideReader, detect_vendor
from tilesegment.io.tiff import TiffReader
from tilesegment.store.layout import report_path

APERIO = "Aperio Image Library v11.2.1 \r\n2048x2048 -> 512x512 - |AppMag = 20|MPP = 0.499|X = 1"


def _cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tilesegment", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], path: Path, *words: str) -> str:
    """Exit code 2 and exactly one line on stderr, ``Error: PATH: ...`` holding ``words``."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n" + "\n".join(lines[:20])
    assert lines[0].startswith(f"Error: {path}: "), lines[0]
    for word in words:
        assert word in lines[0]
    return lines[0]


def _write_tiled_jpeg(path: Path, image: np.ndarray, tile: int = 256) -> None:
    tifffile.imwrite(path, image, tile=(tile, tile), compression="jpeg", photometric="rgb")


def _entropy_start(segment: bytes) -> int:
    """Offset of the entropy-coded data in a JPEG stream: just after the SOS header."""
    sos = segment.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(segment[sos + 2 : sos + 4], "big")


def _corrupt_tile(path: Path, index: int) -> None:
    """Flip bytes inside tile ``index``'s entropy-coded data without touching a marker (0xff and
    the byte after it) or making one: the tile still decodes, with libjpeg warnings."""
    page = tifffile.TiffFile(path).pages[0]
    offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    start = offset + _entropy_start(bytes(data[offset : offset + count])) + 100
    for i in range(start, offset + count - 100, 37)[:20]:
        if 0xFF not in (data[i - 1], data[i], data[i] ^ 0x5A):
            data[i] ^= 0x5A
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ mpp parsers


def test_aperio_mpp_from_description_in_the_tifffile_reader(tmp_path: Path) -> None:
    """A striped Aperio file OpenSlide does not take: tifffile reads the MPP = field."""
    path = tmp_path / "striped.svs"
    image = cases.noise((64, 48, 3))
    tifffile.imwrite(path, image, description=APERIO, metadata=None, rowsperstrip=16)
    assert detect_vendor(path) is None
    with open_slide(path) as reader:
        assert isinstance(reader, TiffReader)
        assert reader.info.vendor == "aperio"
        assert reader.info.mpp == pytest.approx((0.499, 0.499))


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("Aperio Image Library v12|MPP = 0.2527|AppMag = 40", (0.2527, 0.2527)),
        ("Aperio Image Library v12|AppMag = 40", None),  # no MPP field
        ("Aperio Image Library v12|MPP = n/a", None),  # unparsable
        ("Aperio Image Library v12|MPP = 400", None),  # outside 0.05-50 um/px
    ],
)
def test_aperio_mpp_variants(tmp_path: Path, description: str, expected: tuple | None) -> None:
    path = tmp_path / "a.svs"
    tifffile.imwrite(path, cases.noise((16, 16, 3)), description=description, metadata=None)
    with TiffReader(path) as reader:
        assert reader.info.mpp == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("unit", "resolution", "expected"),
    [
        ("um", (2.0, 4.0), (0.25, 0.5)),  # px per unit (x, y) -> um per px (y, x)
        ("micron", (4.0, 4.0), (0.25, 0.25)),
        ("nm", (0.004, 0.004), (0.25, 0.25)),
        ("pixel", (4.0, 4.0), None),  # no length unit
    ],
)
def test_imagej_mpp_from_unit_and_resolution(
    tmp_path: Path, unit: str, resolution: tuple[float, float], expected: tuple | None
) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path, cases.noise((16, 24)), imagej=True, resolution=resolution, metadata={"unit": unit}
    )
    with open_slide(path) as reader:
        assert reader.info.vendor == "imagej-tiff"
        assert reader.info.mpp == (None if expected is None else pytest.approx(expected))


def test_ome_mpp_in_micrometre_by_default(tmp_path: Path) -> None:
    path = tmp_path / "o.ome.tif"
    metadata = {"axes": "YXS", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.6}
    tifffile.imwrite(path, cases.noise((16, 24, 3)), ome=True, metadata=metadata)
    with open_slide(path) as reader:
        assert reader.info.mpp == pytest.approx((0.6, 0.3))


# ------------------------------------------------------------------------------ truncated


def _truncated_copy(tmp_path: Path, fraction: float) -> Path:
    source = data_path("slides", "CMU-1-Small-Region.svs")
    data = source.read_bytes()
    path = tmp_path / f"cmu-{int(fraction * 100)}pct.svs"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def test_svs_cut_to_10_percent_is_refused_as_truncated(tmp_path: Path) -> None:
    """Its IFDs lie at the end of the file: no page is left, and the error says why."""
    path = _truncated_copy(tmp_path, 0.10)
    with pytest.raises(SlideReadError, match="looks truncated or corrupt") as raised:
        open_slide(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert f"in a file of {path.stat().st_size} bytes" in message
    assert "copy or export it again" in message and "\n" not in message


def test_svs_cut_to_90_percent_keeps_its_scale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Level 0 is intact: read with tifffile at the Aperio 0.499 um/px, first log line says why."""
    path = _truncated_copy(tmp_path, 0.90)
    with caplog.at_level(logging.WARNING), open_slide(path) as reader:
        assert isinstance(reader, TiffReader)
        assert reader.info.vendor == "aperio"
        assert reader.info.mpp == pytest.approx((0.499, 0.499))
        assert reader.info.shape == (2967, 2220)
        with OpenSlideReader(data_path("slides", "CMU-1-Small-Region.svs")) as intact:
            np.testing.assert_array_equal(
                reader.read_region(0, 2900, 2100, 67, 120),
                intact.read_region(0, 2900, 2100, 67, 120),
            )
    first = caplog.records[0].getMessage()
    assert first.startswith(f"{path}: the TIFF looks truncated or corrupt")
    assert "tifffile" not in {r.name for r in caplog.records}  # its own unnamed line is kept off


def test_tiff_whose_tile_data_runs_past_the_end_is_refused(tmp_path: Path) -> None:
    """IFD first, data after (tifffile's layout): the cut is found from the tile offsets, and
    OpenSlide is not tried as a fallback for a file known to be truncated."""
    whole = tmp_path / "whole.tif"
    _write_tiled_jpeg(whole, cases.noise((512, 512, 3)), tile=128)
    path = tmp_path / "cut.tif"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(SlideReadError, match="the file is truncated") as raised:
        open_slide(path)
    assert f"the file has {path.stat().st_size} bytes" in str(raised.value)
    assert "OpenSlide" not in str(raised.value)


def test_aperio_slide_openslide_refuses_is_read_with_tifffile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSlide detects Aperio but cannot open it (a level with an unknown compression): the
    first log line names the file and OpenSlide's reason, and tifffile reads level 0."""
    path = tmp_path / "mixed.svs"
    image = cases.noise((256, 256, 3))
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, description=APERIO, metadata=None, tile=(128, 128), compression="zlib")
        tif.write(image[::2, ::2], description=APERIO, metadata=None, tile=(128, 128))
    compression = tifffile.TiffFile(path).pages[1].tags["Compression"]
    data = bytearray(path.read_bytes())
    data[compression.valueoffset : compression.valueoffset + 2] = struct.pack("<H", 52479)
    path.write_bytes(bytes(data))
    assert detect_vendor(path) == "aperio"
    with caplog.at_level(logging.WARNING), open_slide(path) as reader:
        assert isinstance(reader, TiffReader)
        assert reader.info.mpp == pytest.approx((0.499, 0.499))
        np.testing.assert_array_equal(reader.read_region(0, 0, 0, 256, 256), image)
    first = caplog.records[0].getMessage()
    assert first.startswith(f"{path}: OpenSlide cannot open it (")
    assert "52479" in first and first.endswith("reading it with tifffile instead")


# ------------------------------------------------------------------------------ special files


@pytest.mark.parametrize("command", ["info", "run"])
def test_fifo_is_refused_at_once(tmp_path: Path, command: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes: it must never be opened."""
    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    args = [command, fifo] + (["-o", tmp_path / "out.zarr"] if command == "run" else [])
    proc = _cli(*args, timeout=60)  # raises TimeoutExpired if it hangs
    _assert_one_line_error(proc, fifo, "not a regular file but a FIFO (named pipe)")
    assert not (tmp_path / "out.zarr").exists()


def test_device_is_refused() -> None:
    with pytest.raises(SlideReadError, match="character device"):
        open_slide("/dev/zero")


# ------------------------------------------------------------------------------ corrupt JPEG


def test_corrupt_jpeg_tile_that_decodes_is_found_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "corrupt.tif"
    _write_tiled_jpeg(path, cases.smooth((512, 768, 3)))
    good = tifffile.imread(path)
    _corrupt_tile(path, 4)  # row 1, column 1 of a 2 x 3 grid
    bad = tifffile.imread(path)
    assert np.abs(bad[256:, 256:512].astype(int) - good[256:, 256:512]).mean() > 5  # wrong...
    np.testing.assert_array_equal(bad[:256], good[:256])  # ...and only there
    with caplog.at_level(logging.WARNING), open_slide(path) as reader:
        reader.read_region(0, 0, 0, 200, 200)  # tile (0, 0) only
        assert reader.decode_warnings() == ()
        reader.read_region(0, 0, 0, 512, 768)
        reader.read_region(0, 300, 300, 10, 10)  # the corrupt tile again: reported once
        (warning,) = reader.decode_warnings()
    assert warning == DecodeWarning(0, (1, 1), (256, 256, 256, 256), warning.message)
    assert warning.message.startswith("Corrupt JPEG data")
    (record,) = [r for r in caplog.records if "is corrupt" in r.getMessage()]
    assert record.getMessage().startswith(
        f"{path}: tile (row 1, column 1) of level 0, pixels y=256..511, x=256..511, is corrupt"
    )


def test_intact_jpeg_slides_have_no_decode_warnings(cmu_slide: Path) -> None:
    """The real Aperio JPEG tiles (shared tables, RGB) pass the strict check."""
    with TiffReader(cmu_slide) as reader:
        reader.read_region(0, 0, 0, *reader.info.shape)
        assert reader.decode_warnings() == ()


def test_run_reports_the_corrupt_tile(tmp_path: Path, tiny_model: Path) -> None:
    slide = tmp_path / "corrupt.tif"
    _write_tiled_jpeg(slide, cases.smooth((512, 512, 3)))
    _corrupt_tile(slide, 3)  # row 1, column 1 of a 2 x 2 grid
    out = tmp_path / "out.zarr"
    proc = _cli("run", slide, "-o", out, "--model", tiny_model, "--mpp", "0.5")
    assert proc.returncode == 0, proc.stderr
    logged = [line for line in proc.stderr.splitlines() if "is corrupt" in line]
    assert len(logged) == 1
    assert f"{slide}: tile (row 1, column 1) of level 0, pixels y=256..511, x=256..511" in logged[0]
    report = json.loads(report_path(out).read_text())
    assert report["decode_warnings"]["count"] == 1
    (tile,) = report["decode_warnings"]["tiles"]
    assert {k: tile[k] for k in ("level", "row", "column", "y", "x", "h", "w")} == {
        "level": 0,
        "row": 1,
        "column": 1,
        "y": 256,
        "x": 256,
        "h": 256,
        "w": 256,
    }
    assert tile["message"].startswith("Corrupt JPEG data")


# ------------------------------------------------------------------------------ one line only


def _zeroed_tiles(tmp_path: Path) -> Path:
    """A 2048² tiled JPEG TIFF whose tiles after the first are zeros: it opens (the probe reads
    tile 0), then the thumbnail read meets 63 undecodable tiles at once."""
    path = tmp_path / "zeroed.tif"
    rng = np.random.default_rng(0)
    tiles = (
        rng.integers(0, 256, (256, 256, 3), np.uint8)
        if i % 5 == 0
        else np.full((256, 256, 3), 230, np.uint8)
        for i in range(64)
    )
    tifffile.imwrite(
        path, tiles, shape=(2048, 2048, 3), dtype=np.uint8, tile=(256, 256), compression="jpeg"
    )
    page = tifffile.TiffFile(path).pages[0]
    data = bytearray(path.read_bytes())
    for offset, count in list(zip(page.dataoffsets, page.databytecounts, strict=True))[1:]:
        data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    return path


def test_run_on_corrupt_tiles_prints_one_line(tmp_path: Path, tiny_model: Path) -> None:
    """Before the fix: the error line, then ~400 lines of pending zarr/asyncio task tracebacks."""
    slide = _zeroed_tiles(tmp_path)
    proc = _cli("run", slide, "-o", tmp_path / "out.zarr", "--model", tiny_model)
    _assert_one_line_error(proc, slide, "cannot decode region", "Not a JPEG file")


def test_run_on_truncated_svs_prints_one_line(tmp_path: Path, tiny_model: Path) -> None:
    slide = _truncated_copy(tmp_path, 0.10)
    proc = _cli("run", slide, "-o", tmp_path / "out.zarr", "--model", tiny_model)
    _assert_one_line_error(proc, slide, "looks truncated or corrupt")
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("broken.svs", ["unrecognised file header"]),
        ("unopenable.tiff", ["compression 52479"]),
    ],
)
def test_bad_files_print_one_line(name: str, words: list[str]) -> None:
    path = data_path("bad", name)
    _assert_one_line_error(_cli("info", path), path, *words)


def test_unreadable_svs_run_prints_one_line(tmp_path: Path, tiny_model: Path) -> None:
    path = data_path("bad", "unreadable.svs")
    proc = _cli("run", path, "-o", tmp_path / "out.zarr", "--model", tiny_model)
    _assert_one_line_error(proc, path, "cannot decode region", "Bogus marker length")


def test_sigterm_during_a_read_leaves_no_asyncio_tracebacks(tmp_path: Path) -> None:
    """SIGTERM turned into KeyboardInterrupt in the middle of a big read (as `run` does during the
    thumbnail): the process exits without "Task was destroyed but it is pending!" noise."""
    slide = tmp_path / "noise.tif"
    _write_tiled_jpeg(slide, cases.noise((2048, 2048, 3)))
    code = textwrap.dedent(
        f"""
        import signal, sys
        from tilesegment.io import open_slide

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        reader = open_slide({str(slide)!r})
        reader.read_region(0, 0, 0, 2048, 2048)
        try:
            print("reading", flush=True)
            while True:
                reader.read_region(0, 0, 0, 2048, 2048)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
            sys.exit(143)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "reading\n"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143
    assert stderr.splitlines() == ["stopped"], stderr[-2000:]
