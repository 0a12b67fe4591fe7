"""`tilesegment predict`: ordinary images in, plain mask/instance/probability/overlay files out,
equal to what `tilesegment run` computes for the same image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from PIL import Image

from tests.conftest import data_path
from tilesegment.cli import main
from tilesegment.cli.predict import Outputs, expand_images, plan_outputs
from tilesegment.errors import ConfigError

RUN = ("--tissue", "none", "--dtype", "float32", "--no-preview", "--no-progress")


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_arrays(image: Path, out: Path, *extra: object) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels/mask) of `tilesegment run IMAGE --tissue none --dtype float32`."""
    result = invoke("run", image, "-o", out, *RUN, *extra)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out), mode="r")
    return np.asarray(group["0"]), np.asarray(group["labels/mask/0"])


def write_png(path: Path, shape: tuple[int, int], seed: int) -> np.ndarray:
    """A random RGB PNG with smooth blobs (so that models find several regions)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (shape[0] // 16 + 1, shape[1] // 16 + 1, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.Resampling.BICUBIC))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture(scope="module")
def real_images() -> list[Path]:
    """A TNBC H&E PNG, a PH2 dermoscopy BMP (in PH2's own layout) and a DSB2018 RGBA PNG."""
    tnbc = data_path("tnbc", "images", "01_1.png")
    ph2 = data_path("ph2", "PH2 Dataset images", "IMD006", "IMD006_Dermoscopic_Image", "IMD006.bmp")
    dsb_id = "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552"
    dsb = data_path("dsb2018", "stage1_train", dsb_id, "images", f"{dsb_id}.png")
    return [tnbc, ph2, dsb]


def test_masks_of_real_images_equal_what_run_computes(real_images, tmp_path):
    out = tmp_path / "masks"
    result = invoke(
        "predict", *real_images, "-o", out, "--model", "nuclei-he", "--instances",
        "--probabilities", "--dtype", "float32", "--overlay", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 of 3 images written" in result.output
    for image in real_images:
        stem = image.stem
        shape = Image.open(image).size[::-1]
        probs, mask = run_arrays(image, tmp_path / f"{stem}.zarr", "--model", "nuclei-he")
        png = Image.open(out / f"{stem}.png")
        # nuclei-he: background, interior, boundary -> a palette PNG of class ids, as run's mask
        assert png.mode == "P" and png.size[::-1] == shape
        np.testing.assert_array_equal(np.asarray(png), mask)
        if image.parent.name == "images" and "tnbc" in image.parts:  # H&E: nuclei-he's domain
            assert 0 < (mask > 0).mean() < 1  # some nuclei, not all: the comparison means something
        tiff = tifffile.imread(out / f"{stem}.probabilities.tif")
        assert tiff.dtype == np.float32 and tiff.shape == (3, *shape)
        np.testing.assert_array_equal(tiff, probs)
        overlay = np.asarray(Image.open(out / f"{stem}.overlay.png"))
        assert overlay.shape == (*shape, 3) and overlay.dtype == np.uint8
        ids = tifffile.imread(out / f"{stem}.instances.tif")
        assert ids.dtype == np.uint16 and ids.shape == shape
        assert ((ids > 0) <= (mask > 0)).all() and ids.max() == len(np.unique(ids)) - 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial files left


def test_instances_equal_the_runs_exported_labels(real_images, tmp_path):
    from tilesegment.postprocess import postprocess_output

    image = real_images[0]
    result = invoke("predict", image, "-o", tmp_path, "--instances", "--no-progress")
    assert result.exit_code == 0, result.output
    run_arrays(image, tmp_path / "run.zarr")
    postprocess_output(tmp_path / "run.zarr")
    nuclei = np.asarray(zarr.open_group(str(tmp_path / "run.zarr"), mode="r")["labels/nuclei/0"])
    ids = tifffile.imread(tmp_path / f"{image.stem}.instances.tif")
    assert nuclei.max() > 10
    np.testing.assert_array_equal(ids, nuclei)


def test_multiclass_masks_are_palette_pngs_of_class_ids(tiny_model, tmp_path):
    from tilesegment.model.checkpoint import load_spec

    write_png(tmp_path / "in" / "a.png", (300, 260), seed=1)
    out = tmp_path / "out"
    result = invoke(
        "predict", tmp_path / "in", "-o", out, "--model", tiny_model, "--probabilities",
        "--precision", "fp32", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    probs, mask = run_arrays(tmp_path / "in" / "a.png", tmp_path / "a.zarr", "--model", tiny_model,
                             "--precision", "fp32")  # fmt: skip
    png = Image.open(out / "a.png")
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png), mask)
    assert mask.max() == 2 and len(np.unique(mask)) >= 2  # class ids, not 0/255
    colours = [c[:3] for c in load_spec(tiny_model).class_colours]
    assert [tuple(png.getpalette()[3 * k : 3 * k + 3]) for k in range(3)] == colours
    tiff = tifffile.imread(out / "a.probabilities.tif")  # default --dtype uint8, as `run`
    assert tiff.dtype == np.uint8 and tiff.shape == (3, 300, 260)
    np.testing.assert_array_equal(tiff, np.rint(probs * 255).astype(np.uint8))


def test_a_resampled_image_comes_back_to_its_own_grid(tmp_path):
    from tilesegment.io.resample import resample_array

    write_png(tmp_path / "b.png", (200, 152), seed=2)
    result = invoke("predict", tmp_path / "b.png", "-o", tmp_path / "out", "--mpp", "0.5",
                    "--probabilities", "--dtype", "float32", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    probs, _ = run_arrays(tmp_path / "b.png", tmp_path / "b.zarr", "--mpp", "0.5")
    assert probs.shape == (3, 400, 304)  # the run segments at nuclei-he's 0.25 um/px
    tiff = tifffile.imread(tmp_path / "out" / "b.probabilities.tif")
    assert tiff.shape == (3, 200, 152)
    back = resample_array(probs.transpose(1, 2, 0), (200, 152), 2.0).transpose(2, 0, 1)
    np.testing.assert_allclose(tiff, back, atol=1e-6)
    mask = np.asarray(Image.open(tmp_path / "out" / "b.png"))
    np.testing.assert_array_equal(mask, tiff.argmax(axis=0))


def test_resample_array_is_the_readers_kernel(tmp_path):
    from tilesegment.io import open_slide
    from tilesegment.io.resample import ResampledReader, resample_array

    pixels = write_png(tmp_path / "c.png", (97, 131), seed=3)
    for source_mpp, target_mpp in ((0.25, 0.5), (0.5, 0.3)):
        with open_slide(tmp_path / "c.png") as reader:
            view = ResampledReader(reader, 0, source_mpp=source_mpp, target_mpp=target_mpp)
            read = view.read_region(0, 0, 0, *view.info.shape)
        moved = resample_array(pixels, view.info.shape, view.scale)
        np.testing.assert_array_equal(read, np.clip(np.rint(moved), 0, 255).astype(np.uint8))


def test_bad_files_are_skipped_and_the_others_written(tiny_model, tmp_path, monkeypatch):
    import tilesegment.infer.image as image_module

    folder = tmp_path / "in"
    write_png(folder / "good.png", (120, 100), seed=4)
    write_png(folder / "sub" / "good2.png", (90, 130), seed=5)
    (folder / "text.png").write_text("not an image\n")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:200])
    loads = []
    real_load = image_module.load_checkpoint
    monkeypatch.setattr(
        image_module, "load_checkpoint", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    out = tmp_path / "out"
    result = invoke("predict", folder, "-o", out, "--model", tiny_model, "--overlay",
                    "--no-progress")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert len(loads) == 1  # the model is loaded once for the whole folder
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2
    assert str(folder / "text.png") in failed[0] and str(folder / "truncated.png") in failed[1]
    assert result.output.strip().splitlines()[-1].startswith("predict: 2 of 4 images written")
    assert sorted(p.name for p in out.iterdir()) == [
        "good.overlay.png", "good.png", "good2.overlay.png", "good2.png",
    ]  # fmt: skip
    assert Image.open(out / "good2.png").size == (130, 90)


def test_same_stem_in_two_folders_is_refused_before_anything_runs(tiny_model, tmp_path):
    write_png(tmp_path / "a" / "x.png", (64, 64), seed=6)
    write_png(tmp_path / "b" / "x.bmp", (64, 64), seed=7)
    out = tmp_path / "out"
    result = invoke("predict", tmp_path / "a", tmp_path / "b", "-o", out, "--model", tiny_model)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and "would all write" in message
    assert str(tmp_path / "a" / "x.png") in message and str(tmp_path / "b" / "x.bmp") in message
    assert not out.exists()


def test_names_are_checked_before_anything_is_read(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "sub" / "b.jpg"]
    outputs = Outputs(instances=True, probabilities=False, overlay=True, dtype="uint8")
    plans = plan_outputs(images, tmp_path / "o", outputs, overwrite=False)
    assert plans[1] == {
        ".png": tmp_path / "o" / "b.png",
        ".instances.tif": tmp_path / "o" / "b.instances.tif",
        ".overlay.png": tmp_path / "o" / "b.overlay.png",
    }
    with pytest.raises(ConfigError, match=r"a\.png is an input image and would be replaced"):
        plan_outputs(images, tmp_path, outputs, overwrite=True)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "b.overlay.png").touch()
    with pytest.raises(ConfigError, match=r"b\.overlay\.png already exists; pass --overwrite"):
        plan_outputs(images, tmp_path / "o", outputs, overwrite=False)
    assert plan_outputs(images, tmp_path / "o", outputs, overwrite=True) == plans


