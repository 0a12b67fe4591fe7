"""The command line: info, model init, run, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from tests.conftest import data_path
from tilesegment.cli import main
from tilesegment.store import is_complete


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "tiny"
    result = CliRunner().invoke(
        main, ["model", "init", str(path), "--base-channels", "2", "--depth", "3", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "halo 44 px" in result.output
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version_and_help():
    assert invoke("--version").output.startswith("tilesegment, version")
    out = invoke("run", "--help").output
    for flag in ("--tile-size", "--batch-size", "--level", "--overwrite", "--model", "-o"):
        assert flag in out


def test_info_text_and_json(cmu_slide):
    text = invoke("info", cmu_slide)
    assert text.exit_code == 0
    assert "aperio" in text.output and "2967 x 2220" in text.output
    doc = json.loads(invoke("info", cmu_slide, "--json").output)
    assert doc["levels"][0] == {"level": 0, "height": 2967, "width": 2220, "downsample": 1.0}
    assert doc["mpp"] == pytest.approx([0.499, 0.499])
    assert doc["backend"] == "openslide" and doc["channels"] == 3


def test_model_init_refuses_to_overwrite(model):
    result = invoke("model", "init", model)
    assert result.exit_code == 2
    assert "already exists" in result.output


def test_run_small_slide(model, tmp_path):
    slide = data_path("slides", "small.svs")
    out = tmp_path / "small.zarr"
    result = invoke("run", slide, "-o", out, "--model", model, "--no-progress")
    assert result.exit_code == 0, result.output
    assert is_complete(out)
    assert zarr.open_group(out, mode="r")["0"].shape == (2, 16, 16)
    # A second run into the same output is refused, then allowed with --overwrite.
    again = invoke("run", slide, "-o", out, "--model", model, "--no-progress")
    assert again.exit_code == 2 and "--overwrite" in again.output
    forced = invoke("run", slide, "-o", out, "--model", model, "--no-progress", "--overwrite")
    assert forced.exit_code == 0, forced.output


def test_invalid_tile_size_names_the_nearest_valid(model, tmp_path):
    slide = data_path("slides", "small.svs")
    out = tmp_path / "o.zarr"
    result = invoke("run", slide, "-o", out, "--model", model, "--tile-size", 101)
    assert result.exit_code == 2
    assert "--tile-size 101 px is not valid" in result.output
    assert "nearest valid: 100 or 108" in result.output
    assert not out.exists()


def test_valid_but_too_small_tile_size_is_refused(tmp_path):
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint

    spec = ModelSpec.default(UNetConfig(depth=4, base_channels=2), name="d4")
    save_checkpoint(new_model(spec, seed=0), spec, tmp_path / "d4")
    out = tmp_path / "o.zarr"
    slide = data_path("slides", "small.svs")
    # 188 is a valid depth-4 input, but its 4 px output cannot advance on the 16 px grid.
    result = invoke("run", slide, "-o", out, "--model", tmp_path / "d4", "--tile-size", 188)
    assert result.exit_code == 2, result.output
    assert "--tile-size 188 px leaves a 4 px output" in result.output
    assert "use at least 204" in result.output
    assert not out.exists()


def _zero_size_zarr(tmp_path: Path) -> Path:
    path = tmp_path / "empty.zarr"
    zarr.create_array(path, shape=(0, 10, 3), dtype="uint8", chunks=(1, 10, 3))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "not a tiff": lambda tmp: data_path("bad", "broken.svs"),
    "unsupported compression": lambda tmp: data_path("bad", "unopenable.tiff"),
    "missing path": lambda tmp: tmp / "nope.svs",
    "empty file": lambda tmp: _write(tmp / "empty.svs", b""),
    "text file": lambda tmp: _write(tmp / "notes.tif", b"hello\n" * 50),
    "zero-size image": _zero_size_zarr,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["info", "run"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, command, model, tmp_path):
    slide = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "out.zarr"
    args = ["info", slide] if command == "info" else ["run", slide, "-o", out, "--model", model]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("Error: ")
    assert "\n" not in message, message
    assert Path(slide).name in message
    assert not out.exists()


def test_corrupt_tiles_fail_before_any_output_is_written(model, tmp_path):
    """The tissue thumbnail is read first, so corrupt tiles stop the run before the output."""
    slide = data_path("bad", "unreadable.svs")
    out = tmp_path / "out.zarr"
    result = invoke("run", slide, "-o", out, "--model", model, "--no-progress")
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and "unreadable.svs" in message
    assert not out.exists()


def test_corrupt_tiles_mid_run_leave_an_incomplete_output(model, tmp_path):
    slide = data_path("bad", "unreadable.svs")
    out = tmp_path / "out.zarr"
    args = ["run", slide, "-o", out, "--model", model, "--tissue", "none", "--no-preview"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and "unreadable.svs" in message
    assert f"{out} was left incomplete" in message
    # A corrupt slide fails the same way again: no advice to --resume (exit 2, see the README).
    assert "--resume" not in message and "running it again will fail the same way" in message
    assert not is_complete(out)
    # OME-Zarr readers do not see an image there.
    assert "multiscales" not in zarr.open_group(out, mode="r").attrs


def test_console_script_exit_code(tmp_path):
    """The installed entry point maps errors to exit codes the same way."""
    proc = subprocess.run(
        [sys.executable, "-m", "tilesegment", "info", str(tmp_path / "missing.svs")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "missing.svs" in proc.stderr and proc.stderr.count("\n") == 1


def test_run_rejects_an_out_of_range_level(model, tmp_path):
    slide = data_path("slides", "small.svs")
    result = invoke("run", slide, "-o", tmp_path / "o.zarr", "--model", model, "--level", 3)
    assert result.exit_code == 2
    assert "--level 3 out of range" in result.output
    assert not (tmp_path / "o.zarr").exists()


def test_tiny_image_smaller_than_the_halo(model, tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    png = tmp_path / "tiny.png"
    Image.fromarray(pixels).save(png)
    out = tmp_path / "tiny.zarr"
    result = invoke("run", png, "-o", out, "--model", model, "--no-progress")
    assert result.exit_code == 0, result.output
    assert zarr.open_group(out, mode="r")["labels/mask/0"].shape == (7, 5)


def test_resume_of_a_complete_output_still_writes_the_missing_geojson(model, tmp_path):
    import json

    slide = data_path("slides", "small.svs")
    out, geojson = tmp_path / "o.zarr", tmp_path / "o.geojson"
    first = invoke("run", slide, "-o", out, "--model", model, "--no-preview", "--no-progress")
    assert first.exit_code == 0, first.output
    assert not geojson.exists()
    again = invoke(
        "run", slide, "-o", out, "--model", model, "--resume", "--geojson", geojson, "--no-progress"
    )
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output
    assert json.loads(geojson.read_text())["type"] == "FeatureCollection"


def _options(command, prefix=()):
    """(command path, option) for every option of every command of the group."""
    import click

    for param in command.params:
        if isinstance(param, click.Option):
            yield " ".join(prefix), param
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options(sub, (*prefix, name))


def test_an_option_means_the_same_thing_on_every_command():
    from tilesegment.cli.options import model_option

    by_name: dict[str, list] = {}
    for where, opt in _options(main):
        for flag in opt.opts:
            by_name.setdefault(flag, []).append((where, opt))
    # --model resolves shipped names wherever it is taken (run and evaluate alike).
    models = by_name["--model"]
    assert {w for w, _ in models} >= {"run", "evaluate"}
    resolver = model_option()(lambda: None).__click_params__[0].callback
    assert all(o.callback.__code__ is resolver.__code__ for _, o in models)
    # One help text per option name (run's --device adds how to give several devices).
    for flag in ("--model", "--threads", "--progress", "--json", "--workers", "--device", "--tta"):
        helps = {o.help.split(" A comma-separated list")[0] for _, o in by_name.get(flag, [])}
        assert len(helps) <= 1, (flag, helps)
    # Test-time augmentation wherever a model predicts for the user.
    assert sorted(w for w, _ in by_name["--tta"]) == ["evaluate", "predict", "run"]
    # --workers is worker processes; the DataLoader's workers have their own name.
    assert [w for w, _ in by_name["--workers"]] == ["run"]
    assert [w for w, _ in by_name["--loader-workers"]] == ["train"]
    # --precision auto means the inference choice wherever inference runs.
    for where, opt in by_name["--precision"]:
        assert ("auto" in opt.type.choices) == (where in ("run", "predict", "evaluate")), where
