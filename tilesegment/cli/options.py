"""Options that several commands take, defined once so that an option means the same thing on
every command (help text, type, validation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tilesegment.cli.exits import exit_codes

F = Callable[..., Any]

LABEL_KINDS = click.Choice(["binary", "classes", "instances"])
"""``--label-kind``: what label images hold."""
EXISTING = click.Path(exists=True, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _resolve_model(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    from tilesegment.model.registry import resolve_model

    if value is None:
        return None
    with exit_codes():  # parsed before the command's own mapping applies
        return resolve_model(value)


def model_option(*, default: str | None = None) -> Callable[[F], F]:
    """``--model NAME|PATH``: a shipped model name (see ``tilesegment models``) or a checkpoint
    path (NAME, NAME.json or NAME.safetensors), resolved to the checkpoint's path."""
    return click.option(
        "--model",
        "model_path",
        default=default,
        required=default is None,
        show_default=default is not None,
        callback=_resolve_model,
        help="A shipped model name (see `tilesegment models`) or a checkpoint path "
        "(NAME, NAME.json or NAME.safetensors).",
    )


def images_option() -> Callable[[F], F]:
    """``--images``: a stack (TIFF, .npy, .npz), a DSB2018 folder or a tree of images."""
    return click.option(
        "--images",
        type=EXISTING,
        help="Image stack (TIFF, .npy, .npz) or folder, searched recursively (PNG, TIFF, JPEG, "
        "BMP, GIF, ...; DSB2018 <id>/images + <id>/masks). Not needed with a list of "
        "image<TAB>label pairs.",
    )


def labels_option() -> Callable[[F], F]:
    """``--labels``: the label stack or tree; default the images' tree."""
    return click.option(
        "--labels",
        type=EXISTING,
        help="Label stack or folder [default: the --images folder]. Labels are matched by the "
        "image stem, plus _mask, _masks, _label, _labels, _lesion, _segmentation, _seg, _gt, "
        "_anno or _manual1 (or --label-pattern).",
    )


def label_pattern_option() -> Callable[[F], F]:
    """``--label-pattern``: the label file name of an image, as a template with ``{stem}``."""
    return click.option(
        "--label-pattern",
        metavar="TEMPLATE",
        help="Label file name of image STEM, e.g. '{stem}_GT.png' or 'mask_{stem}.*' (instead "
        "of the recognised suffixes).",
    )


def device_option(*, several: bool) -> Callable[[F], F]:
    """``--device``: cpu, cuda, cuda:N or auto (every GPU, else the CPU); with ``several``
    also a comma-separated list (one worker process per device) and the spelling
    ``--devices``."""
    names = ("--devices", "--device") if several else ("--device",)
    extra = " A comma-separated list (cuda:0,cuda:1) runs one worker process per device." * several
    return click.option(
        *names,
        "device",
        default="cpu",
        show_default=True,
        help="cpu, cuda, cuda:N or auto (every GPU, else the CPU)." + extra,
    )


def precision_option(*, auto: bool, default: str) -> Callable[[F], F]:
    """``--precision``: fp32, bf16, fp16 (CUDA only) and, for inference, auto."""
    choices = ["auto", "fp32", "bf16", "fp16"] if auto else ["fp32", "bf16", "fp16"]
    text = "Autocast precision; fp16 needs CUDA."
    if auto:
        text += (
            " auto: bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), else fp32; bf16 (else"
            " fp16) on CUDA."
        )
    return click.option(
        "--precision", type=click.Choice(choices), default=default, show_default=True, help=text
    )


def dtype_option() -> Callable[[F], F]:
    """``--dtype``: the type probabilities are written as, uint8 ``rint(p * 255)`` or float32."""
    return click.option(
        "--dtype",
        type=click.Choice(["uint8", "float32"]),
        default="uint8",
        show_default=True,
        help="Stored probability type.",
    )


def tta_option() -> Callable[[F], F]:
    """``--tta``: test-time augmentation (see :data:`tilesegment.geometry.TTA_MODES`)."""
    return click.option(
        "--tta",
        type=click.Choice(["none", "flips", "d4"]),
        default="none",
        show_default=True,
        help="Test-time augmentation: average the class probabilities over flips (4 forward "
        "passes: identity, both mirrors, 180° rotation) or d4 (8: every flip and 90° rotation). "
        "Costs 4x or 8x the compute; the output still does not depend on the tile size.",
    )


def threads_option() -> Callable[[F], F]:
    """``--threads``: torch CPU threads of the process."""
    return click.option("--threads", type=click.IntRange(1), help="torch CPU threads per process.")


def mpp_option(help: str) -> Callable[[F], F]:
    """``--mpp``: µm/px of the input, a positive float; ``help`` says what it overrides."""
    return click.option("--mpp", type=click.FloatRange(0, min_open=True), help=help)


def progress_option() -> Callable[[F], F]:
    """``--progress/--no-progress``: a progress bar on stderr, by default when it is a tty."""
    return click.option(
        "--progress/--no-progress", default=None, help="Progress bar (default: on a tty)."
    )


def json_option() -> Callable[[F], F]:
    """``--json``: machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def overwrite_option(what: str) -> Callable[[F], F]:
    """``--overwrite``: replace an existing ``what``."""
    return click.option("--overwrite", is_flag=True, help=f"Replace an existing {what}.")


def tile_size_option(*, default: int | None, help: str) -> Callable[[F], F]:
    """``--tile-size``: the U-Net's input edge in px (a valid input size)."""
    return click.option(
        "--tile-size",
        type=click.IntRange(1),
        default=default,
        show_default=default is not None,
        help=help,
    )


def single_device(device: str) -> str:
    """``--device`` of a command that uses one device: ``auto`` becomes the first GPU, else the
    CPU; other values are checked as for ``run``."""
    from tilesegment.errors import ConfigError
    from tilesegment.infer.devices import resolve_devices

    with exit_codes():
        if "," in device:
            raise ConfigError(f"--device {device}: this command uses one device")
        return resolve_devices(device)[0]


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (before the command starts torch's thread pool)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def show_progress(progress: bool | None) -> bool:
    """``--progress`` resolved: a bar when asked, by default when stderr is a terminal."""
    import sys

    return sys.stderr.isatty() if progress is None else progress