def test_folders_recurse_and_leave_out_the_output_and_hidden_files(tmp_path):
    for name in ("z.png", "a/b.BMP", "a/c.txt", ".hidden/d.png", "out/e.png", "f.tif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    got = expand_images((str(tmp_path), str(tmp_path / "z.png")), tmp_path / "out")
    assert [os.path.relpath(p, tmp_path) for p in got] == ["a/b.BMP", "f.tif", "z.png"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "read.me").touch()
    with pytest.raises(ConfigError, match=r"notes: no image files \(\.png, .*\) in this folder"):
        expand_images((str(tmp_path / "notes"),), tmp_path / "out")


def test_sigterm_stops_between_whole_files(tiny_model, tmp_path):
    import shutil
    import signal
    import time

    from tests.infer.conftest import start_cli

    folder = tmp_path / "in"
    write_png(folder / "i000.png", (200, 200), seed=8)
    for i in range(1, 150):
        shutil.copyfile(folder / "i000.png", folder / f"i{i:03d}.png")
    out = tmp_path / "out"
    proc = start_cli("predict", folder, "-o", out, "--model", tiny_model, "--no-progress")
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.glob("i*.png"))) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped at image" in err.splitlines()[-1]
    written = sorted(out.iterdir())
    assert 1 <= len(written) < 150 and not [p for p in written if p.name.startswith(".")]
    for path in written:  # every file there is whole
        assert np.asarray(Image.open(path)).shape == (200, 200)
