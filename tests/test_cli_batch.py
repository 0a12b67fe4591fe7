"""`tilesegment run` over many slides: arguments, globs and @lists, per-slide failures, resume,
Ctrl-C, and the refusals that happen before any slide is read."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import data_path
from tests.infer.conftest import start_cli, wait_for_records
from tilesegment.cli import main
from tilesegment.cli.batch import expand_slides, is_batch, plan_batch, read_list, slide_stem
from tilesegment.errors import ConfigError
from tilesegment.store import is_complete
from tilesegment.testing.synthetic import write_slide

FAST = ("--no-preview", "--no-progress")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A folder with two small synthetic slides, a.tif and b.tif (700 x 700 px)."""
    folder = tmp_path_factory.mktemp("slides")
    for seed, name in enumerate(("a", "b")):
        write_slide(folder / f"{name}.tif", (700, 700), mpp=0.25, seed=seed, tissue_fraction=0.5)
    return folder


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def err_lines(result) -> list[str]:
    return result.stderr.splitlines() if hasattr(result, "stderr") else result.output.splitlines()


# --------------------------------------------------------------------------- argument handling
def test_one_plain_path_is_a_single_run_and_anything_else_a_batch(tmp_path):
    (tmp_path / "x[1].svs").touch()
    assert not is_batch(["a.svs"])
    assert not is_batch([str(tmp_path / "x[1].svs")])  # exists as written: not a pattern
    assert is_batch(["a.svs", "b.svs"]) and is_batch(["@list.txt"])
    assert is_batch([str(tmp_path / "*.svs")])  # a glob, even if it matches one file


def test_stems():
    assert slide_stem("d/CMU-1.svs") == "CMU-1"
    assert slide_stem("d/x.ome.tiff") == "x" and slide_stem("d/y.OME.TIF") == "y"
    assert slide_stem("d/z.zarr") == "z" and slide_stem("noext") == "noext"


def test_globs_lists_and_duplicates_expand_in_order(tmp_path):
    for name in ("b.svs", "a.svs", "c.tif"):
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.svs").touch()
    listing = tmp_path / "list.txt"
    listing.write_text("# slides\nc.tif   # the TIFF\n\n  sub/*.svs\n/abs/missing.svs\n")
    assert read_list(listing) == [
        str(tmp_path / "c.tif"),
        str(tmp_path / "sub/*.svs"),
        "/abs/missing.svs",
    ]
    got = expand_slides([str(tmp_path / "*.svs"), f"@{listing}", str(tmp_path / "a.svs")])
    assert got == [
        tmp_path / "a.svs",
        tmp_path / "b.svs",
        tmp_path / "c.tif",
        tmp_path / "sub" / "d.svs",
        Path("/abs/missing.svs"),  # plain paths are kept: the run reports them
    ]
    assert len(expand_slides([str(tmp_path / "**" / "*.svs")])) == 3


def test_a_pattern_matching_nothing_or_an_unreadable_list_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"nope/\*\.svs: no file matches this pattern"):
        expand_slides([str(tmp_path / "nope" / "*.svs")])
    with pytest.raises(ConfigError, match=r"@.*missing\.txt: cannot read the slide list"):
        expand_slides([f"@{tmp_path / 'missing.txt'}"])
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="names no slides"):
        expand_slides([f"@{tmp_path / 'empty.txt'}"])


def test_plan_names_outputs_and_refuses_duplicate_stems(tmp_path):
    items = plan_batch([Path("d/a.svs"), Path("e/b.ome.tif")], tmp_path, tmp_path / "g")
    assert [(i.output, i.geojson) for i in items] == [
        (tmp_path / "a.zarr", tmp_path / "g" / "a.geojson"),
        (tmp_path / "b.zarr", tmp_path / "g" / "b.geojson"),
    ]
    with pytest.raises(ConfigError, match=r"d/a\.svs, e/a\.tif would all write .*a\.zarr"):
        plan_batch([Path("d/a.svs"), Path("e/a.tif")], tmp_path)


