"""The SLURM example: the job script dask-jobqueue renders (no SLURM needed), the tilesegment
command it runs, and a full run with a local dask cluster standing in for the SLURM jobs."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tilesegment.store import is_complete
from tilesegment.store.layout import report_path

pytest.importorskip("dask_jobqueue", reason="dask-jobqueue missing: pip install -e '.[cluster]'")
pytest.importorskip("distributed", reason="distributed missing: pip install -e '.[cluster]'")

SCRIPT = ROOT / "workflows" / "slurm" / "segment_slurm.py"


@pytest.fixture(scope="module")
def slurm():
    """The example script as a module."""
    spec = importlib.util.spec_from_file_location("segment_slurm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def slide_dir(tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.svs", "b c.tif", "notes.txt"):
        (folder / name).touch()
    return folder


def render(slurm, argv: list[str], extra: list[str] = ()) -> tuple[list[str], str, list[str]]:
    """(#SBATCH lines, whole job script, tilesegment command) for ``argv``."""
    args = slurm.build_parser().parse_args(argv)
    with slurm.make_cluster(args) as cluster:
        script = cluster.job_script()
        cmd = slurm.tilesegment_command(args, cluster.scheduler_address, list(extra))
        assert cmd[cmd.index("--scheduler") + 1] == cluster.scheduler_address
    return [line for line in script.splitlines() if line.startswith("#SBATCH")], script, cmd


def test_gpu_job_script_requests_what_was_asked(slurm, slide_dir, tmp_path):
    out = tmp_path / "out"
    argv = [str(slide_dir), "-o", str(out), "--queue", "gpu", "--account", "lab"]
    argv += ["--cores", "4", "--memory", "16GB", "--walltime", "01:30:00", "--gpu"]
    argv += ["--job-extra=--qos=long", "--prologue", "module load cuda"]
    argv += ["--local-directory", "/scratch/me"]
    sbatch, script, cmd = render(slurm, argv, ["--geojson", str(out)])
    for line in (
        "#SBATCH -J tilesegment",
        "#SBATCH -p gpu",
        "#SBATCH -A lab",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=15G",  # 16 GB = 14.9 GiB, rounded up by dask-jobqueue
        "#SBATCH -t 01:30:00",
        "#SBATCH --qos=long",
        "#SBATCH --gres=gpu:1",
        f"#SBATCH -o {out}/slurm-logs/tilesegment-%J.out",
    ):
        assert line in sbatch, f"{line!r} not in {sbatch}"
    assert "module load cuda" in script
    worker = next(line for line in script.splitlines() if "dask_worker" in line)
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://")
    assert "--nthreads 2" in worker and "--nworkers" not in worker  # one 2-thread worker
    assert "--local-directory /scratch/me" in worker
    assert cmd[:4] == [sys.executable, "-m", "tilesegment", "run"]
    assert cmd[4:6] == [str(slide_dir / "a.svs"), str(slide_dir / "b c.tif")]  # folder expanded
    assert cmd[cmd.index("-o") + 1] == str(out)
    assert "--resume" in cmd and cmd[cmd.index("--devices") + 1] == "cuda"
    assert cmd[-2:] == ["--geojson", str(out)]


def test_cpu_defaults_from_the_environment(slurm, slide_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TILESEGMENT_SLURM_QUEUE", "short")
    monkeypatch.setenv("TILESEGMENT_SLURM_CORES", "6")
    monkeypatch.setenv("TILESEGMENT_SLURM_WALLTIME", "00:20:00")
    sbatch, script, cmd = render(slurm, [str(slide_dir / "a.svs"), "-o", str(tmp_path / "o")])
    assert {"#SBATCH -p short", "#SBATCH --cpus-per-task=6", "#SBATCH -t 00:20:00"} <= set(sbatch)
    assert not any(line.startswith(("#SBATCH -A", "#SBATCH --gres")) for line in sbatch)
    assert "--nthreads 1" in script and "--nworkers 6" in script  # one worker per core
    assert "--local-directory ${TMPDIR:-/tmp}" in script
    # One plain slide: `tilesegment run` then takes OUT.zarr, so the command names it.
    assert cmd[cmd.index("-o") + 1] == str(tmp_path / "o" / "a.zarr")
    assert "--devices" not in cmd


def test_print_job_script_submits_nothing(slurm, slide_dir, tmp_path, capsys):
    code = slurm.main([str(slide_dir), "-o", str(tmp_path / "o"), "--print-job-script"])
    assert code == 0
    out = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=8" in out
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[2:4] == ["tilesegment", "run"] and str(slide_dir / "b c.tif") in command


def test_a_folder_without_slides_is_refused(slurm, tmp_path):
    args = slurm.build_parser().parse_args([str(tmp_path), "-o", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no file matches"):
        slurm.tilesegment_command(args, "tcp://127.0.0.1:1", [])


class _LocalJobs:
    """A LocalCluster that answers ``scale(jobs=N)`` like a SLURMCluster (one worker a job)."""

    def __init__(self) -> None:
        from distributed import LocalCluster

        self._cluster = LocalCluster(
            n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )  # fmt: skip
        self.scheduler_address = self._cluster.scheduler_address

    def scale(self, jobs: int) -> None:
        self._cluster.scale(jobs)

    def __getattr__(self, name):
        return getattr(self._cluster, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._cluster.close()


def test_main_segments_the_slides_on_the_cluster_workers(slurm, tmp_path, monkeypatch, tiny_model):
    from tilesegment.testing.synthetic import write_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    for seed in (1, 2):
        write_slide(folder / f"s{seed}.tif", (600, 600), mpp=0.25, seed=seed)
    monkeypatch.setattr(slurm, "make_cluster", lambda args: _LocalJobs())
    out = tmp_path / "out"
    argv = [str(folder), "-o", str(out), "--model", str(tiny_model), "--jobs", "1"]
    code = slurm.main([*argv, "--wait", "120", "--", "--no-preview", "--no-progress"])
    assert code == 0
    for stem in ("s1", "s2"):
        assert is_complete(out / f"{stem}.zarr")
        report = json.loads(report_path(out / f"{stem}.zarr").read_text())
        assert report["options"]["scheduler"].startswith("tcp://127.0.0.1:")
        assert [d["executor"] for d in report["devices"]] == ["dask"]  # computed by the workers
