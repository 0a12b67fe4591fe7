"""``--workers auto`` (the default on a CPU): in-process for runs too small to repay the worker
start-up, one single-thread worker per usable core for runs that do, never more workers than
the memory holds; the decision is logged, printed and recorded in the report, and the output
is that of an in-process run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.infer.conftest import IN_PROCESS, RUN_ARGS, invoke
from tilesegment.infer import capacity
from tilesegment.infer.capacity import AUTO_MIN_MPX_PER_WORKER, WORKER_RSS_MB, auto_workers
from tilesegment.machine import available_memory_mb, usable_cores
from tilesegment.store import OutputStore
from tilesegment.store.layout import report_path


def _workers_memory_allows(memory_mb: float | None, cores: int) -> int:
    """Workers the rule may start: the cores, less where memory holds fewer plus a spare."""
    return cores if memory_mb is None else min(cores, int(memory_mb // WORKER_RSS_MB) - 1)


def test_the_rule_on_this_machines_cores_and_memory():
    cores, memory_mb = usable_cores(), available_memory_mb()
    small = auto_workers(256 * 256 / 1e6, cores=cores, memory_mb=memory_mb)
    assert small.processes == 0 and small.rule == "auto"
    n = _workers_memory_allows(memory_mb, cores)
    if n < 2:
        pytest.skip(f"{cores} usable cores and {memory_mb} MB: this machine never runs 2 workers")
    enough = AUTO_MIN_MPX_PER_WORKER * n
    big = auto_workers(enough, cores=cores, memory_mb=memory_mb)
    assert big.processes == n, big
    assert f"{enough:.1f} Mpx of tissue >= {AUTO_MIN_MPX_PER_WORKER:g} Mpx per worker" in big.reason
    assert big.describe().startswith(f"workers auto: {n} worker processes (")
    below = auto_workers(enough - 0.1, cores=cores, memory_mb=memory_mb)
    assert below.processes == 0 and "under" in below.reason


def test_the_rule_follows_cores_memory_and_work():
    plenty = AUTO_MIN_MPX_PER_WORKER * 100
    assert auto_workers(plenty, cores=1, memory_mb=64_000).processes == 0  # nothing to split
    assert auto_workers(plenty, cores=8, memory_mb=None).processes == 8  # memory unknown
    # Memory for every worker and a spare: 4 x 520 MB hold 3 workers, 3 x 520 MB only 2.
    assert auto_workers(plenty, cores=8, memory_mb=4 * WORKER_RSS_MB).processes == 3
    assert auto_workers(plenty, cores=8, memory_mb=3 * WORKER_RSS_MB).processes == 2
    short = auto_workers(plenty, cores=8, memory_mb=3 * WORKER_RSS_MB - 1)
    assert short.processes == 0 and "for 2 workers and a spare" in short.reason
    # The work each worker gets decides: the same slide repays 2 workers, not 4.
    work = 2 * AUTO_MIN_MPX_PER_WORKER
    assert auto_workers(work, cores=2, memory_mb=64_000).processes == 2
    assert auto_workers(work, cores=4, memory_mb=64_000).processes == 0


def test_a_small_image_runs_in_process_and_the_report_says_why(tiny_model, tmp_path, caplog):
    image = tmp_path / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.zarr"
    with caplog.at_level(logging.INFO, logger="tilesegment.infer.run"):
        result = invoke("run", image, "-o", out, "--model", tiny_model, "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    decision = [r.getMessage() for r in caplog.records if "workers auto:" in r.getMessage()]
    assert len(decision) == 1 and "\n" not in decision[0]
    assert decision[0].startswith("workers auto: in-process (0.1 Mpx of tissue, under ")
    assert decision[0] in result.output  # the summary prints the same line
    report = json.loads(report_path(out).read_text())
    assert report["workers"]["rule"] == "auto" and report["workers"]["processes"] == 0
    assert report["workers"]["reason"] in decision[0]
    assert [d["worker"] for d in report["devices"]] == ["in-process"]
    assert report["options"]["read_threads"] >= 2  # sized from the cores (auto)
    assert {"setup", "finalize", "preview"} <= set(report["seconds"])


def test_auto_starts_the_pool_when_the_work_repays_it_with_in_process_output(
    tiny_model, tmp_path, monkeypatch
):
    """A 1200 x 1500 slide (12 tiles) is far under the threshold, which is lowered to make it
    large enough: the run must then take one worker per core and give the bytes of an
    in-process run."""
    from tilesegment.testing.synthetic import write_slide

    cores, memory_mb = usable_cores(), available_memory_mb()
    n = _workers_memory_allows(memory_mb, cores)
    if n < 2:
        pytest.skip(f"{cores} usable cores and {memory_mb} MB: this machine never runs 2 workers")
    slide = write_slide(tmp_path / "slide.tif", (1200, 1500), tissue_fraction=0.8, seed=2)
    inproc = tmp_path / "inproc" / "out.zarr"
    result = invoke("run", slide, "-o", inproc, "--model", tiny_model, *RUN_ARGS, *IN_PROCESS)
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(capacity, "AUTO_MIN_MPX_PER_WORKER", 0.1)
    auto = tmp_path / "auto" / "out.zarr"
    result = invoke("run", slide, "-o", auto, "--model", tiny_model, *RUN_ARGS)
    assert result.exit_code == 0, result.output
    assert f"workers auto: {n} worker processes (" in result.output
    report = json.loads(report_path(auto).read_text())
    assert report["workers"]["processes"] == n
    assert [d["threads"] for d in report["devices"]] == [max(1, cores // n)] * n
    assert sum(d["tiles"] for d in report["devices"]) == report["tiles"]["processed"]
    assert report["seconds"]["workers_ready"] > 0 and report["seconds"]["workers_stop"] >= 0
    for d in report["devices"]:  # where each worker's time went
        assert 0 < d["startup_seconds"] <= report["seconds"]["workers_ready"] + 1e-3
        assert 0 < d["first_batch_seconds"] <= d["forward_seconds"] <= d["busy_seconds"]
        assert d["cpu_seconds"] > d["forward_seconds"] * 0.5  # imports and model at least
    inproc_device = json.loads(report_path(inproc).read_text())["devices"][0]
    assert 0 < inproc_device["forward_seconds"] <= inproc_device["busy_seconds"]
    assert inproc_device["cpu_seconds"] > 0
    a, b = OutputStore.open(auto), OutputStore.open(inproc)
    np.testing.assert_array_equal(a.probabilities[:], b.probabilities[:])
    np.testing.assert_array_equal(a.mask[:], b.mask[:])