# --------------------------------------------------------------------------- the command
def test_duplicate_stems_are_refused_before_anything_runs(tmp_path, tiny_model, slides):
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "a.tif"
    twin.write_bytes((slides / "a.tif").read_bytes())
    out = tmp_path / "out"
    result = invoke("run", slides / "a.tif", twin, "-o", out, "--model", tiny_model)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and str(twin) in message and "would all write" in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("-o", "out.zarr"), "with several slides -o names a folder"),
        (("-o", "out", "--geojson", "x.geojson"), "--geojson names a folder"),
        (("-o", "out", "--tissue", "mask.png"), "one mask cannot serve several slides"),
    ],
)
def test_single_slide_paths_are_refused_in_a_batch(tmp_path, tiny_model, slides, extra, expected):
    (tmp_path / "mask.png").touch()
    extra = [tmp_path / x if i % 2 else x for i, x in enumerate(extra)]  # values in tmp_path
    result = invoke("run", slides / "a.tif", slides / "b.tif", "--model", tiny_model, *extra)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_bad_slides_are_reported_and_the_batch_goes_on(tmp_path, tiny_model, slides):
    broken, unreadable = data_path("bad", "broken.svs"), data_path("bad", "unreadable.svs")
    small = data_path("slides", "small.svs")
    out = tmp_path / "out"
    args = [slides / "a.tif", broken, unreadable, small, "-o", out, "--geojson", out]
    result = invoke("run", *args, "--model", tiny_model, *FAST)
    assert result.exit_code == 1, result.output
    lines = err_lines(result)
    failed = [line for line in lines if line.startswith("failed: ")]
    assert len(failed) == 2
    assert failed[0].startswith(f"failed: {broken}: ") and "not a readable slide" in failed[0]
    assert failed[1].startswith(f"failed: {unreadable}: ") and "corrupt" in failed[1]
    assert lines[-1] == f"batch: 2 succeeded, 2 failed: {broken}, {unreadable}"
    # The slides after the bad ones ran: every good output is complete, with its GeoJSON.
    for stem in ("a", "small"):
        assert is_complete(out / f"{stem}.zarr")
        doc = json.loads((out / f"{stem}.geojson").read_text())
        assert doc["type"] == "FeatureCollection"
    assert not is_complete(out / "unreadable.zarr") and not (out / "broken.zarr").exists()


def test_resume_skips_complete_outputs_without_running_them(tmp_path, tiny_model, slides):
    out = tmp_path / "out"
    first = invoke("run", str(slides / "*.tif"), "-o", out, "--model", tiny_model, *FAST)
    assert first.exit_code == 0, first.output
    assert err_lines(first)[-1] == "batch: 2 succeeded, 0 failed"
    reports = {p: p.stat().st_mtime_ns for p in out.glob("*.report.json")}
    assert len(reports) == 2
    # A list file naming one slide twice (once through a pattern) runs each slide once.
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{slides / 'b.tif'}\n{slides / '*.tif'}\n")
    t0 = time.perf_counter()
    again = invoke("run", f"@{listing}", "-o", out, "--model", tiny_model, "--resume", *FAST)
    assert again.exit_code == 0, again.output
    skipped = [line for line in err_lines(again) if line.endswith("already complete; skipped")]
    assert len(skipped) == 2 and time.perf_counter() - t0 < 5
    assert {p: p.stat().st_mtime_ns for p in reports} == reports  # nothing was rerun
    # Without --resume an existing output is a per-slide failure, not a crash of the batch.
    clash = invoke("run", str(slides / "*.tif"), "-o", out, "--model", tiny_model, *FAST)
    assert clash.exit_code == 1 and "--overwrite" in clash.output
    assert "batch: 0 succeeded, 2 failed" in clash.output


def test_a_single_match_of_a_pattern_is_written_into_the_folder(tmp_path, tiny_model, slides):
    out = tmp_path / "out"
    result = invoke("run", str(slides / "a.*"), "-o", out, "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.output
    assert is_complete(out / "a.zarr")


def test_ctrl_c_stops_the_whole_batch(tmp_path, tiny_model):
    for name in ("first", "second"):
        write_slide(tmp_path / f"{name}.tif", (2000, 2000), mpp=0.25, seed=1)
    out = tmp_path / "out"
    slides = [tmp_path / "first.tif", tmp_path / "second.tif"]
    proc = start_cli(
        "run", *slides, "-o", out, "--model", tiny_model, "--tissue", "none", "--tile-size", 236,
        *FAST,
    )  # fmt: skip
    wait_for_records(proc, out / "first.zarr", 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "batch stopped at slide 1 of 2: 0 succeeded, 0 failed, 2 not done" in err
    assert not is_complete(out / "first.zarr") and not (out / "second.zarr").exists()
