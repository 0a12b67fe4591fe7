"""``tilesegment predict``: segment ordinary images (PNG, JPEG, BMP, TIFF...) into plain files.

One process, the model loaded once for every image (:class:`~tilesegment.infer.image.
ImageSegmenter`, the tiles and stream of ``tilesegment run``). Per image ``dir/NAME.ext`` the
folder OUTDIR receives:

* ``NAME.png``: the class mask (two classes: 0/255 gray; more: a palette PNG of class ids in the
  model's colours);
* ``NAME.instances.tif`` with ``--instances``: instance ids (uint16, or uint32 beyond 65535
  instances) as ``tilesegment export`` makes them;
* ``NAME.probabilities.tif`` with ``--probabilities``: (C, Y, X) probabilities, uint8 or
  float32 (``--dtype``);
* ``NAME.overlay.png`` with ``--overlay``: the image with the mask's class outlines.

Names are checked before any image is read: two images that would write the same file, an
output that would replace an input, and existing outputs without ``--overwrite`` are refused.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tilesegment.cli.batch import describe_failure, expand_slides, slide_stem
from tilesegment.cli.exits import Command
from tilesegment.cli.options import (
    device_option,
    dtype_option,
    model_option,
    overwrite_option,
    precision_option,
    progress_option,
    set_threads,
    show_progress,
    single_device,
    threads_option,
    tile_size_option,
    tta_option,
)
from tilesegment.cli.outcome import sigterm_interrupts
from tilesegment.errors import ConfigError

if TYPE_CHECKING:
    from tilesegment.infer.image import ImagePrediction, ImageSegmenter
    from tilesegment.model.checkpoint import ModelSpec
    from tilesegment.store.flat import Writer

log = logging.getLogger("tilesegment")

#: Files a folder argument contributes (searched recursively, hidden names skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: What each output is called: OUTDIR/<stem><suffix>.
MASK = ".png"
INSTANCES = ".instances.tif"
PROBABILITIES = ".probabilities.tif"
OVERLAY = ".overlay.png"


@dataclass(frozen=True, slots=True)
class Outputs:
    """Which files ``predict`` writes per image, and how."""

    instances: bool
    probabilities: bool
    overlay: bool
    dtype: str
    """Probability TIFF dtype: uint8 (``rint(p * 255)``) or float32."""

    def suffixes(self) -> list[str]:
        chosen = (True, self.instances, self.probabilities, self.overlay)
        names = (MASK, INSTANCES, PROBABILITIES, OVERLAY)
        return [s for s, on in zip(names, chosen, strict=True) if on]


def _in_folder(path: Path, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def images_in(folder: Path, *, exclude: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by path; hidden names and ``exclude``
    skipped).

    Raises
    ------
    ConfigError
        The folder holds no image file.
    """
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and not (exclude and _in_folder(Path(root, d), exclude))
        )
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(root, name))
    if not found:
        raise ConfigError(
            f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below; "
            "give image files, a folder of them or a pattern"
        )
    return sorted(found)


