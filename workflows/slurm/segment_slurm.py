"""Segment many slides on a SLURM cluster: dask-jobqueue workers, one ``tilesegment run``.

This process starts a dask scheduler, submits ``--jobs`` SLURM jobs that each run dask
workers, waits for the first worker, then runs::

    tilesegment run SLIDE... -o OUTDIR --scheduler ADDRESS --resume [EXTRA...]

on this machine (the driver: it reads each slide's thumbnail, plans the tiles, records
progress and finalises each output) while the workers read tiles, predict and write chunks.
Slides and OUTDIR must be on a filesystem shared by this machine and the compute nodes. When
the run ends (or on Ctrl-C, which tilesegment turns into a clean, resumable stop) the jobs
are cancelled. Exit code: tilesegment's.

    python workflows/slurm/segment_slurm.py /shared/slides -o /shared/results --jobs 4 \\
        --cores 8 --memory 32GB --walltime 04:00:00 --queue cpu -- --geojson /shared/results
    python workflows/slurm/segment_slurm.py ... --print-job-script   # show it, submit nothing

SLIDE arguments are folders (every file matching ``--pattern``), files, quoted globs or
``@LIST`` files. Arguments after ``--`` go to ``tilesegment run``. Cluster defaults come from
the environment (``TILESEGMENT_SLURM_QUEUE``, ``_ACCOUNT``, ``_CORES``, ``_PROCESSES``,
``_MEMORY``, ``_WALLTIME``, ``_JOBS``, ``_LOCAL_DIR``), else the values shown by ``--help``.
Needs ``pip install 'tilesegment[cluster]'`` (dask-jobqueue, distributed) on every node.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilesegment.cli.batch import is_batch, slide_stem

#: File patterns of slides searched in a folder argument.
DEFAULT_PATTERNS = ("*.svs", "*.ndpi", "*.mrxs", "*.scn", "*.tif", "*.tiff")


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"TILESEGMENT_SLURM_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    """The command line (everything before ``--``)."""
    processes = _env("PROCESSES", None)
    p = argparse.ArgumentParser(
        description="Segment slides with tilesegment on dask workers started as SLURM jobs.",
        epilog="Arguments after -- are passed to `tilesegment run` (e.g. -- --geojson OUTDIR).",
    )
    p.add_argument("slides", nargs="+", help="folders, slide files, quoted globs or @LIST files")
    p.add_argument("-o", "--output", type=Path, required=True, help="OUTDIR for <stem>.zarr")
    p.add_argument("--model", default="nuclei-he", help="shipped model name or checkpoint path")
    p.add_argument(
        "--pattern",
        action="append",
        help=f"file pattern searched in folder arguments (repeatable; default {DEFAULT_PATTERNS})",
    )
    p.add_argument("--jobs", type=int, default=int(_env("JOBS", "2")), help="SLURM jobs")
    p.add_argument("--cores", type=int, default=int(_env("CORES", "8")), help="CPUs per job")
    p.add_argument(
        "--processes",
        type=int,
        default=int(processes) if processes else None,
        help="dask worker processes per job (default: one per core; 1 with --gpu)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="threads per worker, each computing one unit of work at a time (default: 1; "
        "2 with --gpu, so that one unit is read while another is on the GPU)",
    )
    p.add_argument("--memory", default=_env("MEMORY", "32GB"), help="memory per job")
    p.add_argument("--walltime", default=_env("WALLTIME", "02:00:00"), help="per job")
    p.add_argument("--queue", default=_env("QUEUE", None), help="SLURM partition (-p)")
    p.add_argument("--account", default=_env("ACCOUNT", None), help="SLURM account (-A)")
    p.add_argument(
        "--job-extra",
        action="append",
        default=[],
        metavar="DIRECTIVE",
        help="extra #SBATCH directive, e.g. --job-extra=--qos=long (repeatable)",
    )
    p.add_argument(
        "--prologue",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the workers start, e.g. 'module load cuda' (repeatable)",
    )
    p.add_argument(
        "--local-directory",
        default=_env("LOCAL_DIR", "${TMPDIR:-/tmp}"),
        help="node-local scratch folder for the workers' spill files (expanded on the node)",
    )
    p.add_argument("--log-directory", type=Path, help="SLURM job logs (default: OUTDIR/slurm-logs)")
    p.add_argument("--interface", help="network interface of scheduler and workers, e.g. ib0")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="one GPU per job: adds --gres=gpu:1, one worker per job, tilesegment --devices cuda",
    )
    p.add_argument(
        "--wait", type=float, default=900, help="seconds to wait for the first worker to start"
    )
    p.add_argument(
        "--print-job-script",
        action="store_true",
        help="print the job script and the tilesegment command; submit nothing",
    )
    return p


def cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :class:`dask_jobqueue.SLURMCluster` for ``args``."""
    processes = args.processes or (1 if args.gpu else args.cores)
    threads = args.threads or (2 if args.gpu else 1)
    extra = list(args.job_extra)
    if args.gpu and not any(d.startswith("--gres") for d in extra):
        extra.append("--gres=gpu:1")
    kwargs: dict[str, Any] = {
        "cores": processes
        * threads,  # dask's worker threads: threads per worker = cores / processes
        "processes": processes,
        "job_cpu": args.cores,  # what SLURM allocates (--cpus-per-task)
        "memory": args.memory,
        "walltime": args.walltime,
        "queue": args.queue,
        "account": args.account,
        "job_name": "tilesegment",
        "job_extra_directives": extra,
        "job_script_prologue": list(args.prologue),
        "local_directory": args.local_directory,
        "log_directory": str(args.log_directory or args.output / "slurm-logs"),
        "python": sys.executable,  # the same environment on the nodes (shared filesystem)
    }
    if args.interface:
        kwargs["interface"] = args.interface
    return kwargs


