"""Evaluate a training run's best checkpoint on its held-out images and ship it in the package.

    python workflows/models/package.py RUN_DIR NAME --images ... --labels ...

Writes tilesegment/models/NAME.safetensors + NAME.json (the run's best checkpoint, renamed, with
a one-line summary) and NAME.md (the model card: data, terms, command, held-out metrics).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tilesegment" / "models"

CARDS = {
    "nuclei-he": {
        "title": "nuclei-he: H&E nucleus segmentation (valid U-Net)",
        "data": "MoNuSeg 2018 training set: 24 H&E tiles of 1000 x 1000 px at 40x (about "
        "0.25 um/px) from TCGA slides of 7 organs, with nucleus instance labels (Kumar et al., "
        "IEEE TMI 2017).",
        "terms": "The training data is licensed CC BY-NC-SA 4.0: these weights inherit its "
        "non-commercial, share-alike terms. Cite Kumar et al. 2017.",
        "use": "Class 1 = nucleus. Touching nuclei are separated by the background borders "
        "the model was trained to draw (border weights w0 = 10, sigma = 5 px); instances are "
        "4-connected components of class 1 (`tilesegment export --geojson`).",
        "metrics": ["aji", "foreground_dice", "object_f1", "pixel_error"],
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
        "use": "Class 1 = lesion. No declared resolution: images are used at their own pixel "
        "size, as in PH2.",
        "metrics": ["foreground_dice", "foreground_iou", "pixel_error"],
    },
    "nuclei-fluo": {
        "title": "nuclei-fluo: nucleus instances in fluorescence and brightfield (valid U-Net)",
        "data": "2018 Data Science Bowl stage-1 training set, 330 samples (fluorescence, "
        "brightfield and H&E; Caicedo et al., Nature Methods 2019, BBBC038); split by sample, "
        "15 % of each image type held out (workflows/models/splits/dsb2018-val.txt).",
        "terms": "The data is CC0. Cite Caicedo et al. 2019.",
        "use": "Class 1 = nucleus; instances are 4-connected components of class 1, separated "
        "by the background borders the border weights (w0 = 10, sigma = 5 px) train for.",
        "metrics": ["aji", "object_f1", "aji_plus", "pq", "foreground_dice"],
    },
}


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", help="label folder or stack [default: the --images tree]")
    args = ap.parse_args()
    best = json.loads((args.run_dir / "best.json").read_text())
    held_out = best["training"]["data"]["validation"]
    val_list = args.run_dir / "validation.txt"
    val_list.write_text("\n".join(held_out) + "\n")
    cmd = [
        "tilesegment", "evaluate", "--model", str(args.run_dir / "best"),
        "--images", args.images, "--list", str(val_list), "--json",
    ]  # fmt: skip
    if args.labels:
        cmd += ["--labels", args.labels]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    card = CARDS[args.name]
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
{best["mpp"]} um/px, input {best["input"]["channel_order"]}.

**Data**: {card["data"]}

**Terms**: {card["terms"]}

**Training** (this machine: 2-core CPU, no GPU): epoch {t["epoch"]} (step {t["step"]}) of
{cfg["epochs"]} x {cfg["steps_per_epoch"]} steps was the best by validation; batch
{cfg["batch_size"]}, {cfg["tile_size"]} px crops, Adam lr {cfg["lr"] or 1e-3} cosine, border
weights w0 = {cfg["w0"]}, sigma = {cfg["sigma"]} px, elastic deformation sigma =
{cfg["elastic_sigma"]} px on a 3 x 3 grid, flips/rotations and intensity/colour jitter.
Reproduce with `bash workflows/models/train.sh` (the exact `tilesegment train` commands).

Training images: {", ".join(t["data"]["train"])}.

**Held-out metrics** (`tilesegment evaluate` on the {len(held_out)} images never used for
training: {", ".join(held_out)}):

| metric | mean over images | pooled over images |
|---|---|---|
{rows}

| image | {" | ".join(card["metrics"])} |
|---|{"---|" * len(card["metrics"])}
{per_image}

These are numbers on a handful of held-out images from the same data set. The same images
chose the best epoch, so they are slightly optimistic; expect lower scores on other scanners,
stains and tissues.
"""
    )
    print(f"shipped {args.name}: {best['training']['summary']}", file=sys.stderr)


if __name__ == "__main__":
    main()