def expand_images(args: tuple[str, ...], outdir: Path) -> list[Path]:
    """The images named by IMAGE arguments: paths, folders (searched recursively, ``outdir``
    left out), shell-style patterns and ``@LIST`` files, in order, each once."""
    found: list[Path] = []
    for path in expand_slides(args):
        found += images_in(path, exclude=outdir) if path.is_dir() else [path]
    seen: set[str] = set()
    unique = []
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def plan_outputs(
    images: list[Path], outdir: Path, outputs: Outputs, *, overwrite: bool
) -> list[dict[str, Path]]:
    """Per image, its output files by suffix: ``OUTDIR/<stem><suffix>``.

    Raises
    ------
    ConfigError
        Two images would write the same file (same stem in two folders), an output would
        replace an input image, or an output exists and ``overwrite`` is False.
    """
    plans = [{s: outdir / f"{slide_stem(p)}{s}" for s in outputs.suffixes()} for p in images]
    writers: dict[str, list[Path]] = {}
    for image, files in zip(images, plans, strict=True):
        for target in files.values():
            writers.setdefault(os.path.abspath(target), []).append(image)
    for target, sources in writers.items():
        if len(sources) > 1:
            raise ConfigError(
                f"{', '.join(map(str, sources))} would all write {target}; rename them, or "
                "predict them into different -o folders"
            )
    for image in images:
        if os.path.abspath(image) in writers:
            raise ConfigError(
                f"{image} is an input image and would be replaced by an output; choose "
                "another -o folder"
            )
    existing = [Path(t) for t in writers if os.path.lexists(t)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ConfigError(
            f"{existing[0]} already exists{more}; pass --overwrite to replace, or choose "
            "another -o folder"
        )
    return plans


def image_writers(
    prediction: ImagePrediction, files: dict[str, Path], outputs: Outputs, spec: ModelSpec
) -> dict[Path, Writer]:
    """The writers of one image's files (``files``: output path by suffix); instances as
    ``run --geojson`` makes them for ``spec`` (seeded growth when the model declares it)."""
    import numpy as np

    from tilesegment.infer.preview import overlay
    from tilesegment.postprocess import instance_ids
    from tilesegment.store import quantise
    from tilesegment.store.flat import array_tiff, mask_png, rgb_png

    mpp = prediction.mpp
    colours = spec.class_colours
    writers = {files[MASK]: mask_png(prediction.mask, colours)}
    if outputs.instances:
        ids, count = instance_ids(prediction.mask, mpp, seeded=spec.instances)
        dtype = np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32
        writers[files[INSTANCES]] = array_tiff(ids.astype(dtype), axes="YX", mpp=mpp)
    if outputs.probabilities:
        probs = quantise(prediction.probabilities, np.dtype(outputs.dtype))
        writers[files[PROBABILITIES]] = array_tiff(probs, axes="CYX", mpp=mpp)
    if outputs.overlay:
        writers[files[OVERLAY]] = rgb_png(overlay(prediction.pixels, prediction.mask, colours))
    return writers


@click.command(cls=Command)
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option(
    "-o",
    "--output",
    "outdir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder that receives <stem>.png per image (and the files asked for below).",
)
@model_option(default="nuclei-he")
@click.option("--instances", is_flag=True, help="Also write <stem>.instances.tif (instance ids).")
@click.option(
    "--probabilities",
    is_flag=True,
    help="Also write <stem>.probabilities.tif, (classes, Y, X) in --dtype.",
)
@dtype_option()
@click.option(
    "--overlay", is_flag=True, help="Also write <stem>.overlay.png (class outlines on the image)."
)
@click.option(
    "--mpp",
    type=click.FloatRange(0, min_open=True),
    help="The images' um/px, when the files lack it or state it wrongly (a model with a "
    "downsample shrinks images by it whatever their um/px: then this only labels the TIFFs).",
)
@tile_size_option(default=None, help="Input tile edge in px (a valid U-Net input size).")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@device_option(several=False)
@precision_option(auto=True, default="auto")
@tta_option()
@threads_option()
@overwrite_option("output files")
@progress_option()
def predict(
    images: tuple[str, ...],
    outdir: Path,
    model_path: Path,
    instances: bool,
    probabilities: bool,
    dtype: str,
    overlay: bool,
    mpp: float | None,
    tile_size: int | None,
    batch_size: int,
    device: str,
    precision: str,
    tta: str,
    threads: int | None,
    overwrite: bool,
    progress: bool | None,
) -> None:
    """Segment IMAGEs (PNG, JPEG, BMP, GIF, WebP, TIFF) into OUTDIR/<stem>.png masks.

    IMAGE is a file, a folder (its image files, searched recursively), a quoted shell-style
    pattern ('data/*.png', '**' recurses) or @LIST (a text file, one path or pattern per line).
    The model is loaded once; each image is tiled, resampled to the model's um/px (or shrunk
    by its downsample) and back,
    and predicted exactly as `tilesegment run --tissue none` would (the mask equals the run's
    labels/mask). Two classes give 0/255 masks, more a palette PNG of class ids in the
    model's colours.

    Names are checked first: two images with the same stem, or existing outputs without
    --overwrite, are refused before anything is read. An image that fails is reported in one
    line and skipped; a summary ends the command, with exit code 1 if any image failed.

    \b
    Examples:
      tilesegment predict tiles/ -o masks
      tilesegment predict 'ph2/**/*_Dermoscopic_Image/*.bmp' -o masks --overlay
      tilesegment predict @test.txt -o out --model membrane-em --probabilities --dtype float32
    """
    from tilesegment.infer.image import ImageSegmenter
    from tilesegment.infer.options import RunOptions

    outputs = Outputs(instances, probabilities, overlay, dtype)
    if outdir.exists() and not outdir.is_dir():
        raise click.UsageError(f"-o {outdir}: exists and is not a folder; give a folder")
    paths = expand_images(images, outdir)
    plans = plan_outputs(paths, outdir, outputs, overwrite=overwrite)
    set_threads(threads)
    opts = RunOptions(
        tile_size=tile_size,
        batch_size=batch_size,
        mpp=mpp,
        device=single_device(device),
        precision=precision,
        tta=tta,
        progress=show_progress(progress),
    )
    segmenter = ImageSegmenter(model_path, opts)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"{outdir}: cannot create the output folder ({exc})") from exc
    failed = _predict_all(segmenter, paths, plans, outputs, opts.progress)
    _summary(len(paths), failed, outdir)


