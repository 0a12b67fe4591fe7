"""A library import must not change its host program; the CLI and worker processes still start
torch with passive OpenMP waiting (the measured 10-20x speed-up on busy cores)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

from tilesegment.infer.devices import WORKER_ENV, spawn_env


def _child_env(queue) -> None:
    queue.put(os.environ.get("OMP_WAIT_POLICY"))


def test_importing_the_package_leaves_the_environment_alone():
    code = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import tilesegment, tilesegment.infer.run, tilesegment.dask, tilesegment.postprocess\n"
        "import tilesegment.infer.executors.pool, tilesegment.infer.executors.dask\n"
        "keys = set(before) | set(os.environ)\n"
        "changed = {k for k in keys if before.get(k) != os.environ.get(k)}\n"
        "print(sorted(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_spawned_workers_start_with_passive_waiting_and_the_parent_is_restored(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with spawn_env():
        child = ctx.Process(target=_child_env, args=(queue,))
        child.start()
    assert "OMP_WAIT_POLICY" not in os.environ  # restored as soon as the worker started
    assert queue.get(timeout=60) == WORKER_ENV["OMP_WAIT_POLICY"] == "PASSIVE"
    child.join(timeout=60)
    # An explicit value in the environment wins.
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with spawn_env():
        child = ctx.Process(target=_child_env, args=(queue,))
        child.start()
    assert queue.get(timeout=60) == "ACTIVE" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    child.join(timeout=60)


def test_the_command_line_sets_passive_waiting_for_itself():
    code = (
        "import os, sys\n"
        "from tilesegment.cli import main\n"
        "try:\n"
        "    main(['info', sys.argv[1]])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code, "no-such-slide.svs"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE", (out.stdout, out.stderr)
