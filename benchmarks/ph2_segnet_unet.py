"""Benchmark: a SegNet-style encoder-decoder vs tilesegment's valid U-Net on PH2 (issue 12, item 5).

The PH2 tutorials compare SegNet with U-Net on dermoscopy lesions. Here both are trained on the
same 32 cases of the fixed split (``workflows/models/splits/ph2-train.txt``) with the same budget
and scored on the same 8 held-out cases (``ph2-val.txt``) by the same metric code.

Budget
    The same number of optimizer steps of the same batch size (default 1500 x 2 in epochs of
    75, the lesion-derm recipe of ``workflows/models/train-tutorial.sh``: with seed 0 the
    U-Net arm draws the same crops as lesion-derm's run). The seconds each arm
    spent are recorded beside the steps: the optimizer steps alone, and the training loop with
    the crop sampling and augmentation.
U-Net (the product)
    ``tilesegment.train.loop.run_training``, i.e. ``tilesegment train``: depth 4, 16 base
    channels, 572 px crops (388 px supervised output), Adam lr 1e-3 with the cosine schedule,
    weighted cross-entropy (border weights w0 = 10, sigma = 5, class balance), flips, rotations,
    scale, intensity and blur jitter, elastic deformation (sigma 10 px), HED stain jitter off
    (not H&E). No validation split: the last weights are scored.
SegNet (Badrinarayanan et al. 2017; written here, not in the package)
    VGG16's encoder layout, 5 blocks of 2, 2, 3, 3, 3 same-padded 3x3 convolutions each
    followed by batch norm and ReLU, at a quarter of VGG's width (16, 32, 64, 128, 128
    channels); 2x2 max pooling that keeps its indices, and the mirrored decoder: max unpooling
    with the encoder's indices, then convolutions + batch norm + ReLU, the last convolution
    giving the class scores. Trained on the same seeded crops (``CropSampler`` with halo 0: the
    same images, (epoch, index) draws and augmentation), the same weight maps and loss
    ``sum(w * CE) / sum(w)``, Adam, schedule and gradient clipping. Its crops are the U-Net's
    supervised window rounded down to its pooling grid (384 px): both arms learn from the same
    labelled pixels per step; the U-Net's extra 92 px per side are context it needs.
Scoring
    Foreground Dice and IoU (``tilesegment.train.scores.evaluate_pair``), the mean over images
    and pooled (summed confusion matrix), on each image's own full grid: SegNet on the whole
    image mirror-padded at the bottom and right to a multiple of 2**depth, the U-Net through
    tilesegment's whole-image predict (``predict_image``: mirror-padded by its halo, one pass).
    Neither model's checkpoint is chosen on the held-out cases. Inference time: seconds per
    image (median), fp32, the same threads.

Usage::

    python benchmarks/ph2_segnet_unet.py [--steps 1500] [--threads 2] [--out DIR] [--seed 0]
    python benchmarks/ph2_segnet_unet.py --smoke --out /tmp/ph2-smoke   # seconds, tiny

``--smoke``: 2 training cases, 1 held-out case, depth-2 networks of width 4, 2 steps of 1 crop
(``tests/test_ph2_segnet_unet.py`` runs it). Prints a Markdown table and writes
``OUT/results.md`` and ``OUT/results.json`` (the U-Net run is in ``OUT/unet``, SegNet's weights
in ``OUT/segnet.safetensors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SPLITS = ROOT / "workflows" / "models" / "splits"
PH2 = Path("ph2") / "PH2 Dataset images"


@dataclass(frozen=True, slots=True)
class Settings:
    """Network sizes and data of one comparison (full or smoke)."""

    unet_depth: int = 4
    unet_base: int = 16
    unet_tile: int = 572
    segnet_convs: tuple[int, ...] = (2, 2, 3, 3, 3)
    segnet_base: int = 16
    batch_size: int = 2
    steps_per_epoch: int = 75
    train_cases: int | None = None
    """Use only the first N names of the training list (None: all)."""
    val_cases: int | None = None


FULL = Settings()
SMOKE = Settings(
    unet_depth=2,
    unet_base=4,
    unet_tile=140,
    segnet_convs=(1, 2),
    segnet_base=4,
    batch_size=1,
    steps_per_epoch=2,
    train_cases=2,
    val_cases=1,
)


# ------------------------------------------------------------------------------ SegNet
def _convs(channels: Sequence[int], *, plain_last: bool = False) -> nn.Sequential:
    """3x3 same-padded convolutions through ``channels``, each + batch norm + ReLU (the last
    one bare when ``plain_last``: the class scores)."""
    layers: list[nn.Module] = []
    pairs = list(itertools.pairwise(channels))
    for i, (cin, cout) in enumerate(pairs):
        if plain_last and i == len(pairs) - 1:
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
        else:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al. 2017): (N, C, H, W) -> logits (N, classes, H, W).

    Encoder block ``i`` has ``convs[i]`` convolutions of ``base * 2**min(i, 3)`` channels (the
    VGG16 layout at ``base / 64`` of its width), then 2x2 max pooling whose indices the mirrored
    decoder block uses to unpool. H and W must be multiples of :attr:`pooling`.
    """

    def __init__(self, in_channels: int, classes: int, *, base: int, convs: Sequence[int]):
        super().__init__()
        widths = [base * 2 ** min(i, 3) for i in range(len(convs))]
        self.pooling = 2 ** len(convs)
        self.encoder = nn.ModuleList()
        cin = in_channels
        for width, n in zip(widths, convs, strict=True):
            self.encoder.append(_convs([cin] + [width] * n))
            cin = width
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(convs))):
            out = widths[i - 1] if i > 0 else classes
            self.decoder.append(_convs([widths[i]] * convs[i] + [out], plain_last=i == 0))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # He et al., as SegNet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for block in self.encoder:
            x = block(x)
            sizes.append(x.shape[-2:])
            x, where = F.max_pool2d(x, 2, return_indices=True)
            indices.append(where)
        for block, where, size in zip(self.decoder, indices[::-1], sizes[::-1], strict=True):
            x = block(F.max_unpool2d(x, where, 2, output_size=size))
        return x


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class Normalise:
    """uint8 (N, C, H, W) -> float, as tilesegment's trainer and Predictor normalise."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) * self.inv_std


def train_segnet(
    net: SegNet, crops: Any, normalise: Normalise, *, steps: int, cfg: Any
) -> dict[str, Any]:
    """SegNet's training loop: tilesegment's crops, weighted loss, optimizer and schedule."""
    from tilesegment.train.loop import learning_rate

    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.peak_lr)
    net.train()
    step_seconds, losses = [], []
    start = time.perf_counter()
    for step in range(steps):
        epoch, i = divmod(step, cfg.steps_per_epoch)
        first = i * cfg.batch_size
        batch = [crops.sample(epoch, first + j) for j in range(cfg.batch_size)]
        image = torch.from_numpy(np.stack([b[0] for b in batch]).transpose(0, 3, 1, 2))
        target = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
        weights = torch.from_numpy(np.stack([b[2] for b in batch]))
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, cfg.peak_lr, cfg.lr_schedule)
        ce = F.cross_entropy(net(normalise(image)), target, reduction="none")
        loss = (weights * ce).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        step_seconds.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    last_epoch = losses[-min(cfg.steps_per_epoch, len(losses)) :]
    return {
        "loop_seconds": time.perf_counter() - start,
        "step_seconds": sum(step_seconds),
        "median_step_seconds": statistics.median(step_seconds),
        "last_epoch_loss": float(np.mean(last_epoch)),
    }


@torch.inference_mode()
def segnet_probabilities(net: SegNet, normalise: Normalise, image: np.ndarray) -> np.ndarray:
    """(classes, H, W) of the whole image, mirror-padded bottom/right to the pooling grid."""
    from tilesegment.geometry import PAD_MODE

    h, w = image.shape[:2]
    pads = ((0, -h % net.pooling), (0, -w % net.pooling), (0, 0))
    padded = np.pad(image, pads, mode=PAD_MODE)
    x = normalise(torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None])
    return torch.softmax(net(x), dim=1)[0, :, :h, :w].numpy()


# ------------------------------------------------------------------------------ the two arms
def train_config(args: argparse.Namespace, settings: Settings, lists: tuple[Path, Path]) -> Any:
    """The U-Net's ``tilesegment train`` options (the lesion-derm recipe, without validation)."""
    from tilesegment.train.config import TrainConfig

    return TrainConfig(
        run_dir=args.out / "unet",
        images=args.data / PH2,
        train_list=lists[0],
        val_fraction=0.0,
        label_kind="binary",
        class_names=("background", "lesion"),
        depth=settings.unet_depth,
        base_channels=settings.unet_base,
        tile_size=settings.unet_tile,
        batch_size=settings.batch_size,
        epochs=args.steps // settings.steps_per_epoch,
        steps_per_epoch=settings.steps_per_epoch,
        optimizer="adam",
        lr=1e-3,
        lr_schedule="cosine",
        elastic_sigma=10.0,
        hed_scale=0.0,
        hed_shift=0.0,
        seed=args.seed,
        name="ph2-unet",
        overwrite=True,
    )


