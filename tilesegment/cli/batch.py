"""Many slides in one ``tilesegment run``: expand the SLIDE arguments, name the outputs, run
them one after the other (a failed slide is reported and the batch goes on).

The command line decides between two forms from the arguments alone (:func:`is_batch`):

* one plain path: a single run into ``-o OUT.zarr``, exactly as before;
* several arguments, or any shell-style glob or ``@LIST`` file: a batch. ``-o`` names a
  folder and slide ``dir/NAME.svs`` is written to ``OUTDIR/NAME.zarr`` (:func:`slide_stem`).

Everything here is checked before the first slide is read, so a typo in a pattern or two
slides that would write the same output are refused up front (:class:`ConfigError`). Whether
a slide is readable is left to the run, which reports it per slide and goes on.
:func:`finished` lets a resumed batch skip complete outputs without opening their slides.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tilesegment.cli.exits import one_line
from tilesegment.cli.outcome import echo_summary, export_instances, sigterm_interrupts
from tilesegment.errors import ConfigError, StoreError, TilesegmentError

if TYPE_CHECKING:
    from tilesegment.infer.options import RunOptions

log = logging.getLogger("tilesegment")

#: Characters that make a SLIDE argument a shell-style pattern (``glob`` syntax).
GLOB_CHARS = frozenset("*?[")

#: Compound suffixes removed whole from slide names: ``a.ome.tif`` -> ``a``.
_COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One slide of a batch and the files its run writes."""

    slide: Path
    """The slide as named on the command line (or in the list file, made relative to it)."""
    output: Path
    """``OUTDIR/<stem>.zarr``."""
    geojson: Path | None
    """``GEOJSON_DIR/<stem>.geojson``, or None when no GeoJSON was asked for."""


def is_pattern(arg: str) -> bool:
    """Whether ``arg`` is a glob pattern rather than a path that exists as written.

    >>> is_pattern("slides/*.svs"), is_pattern("slides/a.svs")
    (True, False)
    """
    return any(c in GLOB_CHARS for c in arg) and not os.path.lexists(arg)


def is_batch(args: Sequence[str]) -> bool:
    """Whether the SLIDE arguments ask for a batch (``-o`` is then a folder).

    A batch is several arguments, or one that is a glob pattern or an ``@LIST`` file, even if
    it names a single slide: the form of the command, not the number of matches, decides
    what ``-o`` means.

    >>> is_batch(["a.svs"]), is_batch(["a.svs", "b.svs"]), is_batch(["@slides.txt"])
    (False, True, True)
    """
    return len(args) != 1 or args[0].startswith("@") or is_pattern(args[0])


