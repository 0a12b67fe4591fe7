"""The worker pool with real processes: crashes retried into identical output, persistent
failures reported and resumable, a killed parent leaves no orphan worker; plus the pure parts
(device and precision choice, the fault hook's grammar, batch halving on out-of-memory)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
import zarr

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
from tilesegment.errors import ConfigError
from tilesegment.infer.pipeline import REPORT_NAME, BatchSize
from tilesegment.infer.pool import (
    FAULT_ENV,
    FaultInjector,
    FaultSpec,
    cap_cpu_workers,
    cpu_has_native_bf16,
    resolve_devices,
    resolve_precision,
)
from tilesegment.infer.resume import lock_path
from tilesegment.store import is_complete

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
    assert not FaultInjector(FaultSpec(worker=0), slot=1, generation=0).active
    assert not FaultInjector(FaultSpec(worker=0), slot=0, generation=1).active  # respawned
    hook = FaultInjector(FaultSpec(after=2, mode="raise"), slot=0, generation=0)
    hook.chunk_written()
    with pytest.raises(RuntimeError, match="injected fault in worker 0 generation 0 after 2"):
        hook.chunk_written()


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def pool_clean(tiny_model, slide, tmp_path_factory):
    """The reference for pool runs: two CPU workers, uninterrupted."""
    out = tmp_path_factory.mktemp("pool") / "out.zarr"
    result = invoke("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    assert result.exit_code == 0, result.output
    assert f"worker 0: cpu {AUTO_CPU} x1 threads" in result.output
    return out


def test_injected_worker_crash_is_retried_into_identical_output(
    tiny_model, slide, pool_clean, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "out.zarr"
    monkeypatch.setenv(FAULT_ENV, "worker=0,after=2,mode=exit")  # read by the workers only
    result = invoke("run", slide, "-o", out, "--model", tiny_model, *POOL_ARGS)
    assert result.exit_code == 0, result.output
    assert "worker 0 (cpu, pid" in caplog.text and "exited with code 86" in caplog.text
    assert f"worker 0: cpu {AUTO_CPU} x1 threads" in result.output and "1 restarts" in result.output
    assert_identical(out, pool_clean)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "complete"
    assert [d["restarts"] for d in report["devices"]] == [1, 0]
    assert sum(d["tiles"] for d in report["devices"]) == report["tiles"]["processed"]
    assert "exited with code 86" in report["errors"][0]


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
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "failed" and [4, 4] in report["tiles"]["failed_tiles"]
    assert report["tiles"]["failed"] == len(report["tiles"]["failed_tiles"])
    # Everything else was computed and recorded; a resume without the fault completes.
    # (chunks are 3 x 3 tiles: only the chunk holding tile (4, 4) is missing)
    assert done_records(out) == done_records(pool_clean) - 1
    monkeypatch.delenv(FAULT_ENV)
    again = invoke(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert_identical(out, pool_clean)


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
