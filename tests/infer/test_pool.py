"""The worker pool with real processes: crashes retried into identical output, persistent
failures reported and resumable, a killed parent leaves no orphan worker; plus the pure parts
(device and precision choice, the fault hook's grammar, batch halving on out-of-memory)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from tests.infer.conftest import (
    IN_PROCESS,
    RUN_ARGS,
    assert_identical,
    descendants,
    done_records,
    invoke,
    run_cli,
    start_cli,
    wait_for_records,
    wait_gone,
)
from tilesegment.errors import ConfigError
from tilesegment.infer.capacity import WORKER_RSS_MB, cap_cpu_workers
from tilesegment.infer.devices import cpu_has_native_bf16, resolve_devices, resolve_precision
from tilesegment.infer.executors.faults import FAULT_ENV, FaultInjector, FaultSpec
from tilesegment.infer.stream import BatchSize
from tilesegment.io import open_slide
from tilesegment.machine import available_memory_mb, cgroup_limit, usable_cores
from tilesegment.store import is_complete
from tilesegment.store.layout import report_path
from tilesegment.store.resume import lock_path
from tilesegment.tissue import TissueMap, load_tissue_mask

POOL_ARGS = ("--workers", "2", *RUN_ARGS)
#: What ``--precision auto`` is on this machine's CPU.
AUTO_CPU = "bf16" if cpu_has_native_bf16() else "fp32"

# ------------------------------------------------------------------------------- unit level


def test_batch_size_halves_on_out_of_memory_and_keeps_the_result():
    calls = []

    def predictor(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return batch.astype(np.float32) * 2

    batch = np.arange(7 * 3, dtype=np.uint8).reshape(7, 3)
    sizer = BatchSize(7)
    out = sizer.predict(predictor, batch)
    np.testing.assert_array_equal(out, batch.astype(np.float32) * 2)
    assert sizer.size == 2
    assert calls == [7, 4, 2, 2, 3, 2, 1]  # 7 -> 4 + 3 -> (2 + 2) + (2 + 1)
    # A single tile that does not fit cannot be split: the error stands.
    with pytest.raises(torch.OutOfMemoryError):
        BatchSize(1).predict(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), batch)


def test_devices_and_precision_are_resolved_per_device():
    assert resolve_devices("cpu") == ["cpu"]
    assert resolve_devices("cpu", 3) == ["cpu"] * cap_cpu_workers(3)  # capped on small machines
    if not torch.cuda.is_available():
        assert resolve_devices("auto") == ["cpu"]
        with pytest.raises(ConfigError, match=r"cuda:0 is not available .*0 CUDA devices"):
            resolve_devices("cuda:0,cuda:1")
    with pytest.raises(ConfigError, match="'tpu' is not cpu, cuda or cuda:N"):
        resolve_devices("tpu")
    assert resolve_precision("auto", "cpu") == AUTO_CPU
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")


def test_fault_hook_grammar_and_targeting():
    spec = FaultSpec.parse("worker=1,after=3,mode=raise,gen=all")
    assert spec == FaultSpec(worker=1, after=3, mode="raise", every_generation=True)
    assert FaultSpec.parse("tile=4.5").tile == (4, 5)
    with pytest.raises(ConfigError, match=FAULT_ENV):
        FaultSpec.parse("mode=explode")
    assert FaultSpec.parse("after=0,mode=hang").mode == "hang"
    assert not FaultInjector(FaultSpec(worker=0), slot=1, generation=0).active
    assert not FaultInjector(FaultSpec(worker=0), slot=0, generation=1).active  # respawned
    hook = FaultInjector(FaultSpec(after=2, mode="raise"), slot=0, generation=0)
    hook.chunk_written()
    with pytest.raises(RuntimeError, match="injected fault in worker 0 generation 0 after 2"):
        hook.chunk_written()
    start = FaultSpec.parse("at=start,mode=raise")
    assert start.at_start and start.fails and start.mode == "raise"
    hook = FaultInjector(start, slot=0, generation=0)
    hook.chunk_written()  # a start-up fault never fires later
    with pytest.raises(RuntimeError, match="before reading its start-up arguments"):
        hook.arguments_requested()
    FaultInjector(FaultSpec(after=1), slot=0, generation=0).arguments_requested()  # inert
    end = FaultSpec.parse("at=exit")
    assert end.at_exit and end.fails and end.mode == "exit"
    hook = FaultInjector(FaultSpec(at_exit=True, mode="raise"), slot=0, generation=0)
    hook.tile_started(None)  # an exit fault never fires in the stream
    hook.chunk_written()
    with pytest.raises(RuntimeError, match="after its goodbye"):
        hook.finished()


def test_worker_cap_reads_cgroup_limits_and_logs_the_cap(tmp_path, caplog):
    """cgroup v2 and v1 limit files as the kernel writes them, and the cap on this machine."""
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    (v2 / "memory.max").write_text(f"{2 * 2**30}\n")
    (v2 / "memory.current").write_text(f"{2**29}\n")
    assert cgroup_limit(v2, "cpu.max") == 1.5
    assert cgroup_limit(v2, "memory.max") == 1536  # MB left under the limit
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_limit(v2, "cpu.max") is None and cgroup_limit(v2, "memory.max") is None
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("1000\n")
    assert cgroup_limit(v1, "cpu.cfs_quota_us") is None
    assert cgroup_limit(v1, "memory.limit_in_bytes") is None
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_limit(v1, "cpu.cfs_quota_us") == 3.0

    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    memory_mb = available_memory_mb()
    assert memory_mb is not None and memory_mb > 0
    cap = min(cores, max(1, int(memory_mb // WORKER_RSS_MB)))
    assert cap_cpu_workers(1) == 1 and "capped" not in caplog.text
    assert cap_cpu_workers(cap) == cap and "capped" not in caplog.text
    assert cap_cpu_workers(10_000) == cap
    assert f"--workers 10000 capped to {cap}: {cores} usable CPU cores" in caplog.text


def test_sigterm_during_worker_start_up_ends_the_process_tree_promptly(tiny_model, slide, tmp_path):
    """SIGTERM while the workers start (each slowed down by 60 s, like a busy node importing
    torch): exit 143 within seconds, no process left, no completion marker. Before the fix the
    parent waited for every worker to finish starting (90 workers: no exit within 20 s)."""
    out = tmp_path / "out.zarr"
    env = {FAULT_ENV: "startup=60"}
    args = ("run", slide, "-o", out, "--model", tiny_model, *RUN_ARGS, "--workers", 256)
    proc = start_cli(*args, env=env)
    cap = cap_cpu_workers(256)
    deadline = time.monotonic() + 60
    while len(_workers(proc.pid)) < cap and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert len(_workers(proc.pid)) == cap, "the workers did not start"
    time.sleep(1.0)  # they are now sleeping in their start-up
    children = descendants(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # the test failed: leave nothing running (workers die with it)
            proc.kill()
    took = time.monotonic() - t0
    assert proc.returncode == 143, err
    assert took < 5, f"took {took:.1f} s to stop"
    assert wait_gone(children, timeout=5) == [], "workers left running"
    assert f"--workers 256 capped to {cap}" in err
    assert "(still starting)" in err and "Traceback" not in err, err
    assert done_records(out) == 0 and not is_complete(out)


@pytest.mark.parametrize(
    ("mode", "retries", "death"),
    [("exit", 2, "exited with code 86"), ("kill", 0, "was killed by signal 9")],
)
def test_worker_dying_at_start_up_fails_the_run_fast_naming_it(
    tiny_model, slide, tmp_path, mode, retries, death
):
    """Every worker dies as it starts, after asking for its start-up arguments (over 64 KiB
    here: a full-resolution --tissue mask) and before reading them. The run ends within
    seconds, exit 1, with one line naming the worker and how it died. The arguments used to go
    with ``Process.start()``, whose write into the spawn pipe blocks for good once the pipe is
    full and the child is dead (the parent holds the pipe's read end until the write ends)."""
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, np.full((3000, 3000), 255, np.uint8))
    with open_slide(mask) as reader:
        arguments = pickle.dumps(TissueMap(load_tissue_mask(mask, reader.info), (3000, 3000)))
    assert len(arguments) > 64 * 1024
    out = tmp_path / "out.zarr"
    args = ("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS, "--tissue", mask,
            "--max-retries", retries)  # fmt: skip
    t0 = time.monotonic()
    done = run_cli(*args, env={FAULT_ENV: f"at=start,gen=all,mode={mode}"}, timeout=120)
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    assert "tiles failed with no worker left to compute them" in errors[0]
    assert re.search(
        rf"last error: worker [01] \(cpu, pid \d+\) {death} during start-up;", errors[0]
    )
    assert "Traceback" not in done.stderr and took < 60, f"took {took:.1f} s"
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "failed"
    deaths = [e for e in report["errors"] if re.fullmatch(rf"worker .* {death} during start-up", e)]
    assert len(deaths) == 2 * (retries + 1)  # each worker, then every respawn allowed