def run_unet(cfg: Any) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray], int]:
    """Train the U-Net with tilesegment; (timings, whole-image predict, parameter count)."""
    from tilesegment.infer.predict import Predictor, predict_image
    from tilesegment.model.checkpoint import load_checkpoint
    from tilesegment.train.loop import run_training

    start = time.perf_counter()
    summary = run_training(cfg)
    wall = time.perf_counter() - start
    rows = [r for r in summary.history if r["train_loss"] is not None]
    per_epoch = [r["seconds"] / cfg.steps_per_epoch for r in rows]
    timings = {
        "wall_seconds": wall,
        "loop_seconds": sum(r["seconds"] for r in rows),
        "step_seconds": summary.seconds_per_step * summary.global_step,
        "median_epoch_seconds_per_step": statistics.median(per_epoch),
        "last_epoch_loss": rows[-1]["train_loss"],
        "steps": summary.global_step,
    }
    net, spec = load_checkpoint(summary.last_path)
    predictor = Predictor(net, spec, precision="fp32")
    return timings, lambda image: predict_image(image, predictor), parameters(net)


def run_segnet(
    cfg: Any, data: Any, settings: Settings, out: Path
) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray], int]:
    """Train SegNet on the U-Net's crops; (timings, whole-image predict, parameter count)."""
    from safetensors.torch import save_file

    from tilesegment.train.sampling import CropSampler, augment_options

    torch.manual_seed(cfg.seed)
    net = SegNet(
        data.channels, len(data.class_names), base=settings.segnet_base, convs=settings.segnet_convs
    )
    tile = segnet_tile(settings)
    crops = CropSampler(
        data.train,
        tile=tile,
        halo=0,
        pooling=net.pooling,
        seed=cfg.seed,
        augment=augment_options(cfg),
    )
    normalise = Normalise(data.mean, data.std)
    steps = cfg.epochs * cfg.steps_per_epoch
    start = time.perf_counter()
    timings = train_segnet(net, crops, normalise, steps=steps, cfg=cfg)
    timings.update(wall_seconds=time.perf_counter() - start, steps=steps, tile=tile)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "segnet.safetensors")
    net.eval()
    return timings, lambda image: segnet_probabilities(net, normalise, image), parameters(net)


