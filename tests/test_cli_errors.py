"""The one-line contract on the command line: outputs that cannot be written (under a regular
file, read-only, a full disk), destinations checked before the first tile, and the exit codes
and messages of a broken model and a foreign checkpoint file (a corrupt slide: test_cli.py).

Exit codes asserted here (the README's contract): 2 for input that running again cannot fix,
1 for a failure during the run that it can (a full disk: free space, then --resume).
Read-only and full filesystems are real tmpfs mounts, so those tests need root and ``mount``;
they skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from tests.conftest import ROOT, data_path
from tests.infer.conftest import run_cli
from tilesegment.cli import main
from tilesegment.store import is_complete

FAST = ("--no-progress", "--no-preview")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A depth-3 model with 2 base channels (fast)."""
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint

    spec = ModelSpec.default(UNetConfig(depth=3, base_channels=2), name="tiny3")
    path = tmp_path_factory.mktemp("m") / "tiny3"
    save_checkpoint(new_model(spec, seed=1), spec, path)
    return path


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code: int) -> str:
    """The single 'Error: ...' line of a failed command, after checking its exit code."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    """A real tmpfs mounted at ``path`` for the block; skips the test where that is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (read-only and full filesystems are real mounts)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


# ------------------------------------------------------------------ outputs that cannot be written


def test_output_under_a_regular_file_is_one_line_exit_2(model, tmp_path):
    slide = data_path("slides", "small.svs")
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a folder\n")
    line = one_line_error(invoke("run", slide, "-o", blocker / "out.zarr", "--model", model), 2)
    assert f"-o {blocker / 'out.zarr'}" in line and f"{blocker} is a file, not a folder" in line
    assert blocker.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt"]


def test_destinations_are_checked_before_the_first_tile(model, tmp_path):
    """A bad --geojson stops the run before the output exists; a good one gets its folders."""
    slide = data_path("slides", "small.svs")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = tmp_path / "out.zarr"
    args = ("run", slide, "-o", out, "--model", model, *FAST)
    line = one_line_error(invoke(*args, "--geojson", blocker / "x.geojson"), 2)
    assert "--geojson" in line and "is a file, not a folder" in line
    assert not out.exists()  # refused before anything was computed or written
    geojson = tmp_path / "new" / "deeper" / "x.geojson"
    result = invoke(*args, "--geojson", geojson)
    assert result.exit_code == 0, result.output
    assert is_complete(out) and geojson.is_file()


def test_export_checks_its_destinations_before_labelling(model, tmp_path):
    slide = data_path("slides", "small.svs")
    out = tmp_path / "out.zarr"
    assert invoke("run", slide, "-o", out, "--model", model, *FAST).exit_code == 0
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    line = one_line_error(invoke("export", out, "--table", blocker / "t.csv"), 2)
    assert f"--table {blocker / 't.csv'}" in line and "is a file, not a folder" in line
    assert "nuclei" not in zarr.open_group(out, mode="r")["labels"]  # nothing was labelled


def test_read_only_output_and_geojson_are_one_line_exit_2(model, tmp_path):
    slide = data_path("slides", "small.svs")
    with tmpfs(tmp_path / "ro", "size=1m", "ro") as ro:
        line = one_line_error(invoke("run", slide, "-o", ro / "out.zarr", "--model", model), 2)
        assert f"-o {ro / 'out.zarr'}: cannot write in {ro}" in line
        assert "Read-only file system" in line and "choose a writable folder" in line
        out = tmp_path / "out.zarr"
        result = invoke(
            "run", slide, "-o", out, "--model", model, "--geojson", ro / "x.geojson", *FAST
        )
        line = one_line_error(result, 2)
        assert f"--geojson {ro / 'x.geojson'}" in line and "choose a writable folder" in line
        assert not out.exists()
        assert list(ro.iterdir()) == []


@pytest.fixture(scope="module")
def cmu_reference(model, tmp_path_factory) -> Path:
    """The real CMU slide segmented without trouble (35 tiles, a few seconds)."""
    out = tmp_path_factory.mktemp("ref") / "out.zarr"
    slide = data_path("slides", "CMU-1-Small-Region.svs")
    result = invoke("run", slide, "-o", out, "--model", model, *FAST)
    assert result.exit_code == 0, result.output
    return out


def assert_same_arrays(got: Path, expected: Path) -> None:
    a, b = zarr.open_group(got, mode="r"), zarr.open_group(expected, mode="r")
    for key in ("0", "1", "labels/mask/0", "labels/tissue/0"):
        assert np.array_equal(a[key][:], b[key][:]), key


