"""``tilesegment run --dask-workers N`` / ``--scheduler ADDRESS`` on a real local dask cluster:
the output equals a local run byte for byte, a worker killed mid-run is replaced without a
trace in the output, and an interrupted run resumes into the same bytes.

The local reference is the worker pool with as many workers (``--workers 2``): its workers run
torch with the same thread count as the dask workers (cores // 2), so the float rounding, and
with it every stored byte, is the same. (Other thread counts may move a rare uint8 by 1.)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.infer.conftest import (
    RUN_ARGS,
    assert_identical,
    descendants,
    done_records,
    invoke,
    start_cli,
    wait_for_records,
    wait_gone,
)
from tilesegment.store import is_complete
from tilesegment.store.layout import report_path
from tilesegment.store.resume import lock_path

pytest.importorskip("distributed", reason="dask.distributed is not installed")


@pytest.fixture(scope="module")
def local(tiny_model, cmu_slide_module, tmp_path_factory):
    """The reference: the same command on the local worker pool with two workers."""
    out = tmp_path_factory.mktemp("local") / "out.zarr"
    result = invoke(
        "run", cmu_slide_module, "-o", out, "--model", tiny_model, *RUN_ARGS, "--workers", "2"
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cmu_slide_module():
    from tests.conftest import data_path

    return data_path("slides", "CMU-1-Small-Region.svs")


def _report(out):
    return json.loads(report_path(out).read_text())


def test_dask_workers_give_the_bytes_of_a_local_run(tiny_model, cmu_slide_module, local, tmp_path):
    out = tmp_path / "out.zarr"
    args = ("run", cmu_slide_module, "-o", out, "--model", tiny_model, *RUN_ARGS)
    result = invoke(*args, "--dask-workers", "2")
    assert result.exit_code == 0, result.output
    assert_identical(out, local)
    report = _report(out)
    assert report["status"] == "complete" and report["options"]["dask_workers"] == 2
    devices = report["devices"]
    assert sorted(d["worker"] for d in devices) == ["0", "1"]  # both LocalCluster workers
    assert {d["executor"] for d in devices} == {"dask"}
    assert sum(d["tiles"] for d in devices) == report["tiles"]["processed"] > 0
    assert "worker 0: cpu" in result.output and "worker 1: cpu" in result.output
    for d in devices:  # where each dask worker's time went, as for the pool's workers
        assert 0 < d["startup_seconds"] and len(d["pids"]) == 1  # one model load each
        assert 0 < d["first_batch_seconds"] <= d["forward_seconds"] <= d["busy_seconds"]
        assert d["cpu_seconds"] > d["forward_seconds"] * 0.5  # wall, on a busy machine


def test_a_worker_killed_mid_run_is_replaced_and_the_output_is_identical(
    tiny_model, cmu_slide_module, local, tmp_path, dask_client
):
    out = tmp_path / "out.zarr"
    address = dask_client.scheduler.address
    proc = start_cli(
        "run", cmu_slide_module, "-o", out, "--model", tiny_model, *RUN_ARGS, "--scheduler", address
    )
    wait_for_records(proc, out, 1)
    # Kill (SIGKILL) a worker that is computing a unit right now; its nanny starts a new one
    # and the scheduler gives the unit to a live worker.
    pids = dask_client.run(os.getpid)
    victim = None
    deadline = time.monotonic() + 30
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        busy = [
            w
            for w, keys in dask_client.processing().items()
            if any(str(k).startswith("tilesegment-unit-") for k in keys)
        ]
        victim = busy[0] if busy else None
        time.sleep(0.01)
    assert victim is not None, "the run ended before a worker could be killed mid-unit"
    os.kill(pids[victim], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_identical(out, local)  # also: no temporary file of the killed write is left
    report = _report(out)
    assert report["status"] == "complete"
    assert sum(d["tiles"] for d in report["devices"]) == report["tiles"]["processed"]
    dask_client.wait_for_workers(2, timeout=60)  # the nanny's replacement, for later tests


def test_an_interrupted_dask_run_resumes_into_identical_output(
    tiny_model, cmu_slide_module, local, tmp_path, dask_client
):
    out = tmp_path / "out.zarr"
    args = ("run", cmu_slide_module, "-o", out, "--model", tiny_model, *RUN_ARGS)
    proc = start_cli(*args, "--dask-workers", "2")
    wait_for_records(proc, out, 2)
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resume with --resume" in err
    assert wait_gone(children, timeout=20) == [], "dask workers outlived the run"
    assert not is_complete(out) and not lock_path(out).exists()
    report = _report(out)
    assert report["status"] == "interrupted" and report["tiles"]["not_done"] > 0
    recorded = done_records(out)
    # Resume on another cluster (the test's): only the missing chunks are computed.
    result = invoke(*args, "--resume", "--scheduler", dask_client.scheduler.address)
    assert result.exit_code == 0, result.output
    assert_identical(out, local)
    assert _report(out)["chunks"]["done_before"] == recorded


def test_bad_dask_options_fail_in_one_line_before_any_work(tiny_model, tmp_path, monkeypatch):
    slide = tmp_path / "absent.svs"  # never opened: the options are checked first
    out = tmp_path / "out.zarr"
    base = ("run", slide, "-o", out, "--model", tiny_model, *RUN_ARGS)
    result = invoke(*base, "--dask-workers", "2", "--workers", "2")
    assert result.exit_code == 2 and "drop --workers" in result.output
    result = invoke(*base, "--dask-workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert result.exit_code == 2 and "contradict" in result.output
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    result = invoke(*base, "--dask-workers", "2")
    assert result.exit_code == 2, result.output
    assert "pip install 'tilesegment[cluster]'" in result.output
    assert not out.exists()


def test_dask_workers_beyond_the_cores_are_capped_with_a_warning(
    tiny_model, cmu_slide_module, tmp_path, caplog
):
    """--dask-workers N starts no more local workers than --workers N would (usable cores and
    memory): more only adds model copies, or ends in the OOM killer."""
    from tilesegment.infer.capacity import cap_cpu_workers
    from tilesegment.machine import usable_cores

    asked = usable_cores() + 3
    cap = cap_cpu_workers(asked)
    out = tmp_path / "out.zarr"
    args = ("run", cmu_slide_module, "-o", out, "--model", tiny_model, *RUN_ARGS)
    result = invoke(*args, "--dask-workers", asked)
    assert result.exit_code == 0, result.output
    assert f"--dask-workers {asked} capped to {cap}: " in caplog.text
    workers = {d["worker"] for d in _report(out)["devices"]}
    assert 0 < len(workers) <= cap and workers <= {str(i) for i in range(cap)}


def test_the_workers_filter_drops_only_the_runs_own_task_failures():
    """The LocalCluster's workers stay quiet about the run's failed or cancelled unit tasks
    (the driver reports them in one line) and keep every other record."""
    import logging

    from tilesegment.infer.executors.dask_logs import QuietUnitFailures

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, args, None)

    failed = "Compute Failed\nKey:       %s\nState:     %s\n"
    quiet = QuietUnitFailures()
    assert not quiet.filter(record(failed, "tilesegment-unit-ab12-4-0", "executing"))
    assert quiet.filter(record(failed, "someone-elses-task-1", "executing"))
    cancelled = (
        "Async instruction for <Task cancelled name=\"execute('{}')\"> ended with CancelledError"
    )
    assert not quiet.filter(record(cancelled.format("tilesegment-unit-ab12-5-0")))
    assert quiet.filter(record(cancelled.format("other-7")))
    assert quiet.filter(record("Worker is at 85% memory usage. Pausing worker."))