def segnet_tile(settings: Settings) -> int:
    """The U-Net's supervised window rounded down to SegNet's pooling grid (388 -> 384)."""
    from tilesegment.geometry import UNetGeometry

    output = UNetGeometry.of(settings.unet_depth).output_size(settings.unet_tile)
    pooling = 2 ** len(settings.segnet_convs)
    return output - output % pooling


def score(items: Sequence[Any], predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Foreground Dice and IoU per image, their mean and pooled forms, seconds per image."""
    from tilesegment.train.evaluate import labels_from_probabilities
    from tilesegment.train.scores import evaluate_pair, mean_scores, pooled_scores

    rows, seconds = [], []
    for it in items:
        t0 = time.perf_counter()
        probs = predict(it.image)
        seconds.append(time.perf_counter() - t0)
        pred = labels_from_probabilities(probs, "binary")
        rows.append({"name": it.name, **evaluate_pair(pred, it.truth, "binary")})
    mean, pooled = mean_scores(rows), pooled_scores(rows, "binary")
    keys = ("foreground_dice", "foreground_iou")
    return {
        "mean": {k: mean[k] for k in keys},
        "pooled": {k: pooled[k] for k in keys},
        "images": [{"name": r["name"], **{k: r[k] for k in keys}} for r in rows],
        "inference_seconds": seconds,
        "median_inference_seconds": statistics.median(seconds),
    }


# ------------------------------------------------------------------------------ report
def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table, then Dice per held-out case."""
    s, u = result["segnet"], result["unet"]
    batch, n = result["batch_size"], result["held_out"]
    rows = [
        ("parameters", *_both(result, lambda a: f"{a['parameters']:,}")),
        ("crop (input -> supervised px)", "{0} -> {0}".format(s["tile"]), u["crop"]),
        ("optimizer steps x batch", *_both(result, lambda a: f"{a['steps']} x {batch}")),
        (
            "training loop s (with crop sampling)",
            *_both(result, lambda a: f"{a['loop_seconds']:.1f}"),
        ),
        ("optimizer steps s", *_both(result, lambda a: f"{a['step_seconds']:.1f}")),
        (
            "s/step (optimizer step, mean)",
            *_both(result, lambda a: f"{a['step_seconds'] / a['steps']:.3f}"),
        ),
        ("last epoch's training loss", *_both(result, lambda a: f"{a['last_epoch_loss']:.4f}")),
    ]
    for key, label in (("foreground_dice", "Dice"), ("foreground_iou", "IoU")):
        rows.append((f"{label}, mean of {n} images", *_both(result, _score("mean", key))))
        rows.append((f"{label}, pooled", *_both(result, _score("pooled", key))))
    median = _score("median_inference_seconds", None)
    rows.append(("inference s/image (median, whole image)", *_both(result, median)))
    lines = ["| | SegNet (same padding, BN, pooling indices) | U-Net (valid, tilesegment) |"]
    lines.append("|---|---:|---:|")
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| held-out case | SegNet Dice | U-Net Dice |", "|---|---:|---:|"]
    for a, b in zip(s["scores"]["images"], u["scores"]["images"], strict=True):
        lines.append(f"| {a['name']} | {a['foreground_dice']:.4f} | {b['foreground_dice']:.4f} |")
    return "\n".join(lines)


def _both(result: dict[str, Any], cell: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
    """One table row's SegNet and U-Net cells."""
    return cell(result["segnet"]), cell(result["unet"])


def _score(how: str, key: str | None) -> Callable[[dict[str, Any]], str]:
    """A cell of an arm's ``scores[how][key]`` (or ``scores[how]``), 4 decimals (3 for s)."""

    def cell(arm: dict[str, Any]) -> str:
        value = arm["scores"][how]
        return f"{value:.3f}" if key is None else f"{value[key]:.4f}"

    return cell


def machine(threads: int) -> str:
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}; {os.cpu_count()} logical CPUs ({platform.machine()}), "
        f"{threads} torch thread(s)"
    )