def slide_stem(path: str | os.PathLike[str]) -> str:
    """The name of a slide without its extension: the stem of its outputs.

    >>> slide_stem("/data/CMU-1.svs"), slide_stem("b.ome.tiff"), slide_stem("c.zarr/")
    ('CMU-1', 'b', 'c')
    """
    name = Path(path).name
    for suffix in _COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def read_list(path: Path) -> list[str]:
    """The entries of a slide list: one path or pattern per line.

    Blank lines are ignored, and ``#`` starts a comment at the start of a line or after
    whitespace. Relative entries are relative to the list file's folder, so a list works
    from any working directory.

    Raises
    ------
    ConfigError
        The list cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"@{path}: cannot read the slide list ({exc}); give a text file, one path per line"
        ) from exc
    entries = []
    for line in text.splitlines():
        entry = _strip_comment(line).strip()
        if entry:
            entries.append(str(path.parent / entry) if not os.path.isabs(entry) else entry)
    return entries


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    for i, c in enumerate(line):
        if c == "#" and line[i - 1].isspace():
            return line[:i]
    return line


def expand_slides(args: Sequence[str]) -> list[Path]:
    """The slides named by SLIDE arguments, in order, each once.

    Parameters
    ----------
    args : sequence of str
        Paths, shell-style glob patterns (``*``, ``?``, ``[...]``; ``**`` matches folders
        recursively; matches are sorted) and ``@LIST`` files (see :func:`read_list`; their
        entries may be patterns too). A path that exists as written is never a pattern.

    Returns
    -------
    list of Path
        Plain paths are kept even when they do not exist (the run reports them). A file
        named twice (by two patterns, say) is kept at its first place.

    Raises
    ------
    ConfigError
        A pattern matches nothing, a list cannot be read, or nothing is left.
    """
    found: list[Path] = []
    for arg in args:
        entries = read_list(Path(arg[1:])) if arg.startswith("@") else [arg]
        for entry in entries:
            if is_pattern(entry):
                matches = sorted(glob.glob(entry, recursive=True))
                if not matches:
                    where = f" (from {arg})" if entry != arg else ""
                    raise ConfigError(
                        f"{entry}{where}: no file matches this pattern; check it, and quote it "
                        "so the shell leaves it to tilesegment"
                    )
                found += [Path(m) for m in matches]
            else:
                found.append(Path(entry))
    if not found:
        raise ConfigError(f"{' '.join(args)}: names no slides; give paths, patterns or @LIST")
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = Path(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def plan_batch(
    slides: Sequence[Path], outdir: Path, geojson_dir: Path | None = None
) -> list[BatchItem]:
    """Name the outputs of ``slides``: ``OUTDIR/<stem>.zarr`` (+ ``GEOJSON_DIR/<stem>.geojson``).

    Raises
    ------
    ConfigError
        Two slides have the same stem, so they would write the same output.
    """
    by_stem: dict[str, list[Path]] = {}
    for slide in slides:
        by_stem.setdefault(slide_stem(slide), []).append(slide)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        stem, paths = next(iter(clashes.items()))
        more = f" (and {len(clashes) - 1} more clashes)" if len(clashes) > 1 else ""
        raise ConfigError(
            f"{', '.join(map(str, paths))} would all write {outdir / (stem + '.zarr')}{more}; "
            "rename them or run them into different -o folders"
        )
    return [
        BatchItem(
            slide=slide,
            output=outdir / f"{slide_stem(slide)}.zarr",
            geojson=None if geojson_dir is None else geojson_dir / f"{slide_stem(slide)}.geojson",
        )
        for slide in slides
    ]


def finished(item: BatchItem, expected: Mapping[str, Any]) -> bool:
    """Whether ``item.output`` is complete and was made from this slide with ``expected``.

    Reads the output's completion marker and run record, and no model. The slide must be the
    one recorded: same name and size, then (when the record has one) the same content
    fingerprint, which reads about 2 MiB of the slide (:mod:`tilesegment.infer.identity`), so
    a resumed batch passes over finished slides in milliseconds each. Every key of
    ``expected`` (run parameters such as ``model_sha256``, ``tile_size``, ``dtype``) must equal
    the recorded value. Anything else returns False, and the full run decides: it resumes, or
    refuses with a message naming the difference (another slide: both slides).
    """
    from tilesegment.infer.identity import same_slide
    from tilesegment.store import is_complete
    from tilesegment.store.resume import read_params

    if not is_complete(item.output):
        return False
    try:
        params = read_params(item.output)
    except StoreError:
        return False
    if params is None or not all(params.get(key) == value for key, value in expected.items()):
        return False
    return same_slide(params, item.slide, output=item.output)


# ---------------------------------------------------------------------------------------------
# running a batch


def _check_batch_paths(outdir: Path, geojson_dir: Path | None, tissue: str) -> None:
    """Refuse single-slide paths and options in a batch, before anything is read."""
    if outdir.suffix.lower() == ".zarr" or (outdir.exists() and not outdir.is_dir()):
        raise click.UsageError(
            f"-o {outdir}: with several slides -o names a folder that receives <stem>.zarr per "
            "slide; give a folder name such as -o results"
        )
    if geojson_dir is not None and (
        geojson_dir.suffix.lower() in (".geojson", ".json")
        or (geojson_dir.exists() and not geojson_dir.is_dir())
    ):
        raise click.UsageError(
            f"--geojson {geojson_dir}: with several slides --geojson names a folder that "
            "receives <stem>.geojson per slide (it may be the -o folder)"
        )
    if tissue not in ("auto", "none"):
        raise click.UsageError(
            f"--tissue {tissue}: one mask cannot serve several slides; use auto or none, "
            "or run each slide with its own mask"
        )


def _expected_params(model: Path, opts: RunOptions) -> dict[str, Any]:
    """Run parameters a complete output must have been made with, as recorded in its run.json.

    Loads the model once, which also refuses a bad checkpoint or tile size before the first
    slide instead of once per slide.
    """
    from tilesegment.infer.options import tta_param
    from tilesegment.infer.plan import resolve_tile_size
    from tilesegment.model.checkpoint import checkpoint_paths, file_sha256, load_checkpoint
    from tilesegment.store.layout import NGFF_04

    net, _ = load_checkpoint(model, device="cpu")
    tile_size = resolve_tile_size(net.geometry, opts.tile_size)
    expected: dict[str, Any] = {
        "model_sha256": file_sha256(checkpoint_paths(model)[0]),
        "dtype": opts.dtype,
        "tissue": opts.tissue,
        "tta": tta_param(opts.tta),  # None: recorded as absent
        # Recorded for NGFF 0.5 only (records of 0.4 outputs have no "format").
        "format": None if opts.format == NGFF_04 else opts.format,
    }
    if opts.tile_size is not None:  # the default shrinks to fit small images
        expected["tile_size"] = [tile_size, tile_size]
    if opts.level is not None:
        expected["level"] = opts.level
    if opts.precision != "auto":
        expected["precision"] = opts.precision
    return expected


def run_batch(
    args: tuple[str, ...], outdir: Path, geojson_dir: Path | None, model: Path, opts: RunOptions
) -> None:
    """Run every slide named by ``args`` into ``outdir``; report failures and go on."""
    from tilesegment.store.destinations import prepare_folder

    _check_batch_paths(outdir, geojson_dir, opts.tissue)
    items = plan_batch(expand_slides(args), outdir, geojson_dir)
    expected = _expected_params(model, opts)
    prepare_folder(outdir, option="-o")
    if geojson_dir is not None:
        prepare_folder(geojson_dir, option="--geojson")
    failed: list[Path] = []
    n, i = len(items), 0
    with sigterm_interrupts() as terminated:
        try:
            for i, item in enumerate(items, 1):
                click.echo(f"[{i}/{n}] {item.slide} -> {item.output}", err=True)
                try:
                    _run_item(item, model, opts, expected)
                except Exception as exc:  # reported, counted, and the batch goes on
                    log.debug("%s failed", item.slide, exc_info=True)
                    failed.append(item.slide)
                    reason = describe_failure(exc, item.slide, item.output)
                    click.echo(f"failed: {reason}", err=True)
        except KeyboardInterrupt as exc:
            click.echo(f"stopped: {items[i - 1].output}: {str(exc) or 'interrupted'}", err=True)
            succeeded = i - 1 - len(failed)
            click.echo(
                f"batch stopped at slide {i} of {n}: {succeeded} succeeded, {len(failed)} "
                f"failed, {n - i + 1} not done (run again with --resume)",
                err=True,
            )
            sys.exit(143 if terminated else 130)
    counts = f"{n - len(failed)} succeeded, {len(failed)} failed"
    if failed:
        click.echo(f"batch: {counts}: {', '.join(map(str, failed))}", err=True)
        sys.exit(1)
    click.echo(f"batch: {counts}", err=True)


def _run_item(item: BatchItem, model: Path, opts: RunOptions, expected: dict[str, Any]) -> None:
    """One slide of a batch: skip it if finished, else run it; then its GeoJSON if asked."""
    from tilesegment.infer.run import run_slide

    complete = opts.resume and finished(item, expected)
    if complete:
        click.echo(f"done: {item.output} was already complete; skipped", err=True)
    else:
        summary = run_slide(item.slide, item.output, model, opts)
        complete = bool(summary.extra.get("already_complete"))
        if complete:
            click.echo(f"done: {item.output} was already complete; nothing to resume", err=True)
        else:
            echo_summary(summary)
    if item.geojson is not None and not (complete and item.geojson.exists()):
        export_instances(item.output, item.geojson)


_WRITE_ADVICE = {
    "no space": "free space, then rerun with --resume",
    "not writable": "choose a writable folder",
}


def describe_failure(exc: Exception, slide: Path, output: Path | None = None) -> str:
    """One line for a failed slide or image, starting with its path; unexpected errors name
    their type, and a failure to write ``output`` says how to fix it."""
    from tilesegment.store.destinations import write_failure

    failure = write_failure(exc, output) if output is not None else None
    if failure is not None:
        kind, message = failure
        message = f"{message}; {_WRITE_ADVICE[kind]}"
    else:
        message = one_line(exc)
        if not isinstance(exc, TilesegmentError):
            message = f"{type(exc).__name__}: {message} (rerun with --log-level debug for details)"
    return message if message.startswith(str(slide)) else f"{slide}: {message}"