def _workers(pid: int) -> list[int]:
    """The pool workers among the descendants of ``pid`` (not multiprocessing's tracker)."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pool_clean(tiny_model, slide, tmp_path_factory):
    """The reference for pool runs: two CPU workers, uninterrupted."""
    out = tmp_path_factory.mktemp("pool") / "out.zarr"
    result = invoke("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    assert result.exit_code == 0, result.output
    assert f"worker 0: cpu {AUTO_CPU} x1 threads" in result.output
    return out


def test_the_pool_equals_the_in_process_run_on_a_detected_tissue_map(
    tiny_model, slide, pool_clean, tmp_path
):
    """The workers skip and render tissue from the map they unpickled (bit-packed, see
    ``TissueMap``) exactly as the in-process run does from the parent's."""
    report = json.loads(report_path(pool_clean).read_text())
    assert report["tissue"]["how"].startswith("detected")
    assert report["tiles"]["skipped_no_tissue"] > 0
    out = tmp_path / "out.zarr"
    result = invoke("run", slide, "-o", out, "--model", tiny_model, *RUN_ARGS, *IN_PROCESS)
    assert result.exit_code == 0, result.output
    assert_identical(out, pool_clean)


def test_injected_worker_crash_is_retried_into_identical_output(
    tiny_model, slide, pool_clean, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "out.zarr"
    # At its first tile (read by the workers only): worker 0 dies holding work, so the parent
    # must notice, re-queue and restart. "after=2" raced on a busy machine: when worker 1 had
    # done the rest, worker 0's 2 chunks were the run's last and its exit came after the end.
    monkeypatch.setenv(FAULT_ENV, "worker=0,after=0,mode=exit")
    result = invoke("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    assert result.exit_code == 0, result.output
    assert "worker 0 (cpu, pid" in caplog.text and "exited with code 86" in caplog.text
    assert f"worker 0: cpu {AUTO_CPU} x1 threads" in result.output and "1 restarts" in result.output
    assert_identical(out, pool_clean)
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "complete"
    assert [d["restarts"] for d in report["devices"]] == [1, 0]
    assert sum(d["tiles"] for d in report["devices"]) == report["tiles"]["processed"]
    assert "exited with code 86" in report["errors"][0]


def test_worker_stuck_in_start_up_is_killed_and_replaced(
    tiny_model, slide, pool_clean, tmp_path, monkeypatch
):
    """Both first workers hang in start-up (60 s, as on a hung GPU or filesystem); each is
    killed at --startup-timeout and started again, and the run completes with the same bytes.
    Without the timeout the parent waited for them for good."""
    out = tmp_path / "out.zarr"
    fault = "startup=60"  # every slot's first process only
    _run_past_a_timeout(monkeypatch, fault, tiny_model, slide, out, "--startup-timeout", 15)
    pattern = (
        r"worker [01] \(cpu, pid \d+\) was killed: not ready 1[5-9] s after it was started "
        r"\(--startup-timeout 15\)"
    )
    _assert_whole_with_an_error_per_worker(out, pool_clean, pattern, restarts=1)


def test_worker_hung_while_computing_is_killed_and_its_unit_retried(
    tiny_model, slide, pool_clean, tmp_path, monkeypatch
):
    """Worker 0 hangs at its first tile, sending nothing (as on a hung GPU); at
    --stall-timeout it is killed, its units go to the live worker or its replacement, and the
    run completes with the pool's bytes. Without the timeout the parent waited for it for good."""
    out = tmp_path / "out.zarr"
    fault = "worker=0,after=0,mode=hang"
    _run_past_a_timeout(monkeypatch, fault, tiny_model, slide, out, "--stall-timeout", 10)
    assert_identical(out, pool_clean)
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "complete"
    assert [d["restarts"] for d in report["devices"]] == [1, 0]
    assert len(report["errors"]) == 1, report["errors"]
    pattern = (
        r"worker 0 \(cpu, pid \d+\) was killed: silent 1\d s while computing \(--stall-timeout 10\)"
    )
    assert re.fullmatch(pattern, report["errors"][0]), report["errors"]


def _run_past_a_timeout(monkeypatch, fault: str, model, slide, out, option: str, seconds: int):
    """A pool run under the fault hook ``fault`` completes within ``seconds`` of ``option``
    plus 40 s: the stuck worker was not waited for."""
    monkeypatch.setenv(FAULT_ENV, fault)
    t0 = time.monotonic()
    result = invoke("run", slide, "-o", out, "--model", model, *POOL_ARGS, option, seconds)
    took = time.monotonic() - t0
    assert result.exit_code == 0, result.output
    assert took < seconds + 40, f"took {took:.1f} s: the stuck worker was waited for"


def _assert_whole_with_an_error_per_worker(out, reference, pattern: str, restarts: int) -> None:
    """The run completed into ``reference``'s bytes, each of the two workers was restarted
    ``restarts`` times, and the report holds one error per worker, matching ``pattern``."""
    assert_identical(out, reference)
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "complete"
    assert [d["restarts"] for d in report["devices"]] == [restarts, restarts]
    assert sorted(e[:8] for e in report["errors"]) == ["worker 0", "worker 1"], report["errors"]
    assert all(re.fullmatch(pattern, e) for e in report["errors"]), report["errors"]


def test_worker_failing_after_its_goodbye_is_reported_and_the_output_stands(
    tiny_model, slide, pool_clean, tmp_path, monkeypatch, caplog
):
    """Both workers write and report every chunk, say goodbye, then exit 86: the output is
    whole and identical, and the report and the log say how each worker ended (it used to be
    silent: only a worker's own error message was reported at the stop)."""
    out = tmp_path / "out.zarr"
    monkeypatch.setenv(FAULT_ENV, "at=exit,mode=exit")
    result = invoke("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    assert result.exit_code == 0, result.output
    pattern = (
        r"worker [01] \(cpu, pid \d+\) exited with code 86 after its goodbye once asked to "
        r"stop; the chunks it reported are written"
    )
    _assert_whole_with_an_error_per_worker(out, pool_clean, pattern, restarts=0)
    assert "after its goodbye" in caplog.text


def test_persistent_failure_stops_with_the_failed_tiles_and_resumes(
    tiny_model, slide, pool_clean, tmp_path, monkeypatch
):
    tissue = zarr.open_group(pool_clean, mode="r")["labels/tissue/0"]
    assert tissue[4 * 384, 4 * 384] == 1  # tile (4, 4) has tissue: it is computed
    out = tmp_path / "out.zarr"
    monkeypatch.setenv(FAULT_ENV, "tile=4.4,mode=raise,gen=all")
    args = ("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    result = invoke(*args, "--max-retries", "0")  # retries: see the test above
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message
    assert "tiles failed after 1 attempt " in message and "(4, 4)" in message
    assert "injected fault" in message and "--resume" in message
    assert not is_complete(out) and not lock_path(out).exists()
    report = json.loads(report_path(out).read_text())
    assert report["status"] == "failed" and [4, 4] in report["tiles"]["failed_tiles"]
    assert report["tiles"]["failed"] == len(report["tiles"]["failed_tiles"])
    # Everything else was computed and recorded; a resume without the fault completes.
    # (chunks are 3 x 3 tiles: only the chunk holding tile (4, 4) is missing)
    assert done_records(out) == done_records(pool_clean) - 1
    monkeypatch.delenv(FAULT_ENV)
    # Without --tile-size the resume takes the run's own 572 px, not today's default.
    resume = [a for a in args if a not in ("--tile-size", "572")] + ["--resume"]
    assert len(resume) == len(args) - 1
    again = invoke(*resume)
    assert again.exit_code == 0, again.output
    assert_identical(out, pool_clean)
    # Another tile size is still refused, naming the difference.
    refused = invoke(*resume[:-1], "--tile-size", "828", "--resume")
    assert refused.exit_code != 0 and "tile_size [572, 572] -> [828, 828]" in refused.output


def test_killed_parent_leaves_no_worker_and_resumes_identically(
    tiny_model, slide, pool_clean, tmp_path
):
    out = tmp_path / "out.zarr"
    proc = start_cli("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    wait_for_records(proc, out, 3)
    children = descendants(proc.pid)
    assert len(children) >= 2  # two workers (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_gone(children, timeout=10) == [], "orphaned workers"
    assert not is_complete(out)
    result = invoke("run", slide, "-o", out, "--model", tiny_model, "--resume", *POOL_ARGS)
    assert result.exit_code == 0, result.output
    assert_identical(out, pool_clean)
