"""Resume after a crash: the durable done log, the run lock, and real killed runs resumed into
outputs byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infer.conftest import (
    IN_PROCESS,
    RUN_ARGS,
    assert_identical,
    done_records,
    invoke,
    start_cli,
    wait_for_records,
)
from tilesegment.errors import ConfigError, StoreError
from tilesegment.infer.options import RunOptions
from tilesegment.infer.run import run_slide
from tilesegment.store import is_complete
from tilesegment.store.layout import DONE_LOG, report_path, state_dir
from tilesegment.store.resume import DoneLog, RunLock, check_params, lock_path, read_done

# ------------------------------------------------------------------------------- unit level


def test_done_log_records_survive_reopening_and_a_torn_tail(tmp_path):
    out = tmp_path / "o.zarr"
    data = tmp_path / "chunk"
    data.write_bytes(b"x" * 100)
    committed = []
    with DoneLog(out, interval_s=0.05, on_commit=committed.extend) as log:
        log.add((0, 1), [data, tmp_path / "absent"])  # absent files (empty chunks) are fine
        log.add((2, 3))
        log.flush()
        assert log.done == {(0, 1), (2, 3)}
    assert sorted(committed) == [(0, 1), (2, 3)]
    path = state_dir(out) / DONE_LOG
    # A crash mid-append leaves a record without its newline: dropped, and cut off the file
    # so that the next record starts on its own line.
    with path.open("ab") as fh:
        fh.write(b"4 ")
    assert read_done(path) == {(0, 1), (2, 3)}
    with DoneLog(out, interval_s=0.05) as log:
        assert log.done == {(0, 1), (2, 3)}
        log.add((4, 5))
    assert path.read_text() == "0 1\n2 3\n4 5\n"


def test_done_log_rejects_a_corrupt_record(tmp_path):
    path = state_dir(tmp_path) / DONE_LOG
    path.parent.mkdir(parents=True)
    path.write_text("0 1\nnot a record\n")
    with pytest.raises(StoreError, match=r"done.log:2: malformed record"):
        read_done(path)


def test_params_mismatch_names_every_difference(tmp_path):
    stored = {"tile_size": [572, 572], "model_sha256": "aa", "tissue": "auto"}
    check_params(stored, dict(stored), output=tmp_path)
    current = {**stored, "tile_size": (252, 252), "model_sha256": "bb"}
    with pytest.raises(ConfigError, match=r"model_sha256 'aa' -> 'bb'; tile_size") as info:
        check_params(stored, current, output=tmp_path)
    assert "\n" not in str(info.value) and "--overwrite" in str(info.value)


def _lock_doc(pid: int, host: str) -> str:
    return json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00+00:00"})


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    out = tmp_path / "o.zarr"
    lock_path(out).write_text(_lock_doc(pid, socket.gethostname()))
    with caplog.at_level(logging.WARNING), RunLock(out) as lock:
        assert lock.previous is not None and lock.previous.pid == pid
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert f"pid {pid}" in caplog.text and "stale" in caplog.text
    assert not lock_path(out).exists()


def test_lock_of_another_host_is_not_guessed_stale(tmp_path):
    out = tmp_path / "o.zarr"
    lock_path(out).write_text(_lock_doc(12345, "elsewhere"))
    with pytest.raises(StoreError, match=r"pid 12345 on host elsewhere.*delete .*o.zarr.lock"):
        RunLock(out).acquire()


def test_lock_held_by_a_live_process_is_refused(tmp_path):
    out = tmp_path / "o.zarr"
    code = (
        "import sys, time; from tilesegment.store.resume import RunLock; "
        f"l = RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the holder's flock with the process: the lock is now stale.
    with RunLock(out) as lock:
        assert lock.previous is not None and lock.previous.pid == holder.pid


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def clean(tiny_model, slide, tmp_path_factory) -> Path:
    """The reference: one uninterrupted in-process run (same options as the CLI runs)."""
    out = tmp_path_factory.mktemp("clean") / "out.zarr"
    opts = RunOptions(tile_size=572, workers=1, preview=False, progress=False)
    summary = run_slide(slide, out, tiny_model, opts)
    assert 0 < summary.extra["tiles_skipped"] < 32
    return out


def test_sigkill_at_any_moment_then_resume_is_bit_identical(
    tiny_model, slide, clean, tmp_path, caplog
):
    out = tmp_path / "out.zarr"
    proc = start_cli("run", slide, "-o", out, "--model", tiny_model, *RUN_ARGS, *IN_PROCESS)
    seen = wait_for_records(proc, out, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_complete(out)
    assert lock_path(out).exists()  # SIGKILL leaves the lock behind: stale
    assert seen <= done_records(out) < done_records(clean)
    result = invoke(
        "run", slide, "-o", out, "--model", tiny_model, "--resume", *RUN_ARGS, *IN_PROCESS
    )
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock {lock_path(out)} of pid {proc.pid}" in caplog.text
    assert "done before" in result.output
    assert is_complete(out) and not lock_path(out).exists()
    assert_identical(out, clean)
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "complete" and report["resumed"]
    assert report["tiles"]["done_before"] >= seen
    assert report["history"] == []  # the killed run wrote no report


def test_sigint_flushes_refuses_a_second_run_and_resumes(tiny_model, slide, clean, tmp_path):
    out = tmp_path / "out.zarr"
    args = ("run", slide, "-o", out, "--model", tiny_model, *RUN_ARGS, *IN_PROCESS)
    proc = start_cli(*args)
    wait_for_records(proc, out, 2)
    proc.send_signal(signal.SIGSTOP)  # hold the first run mid-way, whatever the machine's speed
    try:
        # A second run on the same output is refused, naming the holder.
        second = invoke(*args, "--resume")
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.exit_code == 2
    message = second.output.strip()
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message and "\n" not in message
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resume with --resume" in err
    assert not lock_path(out).exists() and not is_complete(out)
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "interrupted"
    # Everything the interrupted run counted as written is recorded.
    assert done_records(out) == report["chunks"]["written"] > 0
    again = invoke(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert_identical(out, clean)
    report = json.loads(report_path(out).read_text())
    assert [h["status"] for h in report["history"]] == ["interrupted"]
    # Resuming a complete output does nothing.
    done = invoke(*args, "--resume")
    assert done.exit_code == 0 and "already complete" in done.output


def test_resume_with_other_parameters_is_refused(tiny_model, slide, clean, tmp_path):
    import shutil

    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    shutil.copytree(state_dir(clean), state_dir(out))  # the resume state lives beside the store
    attrs = out / ".zattrs"
    attrs.write_text(attrs.read_text().replace('"complete"', '"incomplete"'))
    args = (
        "run",
        slide,
        "-o",
        out,
        "--model",
        tiny_model,
        "--tissue",
        "none",
        *RUN_ARGS,
        *IN_PROCESS,
    )
    result = invoke(*args, "--resume")
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("Error: cannot resume") and "\n" not in message
    assert "tissue 'auto' -> 'none'" in message


def test_resume_of_a_missing_output_starts_it(tiny_model, slide, tmp_path):
    out = tmp_path / "new.zarr"
    opts = RunOptions(
        tile_size=572, workers=1, preview=False, progress=False, resume=True, tissue="none"
    )
    summary = run_slide(slide, out, tiny_model, opts)
    assert is_complete(out) and summary.extra["tiles_processed"] == summary.tiles


def test_resume_adopts_the_state_an_older_version_kept_inside_the_group(
    tiny_model, slide, clean, tmp_path
):
    """Outputs written before the state moved beside the group resume as before, and end up
    with a group zarr opens without warnings about foreign objects."""
    import shutil
    import warnings

    import zarr

    from tilesegment.store.layout import legacy_report_path, legacy_state_dir

    out = tmp_path / "out.zarr"
    shutil.copytree(clean, out)
    shutil.copytree(state_dir(clean), legacy_state_dir(out))
    shutil.copy(report_path(clean), legacy_report_path(out))
    attrs = out / ".zattrs"
    attrs.write_text(attrs.read_text().replace('"complete"', '"incomplete"'))
    result = invoke(
        "run", slide, "-o", out, "--model", tiny_model, *RUN_ARGS, *IN_PROCESS, "--resume"
    )
    assert result.exit_code == 0, result.output
    assert is_complete(out)
    assert not legacy_state_dir(out).exists() and not legacy_report_path(out).exists()
    assert (state_dir(out) / DONE_LOG).read_bytes() == (state_dir(clean) / DONE_LOG).read_bytes()
    report = json.loads(report_path(out).read_text())
    assert [h["status"] for h in report["history"]] == ["complete"]
    assert_identical(out, clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(out), mode="r")
        assert sorted(group.keys()) == sorted(zarr.open_group(str(clean), mode="r").keys())


def test_a_finished_output_opens_in_zarr_without_warnings(clean):
    """The report and the resume state live beside the group, not in it (napari and
    ome-zarr users saw ZarrUserWarnings about them)."""
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(clean), mode="r")
        members = dict(group.members(max_depth=None))
    assert "labels/mask/0" in members and "0" in members
    assert report_path(clean).is_file() and (state_dir(clean) / DONE_LOG).is_file()
    assert sorted(p.name for p in clean.iterdir()) == [
        ".zattrs",
        ".zgroup",
        "0",
        "1",
        "2",
        "labels",
    ]