# ------------------------------------------------------------------------------ main
def split_lists(out: Path, settings: Settings) -> tuple[Path, Path]:
    """The split lists, or (smoke) their first names written to ``out``."""
    lists = (SPLITS / "ph2-train.txt", SPLITS / "ph2-val.txt")
    counts = (settings.train_cases, settings.val_cases)
    if counts == (None, None):
        return lists
    from tilesegment.train.data import read_name_list

    written = []
    for path, n in zip(lists, counts, strict=True):
        names = read_name_list(path)[:n]
        written.append(out / f"smoke-{path.name}")
        written[-1].write_text("\n".join(names) + "\n")
    return written[0], written[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("TILESEGMENT_DATA", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "ph2_segnet_unet")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1500)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="default 75")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of tiny networks")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.steps_per_epoch is not None:
        settings = dataclasses.replace(settings, steps_per_epoch=args.steps_per_epoch)
    if args.steps is None:
        args.steps = 2 if args.smoke else 1500
    if args.steps < 1 or args.steps % settings.steps_per_epoch:
        parser.error(
            f"--steps ({args.steps}) must be a positive multiple of --steps-per-epoch "
            f"({settings.steps_per_epoch})"
        )
    if not (args.data / PH2).is_dir():
        parser.error(f"{args.data / PH2}: PH2 not found; give --data (the shared data folder)")
    args.settings = settings
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings: Settings = args.settings
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    from tilesegment.geometry import UNetGeometry
    from tilesegment.train.sampling import prepare_run_data

    lists = split_lists(args.out, settings)
    cfg = train_config(args, settings, lists)
    start = time.perf_counter()
    with_val = dataclasses.replace(cfg, val_list=lists[1])
    data = prepare_run_data(with_val, UNetGeometry.of(settings.unet_depth), main=False)
    prepare_seconds = time.perf_counter() - start
    segnet_timings, segnet_predict, segnet_params = run_segnet(cfg, data, settings, args.out)
    unet_timings, unet_predict, unet_params = run_unet(cfg)
    output = UNetGeometry.of(settings.unet_depth).output_size(settings.unet_tile)
    result = {
        "machine": machine(args.threads),
        "threads": args.threads,
        "seed": args.seed,
        "smoke": args.smoke,
        "batch_size": settings.batch_size,
        "steps_per_epoch": settings.steps_per_epoch,
        "train_cases": [it.name for it in data.train],
        "held_out": len(data.val),
        "prepare_seconds": prepare_seconds,
        "segnet": {
            **segnet_timings,
            "parameters": segnet_params,
            "scores": score(data.val, segnet_predict),
        },
        "unet": {
            **unet_timings,
            "parameters": unet_params,
            "crop": f"{settings.unet_tile} -> {output}",
            "scores": score(data.val, unet_predict),
        },
    }
    table = markdown(result)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(f"{result['machine']}\n\n{table}\n")
    print(result["machine"])
    print(
        f"{len(data.train)} training cases, {len(data.val)} held out; seed {args.seed}; data "
        f"prepared in {prepare_seconds:.0f} s (labels, weight maps)"
    )
    print()
    print(table)
    return result


if __name__ == "__main__":
    main()
