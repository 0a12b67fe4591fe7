"""Tissue maps (issue 14, items 2, 4 and 6): thumbnails in bounded memory whatever the pyramid,
small and thin images are all tissue, an image without tissue says so, and a user mask of the
wrong aspect is refused before any output exists."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from PIL import Image

from tests.conftest import data_path
from tilesegment.cli import main
from tilesegment.errors import ConfigError
from tilesegment.geometry import Box
from tilesegment.infer.options import RunOptions
from tilesegment.infer.run import run_slide
from tilesegment.io import open_slide
from tilesegment.io.base import StridedReader
from tilesegment.model.registry import resolve_model
from tilesegment.store import OutputStore, is_complete
from tilesegment.store.layout import report_path
from tilesegment.testing.synthetic import render, write_glass_slide, write_slide
from tilesegment.tissue import (
    MIN_DETECT_PX,
    TissueMap,
    auto_tissue,
    load_tissue_mask,
    read_thumbnail,
    thumbnail_grid,
)

# --------------------------------------------------------------------------- thumbnails


def _decimated(reader, max_px: int) -> np.ndarray:
    """The thumbnail's definition, from one whole read of the level."""
    level, step = thumbnail_grid(reader.info, max_px=max_px)
    h, w = reader.info.level_shapes[level]
    full = reader.read_region(level, 0, 0, h, w)
    return full[min(step // 2, h - 1) :: step, min(step // 2, w - 1) :: step]


@pytest.mark.parametrize(
    ("size", "max_px"),
    [((1000, 1500), 256), ((3, 5000), 2048), ((5000, 1), 2048), ((1, 1), 2048), ((300, 7), 64)],
)
def test_strided_thumbnail_of_a_tiff_is_the_decimated_image(tmp_path, size, max_px):
    path = write_slide(tmp_path / "s.tif", size, levels=1, tile=128, seed=5, tissue_fraction=0.5)
    with open_slide(path) as reader:
        assert isinstance(reader, StridedReader)
        thumb, level = read_thumbnail(reader, max_px=max_px)
        expected = _decimated(reader, max_px)
    assert level == 0
    assert thumb.shape == expected.shape and thumb.shape[0] >= 1 and thumb.shape[1] >= 1
    assert max(thumb.shape[:2]) <= max_px
    np.testing.assert_array_equal(thumb, expected)


def test_zarr_thumbnail_is_the_decimated_image(tmp_path):
    pixels = render(0, 0, 700, 900, size=(700, 900), tissue_fraction=0.4, seed=2)
    zarr.create_array(tmp_path / "a.zarr", data=pixels, chunks=(64, 64, 3))
    with open_slide(tmp_path / "a.zarr") as reader:
        assert isinstance(reader, StridedReader)
        np.testing.assert_array_equal(
            read_thumbnail(reader, max_px=100)[0], _decimated(reader, 100)
        )


def test_block_thumbnail_of_a_real_svs_is_the_decimated_image(cmu_slide):
    """OpenSlide has no strided read: the thumbnail comes in blocks (here 2 x 2 of them)."""
    with open_slide(cmu_slide) as reader:
        assert not isinstance(reader, StridedReader)
        thumb, _ = read_thumbnail(reader, max_px=256)
        expected = _decimated(reader, 256)
    assert thumb.shape == (247, 185, 3)
    np.testing.assert_array_equal(thumb, expected)


_THUMBNAIL_CHILD = textwrap.dedent(
    """
    import json, sys
    from tilesegment.io import open_slide
    from tilesegment.tissue import TissueMap, auto_tissue, read_thumbnail

    with open_slide(sys.argv[1]) as reader:
        thumb, level = read_thumbnail(reader)
        mask, how = auto_tissue(thumb, reader.info.shape)
        tissue = TissueMap(mask, reader.info.shape)
    ys, xs = mask.nonzero()
    status = open("/proc/self/status").read()
    hwm_kb = int(status.split("VmHWM:")[1].split()[0])
    print(json.dumps({
        "shape": thumb.shape, "fraction": tissue.fraction, "how": how, "peak_mb": hwm_kb / 1024,
        "bbox": [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())],
    }))
    """
)


def test_thumbnail_of_a_60000px_single_level_tiff_stays_in_bounded_memory(tmp_path):
    """3.6 Gpx (10.8 GB of RGB) without a pyramid: the old full-width band reads kept every
    band alive and peaked at ~10.8 GB here; tile-by-tile strided reads stay near 120 MB."""
    size, box = 60000, (20000, 30000, 3072, 4096)
    slide = write_glass_slide(tmp_path / "glass.tif", (size, size), tissue_box=box)
    assert slide.stat().st_size < 150e6
    with tifffile.TiffFile(slide) as tif:
        assert len(tif.series[0].levels) == 1 and tif.pages.first.is_tiled
    proc = subprocess.run(
        [sys.executable, "-c", _THUMBNAIL_CHILD, str(slide)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["shape"] == [2000, 2000, 3]  # step 30
    assert out["peak_mb"] < 400, out
    # The patch (an ellipse filling about half of the box) is found, and nothing else.
    assert "detected" in out["how"]
    y0, x0, y1, x1 = (v * 30 for v in out["bbox"])
    assert box[0] - 300 <= y0 and y1 <= box[0] + box[2] + 300
    assert box[1] - 300 <= x0 and x1 <= box[1] + box[3] + 300
    assert 0.3 * box[2] * box[3] / size**2 < out["fraction"] < 1.5 * box[2] * box[3] / size**2


# --------------------------------------------------------------------------- small images


def test_images_with_a_side_under_the_thumbnail_size_are_all_tissue():
    glass = np.full((10, 2000, 3), 242, np.uint8)
    mask, how = auto_tissue(glass, (MIN_DETECT_PX - 1, 4 * MIN_DETECT_PX))
    assert mask.shape == (10, 2000) and mask.all()
    assert f"shorter than {MIN_DETECT_PX} px" in how
    mask, how = auto_tissue(np.full((2000, 2000, 3), 242, np.uint8), (MIN_DETECT_PX,) * 2)
    assert not mask.any() and "detected" in how


def _real_strip(length_tiles: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A 3 px high strip of real H&E (the row richest in nuclei of each of the first MoNuSeg
    tiles, joined end to end: 3 x 5000 px) and its nucleus labels."""
    images, labels = [], []
    names = sorted(data_path("monuseg", "images").glob("*.png"))[:length_tiles]
    for path in names:
        label = tifffile.imread(data_path("monuseg", "labels", path.stem + ".tif")) > 0
        r = int(np.convolve(label.mean(axis=1), np.ones(3), mode="valid").argmax())
        images.append(np.asarray(Image.open(path).convert("RGB"))[r : r + 3])
        labels.append(label[r : r + 3])
    return np.concatenate(images, axis=1), np.concatenate(labels, axis=1)


def test_a_3px_strip_of_real_he_is_segmented(tmp_path):
    """3 x 5000 px: its thumbnail is 1 px high, which the old detection erased entirely (the
    run came out all background but complete). Now it is all tissue, and nuclei are found."""
    pixels, nuclei = _real_strip()
    assert pixels.shape == (3, 5000, 3) and nuclei.mean() > 0.2
    Image.fromarray(pixels).save(tmp_path / "strip.png")
    out = tmp_path / "strip.zarr"
    opts = RunOptions(mpp=0.25, progress=False)
    summary = run_slide(tmp_path / "strip.png", out, resolve_model("nuclei-he"), opts)
    assert is_complete(out)
    assert summary.extra["tiles_processed"] == summary.tiles and summary.tiles > 1
    assert summary.extra["tissue_fraction"] == 1.0
    store = OutputStore.open(out)
    assert store.label("tissue")[:].all()
    mask = np.asarray(store.mask[:]) > 0
    on_nuclei, on_background = mask[nuclei].mean(), mask[~nuclei].mean()
    # nucleus = interior or boundary class; a 3 px strip leaves the boundary ring little room
    assert on_nuclei > 0.3 and on_nuclei > 3 * on_background, (on_nuclei, on_background)


def test_a_1x1_image_is_computed(tmp_path, tiny_model):
    he = np.asarray(Image.open(data_path("tnbc", "images", "01_1.png")).convert("RGB"))
    Image.fromarray(he[256:257, 256:257]).save(tmp_path / "one.png")
    out = tmp_path / "one.zarr"
    summary = run_slide(tmp_path / "one.png", out, tiny_model, RunOptions(progress=False))
    assert is_complete(out)
    assert summary.tiles == 1 and summary.extra["tiles_processed"] == 1
    assert summary.mpx_per_s is not None and summary.mpx_per_s > 0
    store = OutputStore.open(out)
    assert store.label("tissue")[:].tolist() == [[1]]
    # Computed probabilities sum to 1 (255 as uint8); a skipped tile keeps the fill value 0.
    assert abs(int(np.asarray(store.probabilities[:, 0, 0]).astype(int).sum()) - 255) <= 2


def test_an_all_glass_image_says_no_tissue_and_reports_no_rate(tmp_path, tiny_model):
    slide = write_glass_slide(tmp_path / "glass.tif", (MIN_DETECT_PX, MIN_DETECT_PX + 512))
    out = tmp_path / "glass.zarr"
    args = ["run", str(slide), "-o", str(out), "--model", str(tiny_model), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "tilesegment", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "NO TISSUE FOUND" in line]
    assert len(warnings) == 2, proc.stderr  # the warning line and the summary line
    assert warnings[0].startswith("WARNING") and "glass.tif" in warnings[0]
    assert "no tile computed" in proc.stderr and "Mpx/s" not in proc.stderr.split("done:")[1]
    report = json.loads(report_path(out).read_text())
    assert report["tissue"]["mode"] == "auto" and report["tissue"]["found"] is False
    assert report["tissue"]["fraction"] == 0.0
    assert report["tiles"]["processed"] == 0 and report["megapixels"]["processed"] == 0
    assert report["mpx_per_s"] is None
    assert is_complete(out)


# --------------------------------------------------------------------------- user masks


def _mask_png(path: Path, shape: tuple[int, int]) -> Path:
    mask = np.zeros(shape, np.uint8)
    mask[: shape[0] // 2] = 255
    Image.fromarray(mask).save(path)
    return path


def test_a_transposed_mask_is_refused_before_any_output(tmp_path, cmu_slide, tiny_model):
    """CMU-1-Small-Region is 2967 x 2220 px (h x w); its mask transposed is 2220 x 2967."""
    mask = _mask_png(tmp_path / "mask.png", (2220, 2967))
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(
        main,
        ["run", str(cmu_slide), "-o", str(out), "--model", str(tiny_model), "--tissue", str(mask)],
    )
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and message.startswith("Error: --tissue ")
    assert "2220 x 2967" in message and "2967 x 2220" in message and "mask.png" in message
    assert list(tmp_path.iterdir()) == [mask]  # no output, no lock file


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        ((2967, 2220), True),
        ((186, 139), True),
        ((23, 17), True),
        ((3, 2), True),
        ((2220, 2967), False),
        ((2967, 2967), False),
        ((186, 145), False),
        ((23, 19), False),
    ],
)
def test_masks_are_accepted_at_any_scale_of_the_slides_aspect(tmp_path, cmu_slide, shape, ok):
    """Within 2 % or one mask pixel of the slide's aspect: 186 x 139 is 1/16 (rounded), 23 x 17
    1/128; 186 x 145 is 4 % off, 23 x 19 two pixels."""
    mask = _mask_png(tmp_path / "mask.png", shape)
    with open_slide(cmu_slide) as reader:
        if ok:
            assert load_tissue_mask(mask, reader.info).shape == shape
        else:
            with pytest.raises(ConfigError, match=r"aspect ratios \(h / w\)"):
                load_tissue_mask(mask, reader.info)


def test_run_help_states_the_tissue_rules():
    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "side under 2048 px is all tissue" in text and "within 2 %" in text


def test_tissue_map_pickles_compactly_into_the_same_map(tmp_path):
    """The pool sends the map to every worker: the mask travels bit-packed and the summed-area
    table not at all (9 bytes a mask pixel before); the unpickled map answers ``any_in`` and
    ``render`` exactly as the original on every tile window of the slide."""
    slide = write_slide(tmp_path / "s.tif", (2100, 2100), tissue_fraction=0.3, patches=2, seed=4)
    with open_slide(slide) as reader:
        mask, how = auto_tissue(read_thumbnail(reader)[0], reader.info.shape)
    assert how.startswith("detected")
    tmap = TissueMap(mask, (2100, 2100))
    blob = pickle.dumps(tmap)
    assert len(blob) < mask.size / 8 + 1024
    back = pickle.loads(blob)
    assert "_sat" not in vars(back)  # built on the first any_in only
    np.testing.assert_array_equal(back.mask, tmap.mask)
    assert back.image_shape == (2100, 2100)
    boxes = [Box(y, x, 572, 572) for y in range(-92, 2100, 388) for x in range(-92, 2100, 388)]
    found = [tmap.any_in(b) for b in boxes]
    assert [back.any_in(b) for b in boxes] == found and 0 < sum(found) < len(boxes)
    for box in boxes:
        np.testing.assert_array_equal(back.render(box), tmap.render(box))
