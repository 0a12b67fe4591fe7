"""How to run a model over a slide: :class:`RunOptions` and the checks that refuse bad
combinations before anything is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilesegment.errors import ConfigError
from tilesegment.geometry import tta_symmetries
from tilesegment.store.layout import FORMATS, NGFF_04

#: Default input tile edge (or the nearest valid size for other depths): 828 px, output 644 px
#: for the shipped depth-4 models. Less of each tile is halo than at the paper's 572 px (1.67
#: input px per output px against 2.17): as much or more output per CPU-second in 10 of 11
#: same-round comparisons (bf16 +4 to +37 %, fp32 +1 to +7 %), for ~+105 MB (bf16) / +140 MB
#: (fp32) per worker; 1084 px went both ways against it for more memory (whole default runs
#: alternating on a 20000² slide: 0.98, 0.89 and 1.15 of 828's stream time, +100-120 MB per
#: worker). Small images get smaller tiles (:func:`tilesegment.geometry.tile_grid`). See
#: benchmarks/RESULTS.md.
DEFAULT_TILE_SIZE = 828

#: Output megapixels a run must compute before ``compile=None`` (auto) compiles the model:
#: 2000 tiles of 572 px (388² outputs), where the measured saving repays the compilation
#: (see RESULTS.md).
COMPILE_MIN_MPX = 300.0

INSTALL_HINT = "pip install 'tilesegment[cluster]'"


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a model over a slide. Defaults suit a CPU or a single GPU."""

    tile_size: int | None = None
    """Input tile edge in px (a valid U-Net input size); None picks the model's size nearest
    :data:`DEFAULT_TILE_SIZE` (828), or on resume the size the run was started with."""
    batch_size: int = 1
    """Tiles per forward pass (halved automatically on CUDA out-of-memory)."""
    level: int | None = None
    """Pyramid level to read; None picks the coarsest level at or finer than the model's µm/px."""
    mpp: float | None = None
    """The slide's µm/px, for files that lack it or state it wrongly; None trusts the file."""
    tissue: str = "auto"
    """``"auto"`` (detect on a thumbnail), ``"none"`` (process every tile) or a mask path."""
    preview: bool = True
    """Write ``OUT.preview.png`` (thumbnail with mask contours) next to the output."""
    overwrite: bool = False
    """Replace an existing output."""
    resume: bool = False
    """Continue an interrupted output (skipping its finished chunks), or start it if absent."""
    dtype: str = "uint8"
    """Stored probability dtype: ``"uint8"`` (0–255) or ``"float32"``."""
    format: str = NGFF_04
    """Output format: ``"ngff-0.4"`` (Zarr v2, a file per chunk; what QuPath reads) or
    ``"ngff-0.5"`` (Zarr v3, a file per shard of many chunks)."""
    shard_target_px: int = 8192
    """NGFF 0.5: aim for shards of about this edge, a whole number of chunks. Each worker
    gathers one shard of stored values before writing it (``(C + 2) * edge**2`` bytes for
    uint8 probabilities, the mask and the tissue label)."""
    device: str = "cpu"
    """Device(s): ``"cpu"``, ``"cuda:0"``, ``"cuda:0,cuda:1"`` (one worker process each) or
    ``"auto"`` (every visible GPU, else the CPU)."""
    workers: int | None = None
    """CPU worker processes. None (auto, the default): one single-thread worker per usable core
    when the run computes enough tissue to repay their start-up and the memory holds them,
    else in-process (:func:`tilesegment.infer.capacity.auto_workers`). 1 runs in-process;
    several split the cores (capped by the usable cores and memory)."""
    precision: str = "auto"
    """``"auto"`` (bf16 on CPUs with native bf16, else fp32; bf16 on CUDA where supported, else
    fp16), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only)."""
    compile: bool | None = None
    """``torch.compile`` the model in every worker. None (auto): when the run computes at least
    :data:`COMPILE_MIN_MPX` output megapixels, enough to repay the compilation (see
    benchmarks/RESULTS.md). A model that fails to compile
    (no C++ compiler, an unsupported op) runs eagerly, with a warning."""
    tta: str = "none"
    """Test-time augmentation: ``"none"``, ``"flips"`` (average over the identity, both mirrors
    and the 180° rotation: 4x the compute) or ``"d4"`` (all flips and 90° rotations: 8x); see
    :data:`tilesegment.geometry.TTA_MODES`. The output stays independent of the tile size."""
    read_threads: int | None = None
    """Threads that read, decode and mirror-pad tiles, split between worker processes (at least
    one each). None (auto): a quarter of the usable cores, at least 2
    (:func:`default_read_threads`)."""
    chunk_target_px: int = 1024
    """Aim for output chunks of about this edge; chunks are a whole number of tile strides."""
    read_block_px: int = 1536
    """Aim for read blocks (units of work) of about this edge; a whole number of chunks."""
    max_retries: int = 2
    """Times a unit of work is retried on another worker after its worker died or raised."""
    startup_timeout_s: float = 600.0
    """Seconds a pool worker may take from its spawn to ready (importing torch, loading the
    model, opening the slide; a first CUDA context can take minutes) before it is killed and
    counted as a failed start-up (respawned while respawns last). A worker stuck there, say on
    a hung GPU or filesystem, used to stall the run for good."""
    stall_timeout_s: float = 900.0
    """Seconds a ready pool worker holding work may stay silent (no unit begun, no chunk
    written) before it is killed and its unit retried like a crash's. A chunk takes seconds on
    a CPU (a minute with 8-fold TTA and a big model) and the first one's compilation well under
    this; a hung GPU or a write stuck on a dead filesystem never ends."""
    fsync: bool = True
    """fsync chunk files and the done log (durable across power cuts, not only crashes)."""
    in_process: bool | None = None
    """Force (True) or forbid (False) the in-process executor; None: as ``workers`` decides."""
    scheduler: str | None = None
    """Address of a dask scheduler (``tcp://host:8786``) whose workers compute the units of
    work (see :mod:`tilesegment.infer.executors.dask`); the output must be on a shared
    filesystem."""
    dask_workers: int | None = None
    """Start a local dask cluster of this many worker processes (one thread each) for the run."""
    progress: bool = True
    """Show a progress bar on stderr."""
    command: tuple[str, ...] | None = None
    """Command line recorded in the run report (None: ``sys.argv``)."""


