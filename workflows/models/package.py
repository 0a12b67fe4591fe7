"""Evaluate a training run's best checkpoint on its held-out images and ship it in the package.

    python workflows/models/package.py RUN_DIR NAME --images ... [--labels ...]
    python workflows/models/package.py RUN_DIR NAME --val-list PAIRS.txt

Writes the card with the held-out scores, the training's wall time (from the run's log) and the
model's speed: the bare forward pass on 572 px tiles (batch 4, fp32, channels-last, one process
with every core torch sees), median of 5 after a warm-up, in output Mpx/s.

Writes tilesegment/models/NAME.safetensors + NAME.json (the run's best checkpoint, renamed, with
a one-line summary) and NAME.md (the model card: data, terms, command, held-out metrics).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tilesegment" / "models"

CARDS = {
    "nuclei-he": {
        "title": "nuclei-he: H&E nucleus instances (valid U-Net, interior + boundary)",
        "data": "MoNuSeg 2018 training set (24 H&E tiles of 1000 x 1000 px at 40x from TCGA "
        "slides of 7 organs; Kumar et al., IEEE TMI 2017) and TNBC (50 H&E tiles of 512 x 512 "
        "px at 40x from 11 triple-negative breast cancer patients; Naylor et al., IEEE TMI "
        "2019), both about 0.25 um/px, with nucleus instance labels. Split by source slide / "
        "patient (workflows/models/splits/nuclei-he-*.txt): the 4 MoNuSeg slides the previous "
        "nuclei-he held out and all tiles of 2 seeded TNBC patients (07, 10) validate.",
        "terms": "MoNuSeg is licensed CC BY-NC-SA 4.0: these weights inherit its non-commercial, "
        "share-alike terms. TNBC is for research use. Cite Kumar et al. 2017 and Naylor et "
        "al. 2019.",
        "use": "Three classes: background, nucleus interior, nucleus boundary (each "
        "nucleus's outermost 1 px ring and the pixels between touching nuclei, trained with "
        "border weights w0 = 10, sigma = 5 px). Instances: "
        "interior components of at least 4 px seed the nuclei and grow through interior and "
        "boundary pixels by at most 8 px (`instances` in the JSON), so touching nuclei stay "
        "apart and every chunk needs only a fixed halo (`tilesegment run --geojson`).",
        "metrics": ["aji", "aji_plus", "pq", "object_f1", "foreground_dice"],
    },
    "membrane-em": {
        "title": "membrane-em: EM membrane segmentation (valid U-Net)",
        "data": "ISBI 2012 EM segmentation challenge training volume: slices 0-24 of serial-"
        "section TEM of the Drosophila first instar larva ventral nerve cord, 512 x 512 px "
        "(Cardona et al. 2010; Arganda-Carreras et al. 2015).",
        "terms": "The ISBI 2012 data is for non-commercial research use: these weights inherit "
        "that restriction. Cite the challenge.",
        "use": "Class 0 = membrane, class 1 = cell interior, as in the ISBI labels. Declared "
        "resolution 0.004 um/px (4 nm); grayscale input.",
        "metrics": ["rand_error", "pixel_error", "info_fscore", "foreground_dice"],
    },
    "lesion-derm": {
        "title": "lesion-derm: dermoscopy skin-lesion segmentation (valid U-Net)",
        "data": "PH2 database: 40 dermoscopy cases (about 768 x 560 px RGB) with binary lesion "
        "masks (Mendonca et al., EMBC 2013); split by case, 8 cases held out "
        "(workflows/models/splits/ph2-val.txt).",
        "terms": "PH2 is for research use: so are these weights. Cite Mendonca et al. 2013.",
        "use": "Class 1 = lesion. No declared um/px: the resolution is the one under "
        "Architecture (trained at a third of PH2's pixel size, `--downsample 3`, since the "
        "full-size model's 184 px receptive field was smaller than the lesions).",
        "metrics": ["foreground_dice", "foreground_iou", "pixel_error"],
        "note": "**Limits, seen on the held-out cases** (`tilesegment evaluate --figure`): "
        "trained at a third of PH2's size, the network's 184 px receptive field spans the "
        "lesion and the skin around it (the full-size model before it, Dice 0.663 / IoU 0.531 "
        "mean on the same 8 cases, took pale skin inside the dermatoscope's field for lesion). "
        "What is left: dark hairs crossing the lesion and the dark vignetted corners of the "
        "dermatoscope's field are called lesion on 2 of 8 cases (Dice 0.73 and 0.78 there, "
        "0.80-0.97 on the others); no hair removal or field-of-view mask is applied. Edges "
        "are as fine as the 3x shrunk image allows (3 px at PH2's size).",
    },
    "nuclei-fluo": {
        "title": "nuclei-fluo: nucleus instances in fluorescence and brightfield (valid U-Net)",
        "data": "2018 Data Science Bowl stage-1 training set, 330 samples (fluorescence, "
        "brightfield and H&E; Caicedo et al., Nature Methods 2019, BBBC038); split by sample, "
        "15 % of each image type held out (workflows/models/splits/dsb2018-val.txt).",
        "terms": "The data is CC0. Cite Caicedo et al. 2019.",
        "use": "Three classes: background, nucleus interior, nucleus boundary (border weights "
        "w0 = 10, sigma = 5 px). Instances: interior components seed the nuclei and grow "
        "through interior and boundary pixels by a bounded number of pixels (`instances` in "
        "the JSON). No declared resolution: images are used at their own pixel size.",
        "metrics": ["aji", "object_f1", "aji_plus", "pq", "foreground_dice"],
    },
}


TUTORIAL = ("lesion-derm", "nuclei-fluo")


def _augmentation(cfg: dict) -> str:
    """The jitter a run used, in words (older runs did not record the ranges)."""
    if "hed_scale" not in cfg:
        return "intensity/colour jitter"
    parts = []
    if cfg["hed_scale"] or cfg["hed_shift"]:
        parts.append(f"HED stain jitter (scale ±{cfg['hed_scale']}, shift ±{cfg['hed_shift']} OD)")
    if cfg["scale_jitter"]:
        parts.append(f"scale jitter ±{cfg['scale_jitter']:.0%}")
    parts.append(
        f"brightness ±{cfg['brightness']}, contrast ±{cfg['contrast']}, gamma ±{cfg['gamma']}"
    )
    if cfg["blur_sigma"]:
        parts.append(f"Gaussian blur up to sigma {cfg['blur_sigma']} px")
    return ", ".join(parts)


def _resolution(mpp: float | None, downsample: float | None = None) -> str:
    if mpp is not None:
        return f"{mpp} um/px"
    if downsample is not None:
        return (
            f"images shrunk {downsample:g}x (no declared um/px; `downsample` {downsample:g}: "
            "run, predict and evaluate shrink every image by it and bring the outputs back to "
            "the image's own grid)"
        )
    return "images at their own pixel size (no declared um/px)"


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's ``log.csv``, one per epoch (training and validation), as read."""
    with (run_dir / "log.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _stopped(rows: list[dict[str, str]], cfg: dict) -> str:
    """A sentence when the run ended before its planned epochs (e.g. at the end of a session)."""
    last = max(int(r["epoch"]) for r in rows)
    if last >= cfg["epochs"]:
        return ""
    return (
        f" The run was stopped after epoch {last} of {cfg['epochs']} (session time; "
        "`--resume` continues it)."
    )


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def forward_mpx_per_s(checkpoint: Path, tile: int = 572, batch: int = 4) -> float:
    """Median output Mpx/s of the bare forward pass (fp32, channels-last) of ``checkpoint``."""
    import torch

    from tilesegment.model.checkpoint import load_checkpoint

    net, spec = load_checkpoint(checkpoint)
    net = net.to(memory_format=torch.channels_last)
    x = torch.rand(batch, spec.unet.in_channels, tile, tile)
    x = x.to(memory_format=torch.channels_last)
    out = net.output_size(tile)
    seconds = []
    with torch.inference_mode():
        for _ in range(6):
            t0 = time.perf_counter()
            net(x)
            seconds.append(time.perf_counter() - t0)
    return batch * out * out / statistics.median(seconds[1:]) / 1e6


def training_hours(rows: list[dict[str, str]]) -> float:
    """Wall time of the run's epochs (training and validation) from its ``log_rows``."""
    return sum(float(r["seconds"] or 0) for r in rows) / 3600


def _evaluate(args: argparse.Namespace, held_out: list[str]) -> dict:
    cmd = ["tilesegment", "evaluate", "--model", str(args.run_dir / "best"), "--json"]
    if args.val_list:
        cmd += ["--list", str(args.val_list)]
    else:
        val_list = args.run_dir / "validation.txt"
        val_list.write_text("\n".join(held_out) + "\n")
        cmd += ["--images", args.images, "--list", str(val_list)]
        if args.labels:
            cmd += ["--labels", args.labels]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:  # long: one card template
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--images")
    ap.add_argument("--labels", help="label folder or stack [default: the --images tree]")
    ap.add_argument("--val-list", type=Path, help="image<TAB>label pairs of the held-out images")
    args = ap.parse_args()
    if not (args.images or args.val_list):
        ap.error("give --images (and --labels) or --val-list")
    best = json.loads((args.run_dir / "best.json").read_text())
    held_out = best["training"]["data"]["validation"]
    result = _evaluate(args, held_out)
    speed = forward_mpx_per_s(args.run_dir / "best")
    load = os.getloadavg()[0]  # the figure is only as good as the machine was quiet
    epochs = log_rows(args.run_dir)
    hours = training_hours(epochs)
    card = CARDS[args.name]
    stopped = _stopped(epochs, best["training"]["config"])
    mean = result["mean"]
    summary = " ".join(
        f"{k} {mean[k]:.3f}" for k in card["metrics"] if isinstance(mean.get(k), float)
    )
    best["name"] = args.name
    best["training"]["summary"] = f"held-out ({len(held_out)} images): {summary}"
    result["model"] = args.name  # the shipped name, not this machine's path to the run
    best["training"]["held_out_metrics"] = result
    MODELS.mkdir(exist_ok=True)
    shutil.copyfile(args.run_dir / "best.safetensors", MODELS / f"{args.name}.safetensors")
    (MODELS / f"{args.name}.json").write_text(json.dumps(best, indent=2) + "\n")
    t = best["training"]
    cfg = t["config"]
    pooled = result.get("aggregate", {})
    rows = "\n".join(
        f"| {k} | {mean[k]:.4f} | {_cell(pooled.get(k))} |"
        for k in card["metrics"]
        if isinstance(mean.get(k), float)
    )
    per_image = "\n".join(
        f"| {r['name']} | "
        + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in card["metrics"])
        + " |"
        for r in result["images"]
    )
    (MODELS / f"{args.name}.md").write_text(
        f"""# {card["title"]}

**Use**: {card["use"]}

**Architecture**: valid-convolution U-Net, depth {cfg["depth"]}, {cfg["base_channels"]} base
channels, halo {best["halo"]} px, valid inputs {best["valid_input_sizes"]}; expects
{_resolution(best["mpp"], best.get("downsample"))}, input {best["input"]["channel_order"]}.

**Data**: {card["data"]}

**Terms**: {card["terms"]}

**Training** (this machine: 2-core CPU, no GPU): epoch {t["epoch"]} (step {t["step"]}) of
{cfg["epochs"]} x {cfg["steps_per_epoch"]} steps was the best by validation;{stopped} batch
{cfg["batch_size"]}, {cfg["tile_size"]} px crops, Adam lr {cfg["lr"] or 1e-3} cosine, border
weights w0 = {cfg["w0"]}, sigma = {cfg["sigma"]} px, elastic deformation sigma =
{cfg["elastic_sigma"]} px on a 3 x 3 grid, flips/rotations, {_augmentation(cfg)}; checkpoint
chosen by validation {t.get("selection", {}).get("metric", "loss")}. Wall time of the run
{hours:.2f} h (two or three runs sharing the two cores). Reproduce with
`bash workflows/models/{"train-tutorial.sh" if args.name in TUTORIAL else "train.sh"}` (the exact
`tilesegment train` commands).

**Speed**: bare forward pass {speed:.2f} output Mpx/s on 572 px tiles (fp32, batch 4, one
process, this 2-core CPU, measured at packaging with a load average of {load:.1f}: the machine was
{"quiet" if load < 1.5 else "busy, so this is a lower bound"}); `tilesegment run` adds reading,
stitching and writing (benchmarks/RESULTS.md).

Training images: {", ".join(t["data"]["train"])}.

**Held-out metrics** (`tilesegment evaluate` on the {len(held_out)} images never used for
training: {", ".join(held_out)}):

| metric | mean over images | pooled over images |
|---|---|---|
{rows}

| image | {" | ".join(card["metrics"])} |
|---|{"---|" * len(card["metrics"])}
{per_image}

{card.get("note", "")}

These are numbers on a handful of held-out images from the same data set. The same images
chose the best epoch, so they are slightly optimistic; expect lower scores on other scanners,
stains and tissues.
"""
    )
    print(f"shipped {args.name}: {best['training']['summary']}", file=sys.stderr)


if __name__ == "__main__":
    main()