@pytest.mark.parametrize(
    "pool",
    [("--workers", "1"), ("--workers", "2"), ("--dask-workers", "2")],
    ids=["in-process", "pool", "dask"],
)
def test_full_disk_is_one_line_exit_1_then_resumes(model, cmu_reference, tmp_path, pool):
    """A disk that fills mid-run: one line with the fix, no completion marker; after freeing
    space (growing the tmpfs) --resume completes the same output as an untroubled run.

    A child process with a timeout: before the fix, the pool retried and respawned its workers
    on the full disk for over 13 minutes (and the dask path retried each unit 3 times, then
    reported failed tiles)."""
    dask = pool[0] == "--dask-workers"
    if dask:
        pytest.importorskip("distributed", reason="the dask path needs tilesegment[cluster]")
    slide = data_path("slides", "CMU-1-Small-Region.svs")
    with tmpfs(tmp_path / "small", "size=2m") as small:
        out = small / "out.zarr"
        args = ("run", slide, "-o", out, "--model", model, *FAST, *pool)
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 1, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        # (dask's workers logged the failed task with its traceback before the error line)
        assert line.startswith("Error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert "Compute Failed" not in proc.stderr, proc.stderr
        assert f"{out}: no space left on device" in line
        assert "free space, then run it again with --resume" in line
        assert "tiles failed" not in line  # a pool stops at once instead of retrying
        # The other worker is stopped, not killed: a killed worker leaves its Blosc semaphore
        # to multiprocessing's resource tracker, which warned after the error line.
        assert "killing worker" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
        assert not is_complete(out)
        remount(small, "size=64m")
        result = invoke(*args, "--resume")
        assert result.exit_code == 0, result.output
        assert is_complete(out)
        assert_same_arrays(out, cmu_reference)


# ------------------------------------------------------------------ messages about the input


def test_nan_weights_are_refused_before_any_output(model, tmp_path):
    from tilesegment.model import load_checkpoint, save_checkpoint

    net, spec = load_checkpoint(model)
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")
    save_checkpoint(net, spec, tmp_path / "broken")  # a consistent pair, hash and all
    out = tmp_path / "out.zarr"
    slide = data_path("slides", "small.svs")
    line = one_line_error(invoke("run", slide, "-o", out, "--model", tmp_path / "broken"), 2)
    assert "broken.safetensors" in line and "hold NaN or inf values" in line
    assert "the checkpoint is broken" in line and "logits" not in line
    assert not out.exists()


def test_a_model_that_outputs_inf_is_named_not_the_store(model, tmp_path):
    """Finite weights that overflow: the run stops with the model's name, not with the
    store's developer message about softmax outputs."""
    from tilesegment.model import load_checkpoint, save_checkpoint

    net, spec = load_checkpoint(model)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1e30)  # finite, but the activations overflow to inf
    save_checkpoint(net, spec, tmp_path / "overflow")
    out = tmp_path / "out.zarr"
    slide = data_path("slides", "small.svs")
    result = invoke("run", slide, "-o", out, "--model", tmp_path / "overflow", *FAST)
    line = one_line_error(result, 2)
    assert "model 'tiny3' produced NaN or inf values" in line
    assert "checkpoint is broken" in line and "logits" not in line
    assert "--resume" not in line and not is_complete(out)


def test_a_pickle_checkpoint_is_named_and_the_readme_conversion_works(model, tmp_path):
    from tilesegment.model import load_checkpoint

    net, _ = load_checkpoint(model)
    pt = tmp_path / "model.pt"
    torch.save(net.state_dict(), pt)
    slide = data_path("slides", "small.svs")
    out = tmp_path / "out.zarr"
    line = one_line_error(invoke("run", slide, "-o", out, "--model", pt), 2)
    assert f"{pt}: not a tilesegment checkpoint (a torch.save file" in line
    assert "no such model" not in line and "Converting a PyTorch checkpoint" in line
    # The README's recipe, run as written (with this model's architecture).
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Converting a PyTorch checkpoint") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("depth=4, base_channels=64", "depth=3, base_channels=2")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    converted, _ = load_checkpoint(tmp_path / "converted")
    for (k, a), (_, b) in zip(
        converted.state_dict().items(), net.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    result = invoke("run", slide, "-o", out, "--model", tmp_path / "converted.json", *FAST)
    assert result.exit_code == 0, result.output


def test_write_failures_are_told_apart_from_unreadable_inputs(tmp_path):
    """Which errors count as "cannot write the output": a slide that cannot be read in the
    output's own folder is not one of them (as root, permissions cannot make a real case)."""
    import errno

    from tilesegment.errors import SlideReadError, StoreError
    from tilesegment.store.destinations import write_failure

    out = tmp_path / "slide.zarr"
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "slide.svs"))
    try:
        raise SlideReadError(f"{tmp_path / 'slide.svs'}: cannot open") from denied
    except SlideReadError as exc:
        assert write_failure(exc, out) is None
    lock = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".slide.zarr.lock"))
    assert write_failure(lock, out) == (
        "not writable",
        f"{out}: cannot write ({tmp_path / '.slide.zarr.lock'}): Permission denied",
    )
    elsewhere = PermissionError(errno.EACCES, "Permission denied", "/etc/elsewhere")
    assert write_failure(elsewhere, out) is None
    try:
        raise StoreError("cannot record finished chunks") from OSError(errno.ENOSPC, "full")
    except StoreError as exc:
        assert write_failure(exc, out) == ("no space", f"{out}: no space left on device")
    assert write_failure(ValueError("unrelated"), out) is None