def check_options(opts: RunOptions) -> None:
    if opts.batch_size < 1:
        raise ConfigError(f"`batch_size` ({opts.batch_size}) must be >= 1")
    if opts.format not in FORMATS:
        raise ConfigError(f"--format {opts.format!r} must be one of {', '.join(FORMATS)}")
    if opts.shard_target_px < 1:
        raise ConfigError(f"`shard_target_px` ({opts.shard_target_px}) must be >= 1")
    if opts.tissue not in ("auto", "none") and not Path(opts.tissue).exists():
        raise ConfigError(f"--tissue {opts.tissue}: no such mask file; use auto, none or a path")
    if opts.resume and opts.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if opts.workers is not None and opts.workers < 1:
        raise ConfigError(f"`workers` ({opts.workers}) must be >= 1")
    if opts.read_threads is not None and opts.read_threads < 1:
        raise ConfigError(f"`read_threads` ({opts.read_threads}) must be >= 1")
    if opts.max_retries < 0:
        raise ConfigError(f"`max_retries` ({opts.max_retries}) must be >= 0")
    if not opts.startup_timeout_s > 0:
        raise ConfigError(f"`startup_timeout_s` ({opts.startup_timeout_s}) must be > 0")
    if not opts.stall_timeout_s > 0:
        raise ConfigError(f"`stall_timeout_s` ({opts.stall_timeout_s}) must be > 0")
    if opts.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {opts.precision!r} must be auto, fp32, bf16 or fp16")
    tta_symmetries(opts.tta)  # a ConfigError naming the modes
    if opts.scheduler is not None or opts.dask_workers is not None:
        _check_dask(opts)


def _check_dask(opts: RunOptions) -> None:
    if opts.scheduler is not None and opts.dask_workers is not None:
        raise ConfigError("--scheduler and --dask-workers contradict each other; pass one of them")
    if opts.dask_workers is not None and opts.dask_workers < 1:
        raise ConfigError(f"`dask_workers` ({opts.dask_workers}) must be >= 1")
    if opts.workers is not None:
        raise ConfigError(
            "--workers sets local worker processes; with --scheduler or --dask-workers the dask "
            "workers compute (drop --workers)"
        )
    if opts.in_process:
        raise ConfigError("`in_process=True` contradicts a dask run (scheduler or dask_workers)")
    require_distributed()


def require_distributed() -> Any:
    """The ``distributed`` module; :class:`ConfigError` with the install command if absent."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(
            f"--scheduler and --dask-workers need dask.distributed, which is not installed "
            f"({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return distributed


def tta_param(tta: str) -> str | None:
    """``tta`` as a run records it in its parameters: None (not recorded) without augmentation,
    so outputs made before ``--tta`` existed resume as before."""
    return None if tta == "none" else tta


def resolve_compile(compile: bool | None, work_mpx: float) -> bool:
    """Whether a run that computes ``work_mpx`` output megapixels compiles its model (see
    RunOptions).

    Auto compiles from :data:`COMPILE_MIN_MPX` (where compiling pays, see
    docs/architecture.md, Measured choices).
    """
    return work_mpx >= COMPILE_MIN_MPX if compile is None else bool(compile)


def default_read_threads(cores: int) -> int:
    """Reader threads of a run on ``cores`` usable cores when none are asked for: a quarter of
    the cores, at least 2. Reading, writing and quantising a 572 px tile take ~10 ms of CPU
    against ~70 ms for its eager forward pass (benchmarks/RESULTS.md), so a quarter of the
    cores keeps the network fed with room to spare; two keep a block read ahead while another
    decodes.

    >>> [default_read_threads(c) for c in (1, 2, 8, 16, 64)]
    [2, 2, 2, 4, 16]
    """
    return max(2, cores // 4)