def slide_arguments(inputs: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """SLIDE arguments for ``tilesegment run``: folders become their matching files.

    Raises
    ------
    SystemExit
        A folder holds no file matching ``patterns``.
    """
    slides: list[str] = []
    for arg in inputs:
        folder = Path(arg)
        if not arg.startswith("@") and folder.is_dir() and folder.suffix != ".zarr":
            found = sorted({str(p) for pat in patterns for p in folder.glob(pat)})
            if not found:
                raise SystemExit(f"{folder}: no file matches {', '.join(patterns)}; see --pattern")
            slides += found
        else:
            slides.append(arg)
    return slides


def tilesegment_command(
    args: argparse.Namespace, scheduler: str, extra: Sequence[str]
) -> list[str]:
    """The ``tilesegment run`` command of the batch, as an argument list (no shell)."""
    slides = slide_arguments(args.slides, args.pattern or DEFAULT_PATTERNS)
    cmd = [sys.executable, "-m", "tilesegment", "run", *slides, "-o", str(args.output)]
    cmd += ["--model", args.model, "--scheduler", scheduler, "--resume"]
    if args.gpu and "--devices" not in extra and "--device" not in extra:
        cmd += ["--devices", "cuda"]
    if not is_batch(slides):  # one plain path: `run` takes OUT.zarr, keep the folder layout
        cmd[cmd.index("-o") + 1] = str(args.output / f"{slide_stem(slides[0])}.zarr")
    return [*cmd, *extra]


def make_cluster(args: argparse.Namespace):
    """A :class:`dask_jobqueue.SLURMCluster` (its scheduler runs in this process)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SystemExit(
            "dask-jobqueue is not installed: pip install 'tilesegment[cluster]'"
        ) from exc
    return SLURMCluster(**cluster_kwargs(args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    extra = argv[split + 1 :]
    args.output.mkdir(parents=True, exist_ok=True)
    Path(cluster_kwargs(args)["log_directory"]).mkdir(parents=True, exist_ok=True)
    from distributed import Client

    with make_cluster(args) as cluster:
        cmd = tilesegment_command(args, cluster.scheduler_address, extra)
        if args.print_job_script:
            print(cluster.job_script())
            print(shlex.join(cmd))
            return 0
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(
                f"waiting for the workers of {args.jobs} SLURM jobs; dashboard "
                f"{client.dashboard_link}",
                file=sys.stderr,
            )
            client.wait_for_workers(1, timeout=args.wait)
            return run_to_end(cmd)


def run_to_end(cmd: Sequence[str]) -> int:
    """Run ``cmd`` and return its exit code, letting it stop cleanly on Ctrl-C or SIGTERM.

    Ctrl-C in a terminal and ``scancel`` signal the child as well (same process group, same
    job step), so on SIGINT or SIGTERM this waits for it to record its finished chunks and
    exit (130 or 143) instead of killing it.
    """
    proc = subprocess.Popen(cmd)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
