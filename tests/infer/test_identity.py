"""A run's slide is identified by content: ``--resume`` never mixes two slides of the same name
and size, a resumed batch never skips an output whose slide changed, and outputs recorded
before fingerprints existed still resume (issue 14, item 1)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_path
from tests.infer.conftest import (
    IN_PROCESS,
    RUN_ARGS,
    assert_identical,
    done_records,
    invoke,
    start_cli,
    store_files,
    wait_for_records,
)
from tilesegment.errors import ConfigError
from tilesegment.infer.identity import (
    BLOCK_BYTES,
    HEAD_BYTES,
    SAMPLES,
    WHOLE_FILE_BYTES,
    check_identity,
    identify,
)
from tilesegment.infer.options import RunOptions
from tilesegment.infer.run import run_slide
from tilesegment.store import is_complete
from tilesegment.store.layout import PARAMS_FILE, lock_path, report_path, state_dir

# ------------------------------------------------------------------------------- fingerprint


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path]:
    """``A/slide.tif`` and ``B/slide.tif``: uncompressed 2400² TIFFs, equal bytes, other pixels."""
    from tilesegment.testing.synthetic import write_slide

    root = tmp_path_factory.mktemp("twins")
    a, b = (root / k / "slide.tif" for k in "AB")
    for seed, path in enumerate((a, b), 1):
        path.parent.mkdir()
        write_slide(path, (2400, 2400), compression=None, tissue_fraction=0.8, patches=3, seed=seed)
    assert a.stat().st_size == b.stat().st_size
    return a, b


def test_equal_size_twins_differ_and_a_copy_with_another_mtime_does_not(twins, tmp_path):
    a, b = twins
    ia, ib = identify(a), identify(b)
    assert ia.size == ib.size > WHOLE_FILE_BYTES
    assert ia.fingerprint != ib.fingerprint
    assert ia.fingerprint.startswith("fp1:")
    copy = tmp_path / "slide.tif"
    shutil.copyfile(a, copy)
    os.utime(copy, (1e9, 1e9))
    ic = identify(copy)
    assert ic.fingerprint == ia.fingerprint and ic.mtime != ia.mtime
    # Head, 16 blocks, tail and the level-0 offsets/byte-counts table; not the 24 MB file.
    assert WHOLE_FILE_BYTES < ia.bytes_read < WHOLE_FILE_BYTES + 64 * 1024


def test_sampled_bytes_count_and_small_files_are_hashed_whole(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "raw.bin"
    data = bytearray(rng.integers(0, 256, 5 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    base = identify(path)
    assert base.bytes_read == HEAD_BYTES + (SAMPLES + 1) * BLOCK_BYTES  # not a TIFF: no table

    def flipped(offset: int) -> str | None:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(changed)
        return identify(path).fingerprint

    assert flipped(10) != base.fingerprint  # the head
    assert flipped(len(data) - 1) != base.fingerprint  # the tail
    assert flipped(HEAD_BYTES + 5) != base.fingerprint  # the first sampled block
    # The stated limit: a byte between sampled blocks is not seen.
    assert flipped(HEAD_BYTES + BLOCK_BYTES + 5) == base.fingerprint
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(data[:WHOLE_FILE_BYTES]))
    before = identify(small)
    assert before.bytes_read == WHOLE_FILE_BYTES
    middle = bytearray(data[:WHOLE_FILE_BYTES])
    middle[HEAD_BYTES + BLOCK_BYTES + 5] ^= 0xFF  # unseen in a large file, seen in a small one
    small.write_bytes(middle)
    assert identify(small).fingerprint != before.fingerprint


def test_a_5_gb_svs_costs_the_same_few_reads(tmp_path):
    """A real SVS header stretched (sparsely) to 5 GiB: about 2 MiB is read, not 5 GiB."""
    big = tmp_path / "big.svs"
    shutil.copyfile(data_path("slides", "CMU-1-Small-Region.svs"), big)
    os.truncate(big, 5 << 30)
    ident = identify(big)
    assert ident.size == 5 << 30
    table = ident.bytes_read - WHOLE_FILE_BYTES
    assert 0 < table < 64 * 1024  # the level-0 offsets and byte counts were hashed too


def test_identity_check_names_both_slides_and_accepts_old_records(twins, tmp_path, caplog):
    a, b = twins
    out = tmp_path / "o.zarr"
    stored = identify(a).params()
    check_identity(stored, identify(a), output=out, stored_path=str(a))
    with pytest.raises(ConfigError, match=r"differs in content; give the original") as info:
        check_identity(stored, identify(b), output=out, stored_path=str(a))
    message = str(info.value)
    assert "\n" not in message and str(a) in message and str(b) in message
    assert "--overwrite" in message
    # A record written before fingerprints: name and size decide, with a warning.
    old = {k: v for k, v in stored.items() if k != "slide_fingerprint"}
    with caplog.at_level(logging.WARNING):
        check_identity(old, identify(b), output=out)
    assert "could not be verified by content" in caplog.text
    with pytest.raises(ConfigError, match=r"differs in size"):
        check_identity({**old, "slide_bytes": 5}, identify(b), output=out)
    # The mtime is a hint: a touched slide with the same content resumes, with a note.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tilesegment.infer.identity"):
        check_identity(stored, identify(a), output=out, stored_mtime="2000-01-01T00:00:00")
    assert "content fingerprint is unchanged" in caplog.text
    # A directory (a Zarr slide) is never read: matched by name, with the warning.
    folder = identify(tmp_path)
    assert folder.size is None and folder.fingerprint is None and folder.bytes_read == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_identity(folder.params(), folder, output=out)
    assert "not a regular file has no fingerprint" in caplog.text


# -------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def clean_a(tiny_model, twins, tmp_path_factory) -> Path:
    """An uninterrupted in-process run of ``A/slide.tif`` (the CLI runs' options)."""
    out = tmp_path_factory.mktemp("clean") / "out.zarr"
    opts = RunOptions(tile_size=572, workers=1, preview=False, progress=False)
    run_slide(twins[0], out, tiny_model, opts)
    assert done_records(out) >= 4
    return out


def _killed_run(slide: Path, out: Path, model: Path, clean: Path) -> int:
    """Run ``slide`` into ``out`` from the command line and SIGKILL it mid-way; records left."""
    proc = start_cli("run", slide, "-o", out, "--model", model, *RUN_ARGS, *IN_PROCESS)
    wait_for_records(proc, out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_complete(out)
    recorded = done_records(out)
    assert 2 <= recorded < done_records(clean)
    return recorded


def test_resume_with_the_other_twin_is_refused_and_the_right_one_finishes(
    tiny_model, twins, clean_a, tmp_path
):
    a, b = twins
    out = tmp_path / "out.zarr"
    recorded = _killed_run(a, out, tiny_model, clean_a)
    refused = invoke("run", b, "-o", out, "--model", tiny_model, "--resume", *RUN_ARGS, *IN_PROCESS)
    assert refused.exit_code == 2
    message = refused.output.strip()
    assert "\n" not in message and message.startswith(f"Error: cannot resume {out}")
    assert f"started from {a.resolve()} (" in message and f"given now, {b} (" in message
    assert "differs in content" in message and "--overwrite" in message
    assert done_records(out) == recorded and not is_complete(out)
    assert not lock_path(out).exists()
    resumed = invoke("run", a, "-o", out, "--model", tiny_model, "--resume", *RUN_ARGS, *IN_PROCESS)
    assert resumed.exit_code == 0, resumed.output
    assert_identical(out, clean_a)
    report = json.loads(report_path(out).read_text())
    assert report["params"]["slide_fingerprint"] == identify(a).fingerprint


def _drop_fingerprint(output: Path) -> None:
    """Rewrite the run record as tilesegment wrote it before fingerprints existed."""
    path = state_dir(output) / PARAMS_FILE
    doc = json.loads(path.read_text())
    del doc["params"]["slide_fingerprint"]
    del doc["info"]["slide_mtime"]
    path.write_text(json.dumps(doc))


def test_an_output_recorded_without_fingerprint_still_resumes(
    tiny_model, twins, clean_a, tmp_path, caplog
):
    out = tmp_path / "out.zarr"
    _killed_run(twins[0], out, tiny_model, clean_a)
    _drop_fingerprint(out)
    with caplog.at_level(logging.WARNING):
        result = invoke(
            "run", twins[0], "-o", out, "--model", tiny_model, "--resume", *RUN_ARGS, *IN_PROCESS
        )
    assert result.exit_code == 0, result.output
    assert "could not be verified by content" in caplog.text
    assert_identical(out, clean_a)


def test_batch_resume_skips_only_the_recorded_slide(tiny_model, twins, clean_a, tmp_path, caplog):
    a, b = twins
    outdir = tmp_path / "outs"
    outdir.mkdir()
    out = outdir / "slide.zarr"
    shutil.copytree(clean_a, out)
    shutil.copytree(state_dir(clean_a), state_dir(out))  # the run record lives beside the store
    before = store_files(out)
    args = ("-o", outdir, "--model", tiny_model, "--resume", *RUN_ARGS, *IN_PROCESS)
    same = invoke("run", a.parent / "*.tif", *args)
    assert same.exit_code == 0, same.output
    assert f"{out} was already complete; skipped" in same.output
    other = invoke("run", b.parent / "*.tif", *args)
    assert other.exit_code == 1, other.output
    assert "skipped" not in other.output
    failed = [line for line in other.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "differs in content" in failed[0]
    assert str(a.resolve()) in failed[0] and str(b) in failed[0]
    assert is_complete(out) and store_files(out) == before
    # An output recorded before fingerprints existed is matched by name and size, and says so.
    _drop_fingerprint(out)
    with caplog.at_level(logging.WARNING):
        old = invoke("run", b.parent / "*.tif", *args)
    assert old.exit_code == 0 and "already complete; skipped" in old.output
    assert "could not be verified by content" in caplog.text