def _predict_all(
    segmenter: ImageSegmenter,
    paths: list[Path],
    plans: list[dict[str, Path]],
    outputs: Outputs,
    progress: bool,
) -> list[Path]:
    """Predict and write every image; returns the images that failed. Ctrl-C or SIGTERM stop
    after removing the current image's partial files (exit 130 or 143)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from tilesegment.infer.record import progress_bar
    from tilesegment.store.flat import write_together

    spec = segmenter.spec
    failed: list[Path] = []
    assumed = False
    i = 0
    with (
        sigterm_interrupts() as terminated,
        progress_bar(len(paths), progress, unit="image") as bar,
        logging_redirect_tqdm(),
    ):
        try:  # i is read by the interrupt handler below
            for i, (path, files) in enumerate(zip(paths, plans, strict=True)):  # noqa: B007
                try:
                    prediction = segmenter.segment(path)
                    if prediction.mpp_assumed and not assumed:
                        assumed = True
                        log.warning(
                            "%s has no um/px; images without one are taken to be at the "
                            "model's %.4g um/px (pass --mpp to state it)",
                            path,
                            spec.mpp,
                        )
                    write_together(image_writers(prediction, files, outputs, spec))
                except Exception as exc:  # reported, counted, and the others go on
                    log.debug("%s failed", path, exc_info=True)
                    failed.append(path)
                    bar.write(f"failed: {describe_failure(exc, path)}", file=sys.stderr)
                bar.update(1)
        except KeyboardInterrupt:
            bar.close()
            click.echo(
                f"stopped at image {i + 1} of {len(paths)} ({paths[i]}): {i - len(failed)} "
                f"written, {len(failed)} failed",
                err=True,
            )
            sys.exit(143 if terminated else 130)
    return failed


def _summary(n: int, failed: list[Path], outdir: Path) -> None:
    """The closing line; exit code 1 when any image failed."""
    counts = f"{n - len(failed)} of {n} images written to {outdir}"
    if failed:
        click.echo(
            f"predict: {counts}; {len(failed)} failed: {', '.join(map(str, failed))}", err=True
        )
        sys.exit(1)
    click.echo(f"predict: {counts}", err=True)
