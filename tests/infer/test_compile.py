"""``torch.compile`` in runs: chosen by size (auto), equal to eager mode, and a compiler that
fails falls back to eager mode instead of failing the run."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from tests.conftest import data_path
from tilesegment.infer.options import COMPILE_MIN_MPX, RunOptions, resolve_compile
from tilesegment.infer.run import run_slide
from tilesegment.store import OutputStore
from tilesegment.store.layout import report_path


def test_auto_compiles_only_runs_long_enough_to_repay_it():
    assert resolve_compile(None, COMPILE_MIN_MPX) is True
    assert resolve_compile(None, COMPILE_MIN_MPX - 0.1) is False
    assert resolve_compile(True, 1) is True and resolve_compile(False, 10**6) is False


def _run(tmp_path, model, name: str, compile: bool | None):
    out = tmp_path / f"{name}.zarr"
    opts = RunOptions(
        tile_size=252,
        tissue="none",
        preview=False,
        progress=False,
        compile=compile,
        precision="fp32",
    )
    run_slide(data_path("slides", "small.svs"), out, model, opts)
    report = json.loads(report_path(out).read_text())
    return OutputStore.open(out), report


def test_compiled_run_equals_eager_and_is_reported(tmp_path, tiny_model):
    eager, r_eager = _run(tmp_path, tiny_model, "eager", None)  # small run: auto = eager
    compiled, r_compiled = _run(tmp_path, tiny_model, "compiled", True)
    assert r_eager["compiled"] is False and r_compiled["compiled"] is True
    a = eager.probabilities[:].astype(np.int16)
    b = compiled.probabilities[:].astype(np.int16)
    assert np.abs(a - b).max() <= 1
    assert (eager.mask[:] == compiled.mask[:]).mean() >= 0.9999


def test_a_failing_compiler_falls_back_to_eager(tmp_path, tiny_model, monkeypatch, caplog):
    def broken_compile(model, *args, **kwargs):
        def run(x):
            raise RuntimeError("inductor: no working C++ compiler (test)")

        return run

    eager, _ = _run(tmp_path, tiny_model, "eager", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="tilesegment"):
        fallback, report = _run(tmp_path, tiny_model, "fallback", True)
    assert "torch.compile failed (RuntimeError: inductor: no working C++ compiler" in caplog.text
    assert report["status"] == "complete"
    np.testing.assert_array_equal(eager.probabilities[:], fallback.probabilities[:])
