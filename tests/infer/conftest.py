"""Shared fixtures for the run-executor tests: a tiny model, a synthetic slide, a seeded model
with interior/boundary classes and crops of the real CMU-1-Small-Region, subprocess runs of
the real command line, and a byte-for-byte comparison of two outputs."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from tilesegment.instances import InstanceSpec
from tilesegment.store.layout import DONE_LOG, state_dir

#: Options every run in these tests shares (the output must not depend on anything else).
RUN_ARGS = ("--tile-size", "572", "--no-preview", "--no-progress")
#: In-process, as the references these runs are compared with (``--workers auto`` also runs
#: slides this small in-process, but the number of torch threads may round a value by 1).
IN_PROCESS = ("--workers", "1")

#: The seeded growth the seeded model declares.
SEEDED_SPEC = InstanceSpec(max_growth_px=6, min_seed_px=4)


@pytest.fixture(scope="session")
def seeded_model(tmp_path_factory) -> Path:
    """A random 3-class U-Net declaring seeded instances (:data:`SEEDED_SPEC`); its weights
    (seed 8) give ~40 % interior and ~40 % boundary on H&E."""
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint

    spec = ModelSpec.default(UNetConfig(depth=4, base_channels=4, classes=3), name="seeded")
    spec = dataclasses.replace(spec, instances=SEEDED_SPEC)
    path = tmp_path_factory.mktemp("model") / "seeded"
    save_checkpoint(new_model(spec, seed=8), spec, path)
    return path


def write_cmu_crop(path: Path, h: int, w: int) -> np.ndarray:
    """Write the (h, w) px of CMU-1-Small-Region from (1100, 700) as a tiled TIFF at ``path``;
    its pixels."""
    import tifffile

    from tests.conftest import data_path
    from tilesegment.io import open_slide

    with open_slide(data_path("slides", "CMU-1-Small-Region.svs")) as reader:
        pixels = reader.read_region(0, 1100, 700, h, w)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    return pixels


@pytest.fixture(scope="session")
def slide(tmp_path_factory) -> Path:
    """A 3000 x 3000 px pyramidal JPEG TIFF, 70 % tissue: 64 tiles of 572 px, a few skipped."""
    from tilesegment.testing.synthetic import write_slide

    path = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    return write_slide(path, (3000, 3000), tissue_fraction=0.7, patches=3, seed=4)


def invoke(*args: object):
    """Run ``tilesegment ARGS`` in this process (no interpreter start-up); a click Result."""
    from click.testing import CliRunner

    from tilesegment.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "tilesegment", *(str(a) for a in args)]


def run_cli(*args: object, env: dict[str, str] | None = None, timeout: float = 120):
    """Run ``tilesegment ARGS`` to completion in a child process."""
    return subprocess.run(
        cli(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def start_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cli(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def done_records(output: Path) -> int:
    try:
        return (state_dir(output) / DONE_LOG).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_records(proc: subprocess.Popen, output: Path, n: int, timeout: float = 60) -> int:
    """Poll the done log until it holds ``n`` records; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = done_records(output)
        if count >= n:
            return count
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {n} records: {err}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    pytest.fail(f"no {n} done records within {timeout} s")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant process of ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in pids if (f := _stat(p)) is not None and f[0] != "Z"]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of an output store (the run report and the resume state live beside it)."""
    files = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file():
            files[rel] = f.read_bytes()
    return files


def assert_identical(got: Path, expected: Path) -> None:
    """Every array (all pyramid levels and labels) equal, and every file byte-identical.

    Compare outputs of the same file name: the OMERO metadata records it.
    """
    assert got.name == expected.name
    a, b = zarr.open_group(got, mode="r"), zarr.open_group(expected, mode="r")
    with warnings.catch_warnings():  # zarr notes the report and resume state are no arrays
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        arrays = [k for k, v in b.members(max_depth=None) if isinstance(v, zarr.Array)]
    assert any(k.startswith("labels/") for k in arrays) and "1" in arrays
    for key in arrays:
        x, y = a[key][:], b[key][:]
        assert x.shape == y.shape, key
        diff = int(np.count_nonzero(x != y))
        assert diff == 0, f"{key}: {diff} values differ"
    fa, fb = store_files(got), store_files(expected)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []
