"""Write the train/validation splits of the tutorial models (issue 12 item 4).

    python workflows/models/splits.py [DATA_DIR] [--out workflows/models/splits] [--seed 12]

* PH2 (``lesion-derm``): by case. The 40 case ids (``IMDxxx``, one folder each) are sorted
  and shuffled by ``numpy.random.default_rng(seed)``; the first 8 validate, the other 32 train.
  One case is one image, so no lesion is seen in both splits.
* DSB2018 stage 1 (``nuclei-fluo``): by sample id, stratified by image type. Each sample's
  ``images/<id>.png`` is typed from its colour statistics: *he* (stained tissue, H&E-like)
  when the mean absolute deviation of the RGB channels from their mean exceeds
  ``COLOUR_SPREAD`` grey levels, otherwise *brightfield* when its mean intensity exceeds
  ``BRIGHT_MEAN`` (dark nuclei on a bright background) and *fluorescence* (bright nuclei on a
  dark background) below. In each type ``round(VAL_SHARE * n)`` samples (at least 1) are drawn
  for validation by a generator seeded with (seed, type); about 15 % in all.

* MoNuSeg + TNBC (``nuclei-he``, issue 11): by source slide / patient. MoNuSeg's 24 tiles each
  come from a different TCGA slide; the 4 held out are the ones the previous ``nuclei-he``
  held out (``--val-fraction 0.17 --seed 0``), so before/after scores compare on the same
  images. TNBC's 50 tiles come from 11 patients (``NN_k``: patient NN); the sorted patient ids
  are shuffled by ``numpy.random.default_rng(seed)`` and all tiles of the first
  ``TNBC_VAL_PATIENTS`` validate. Lines are ``image<TAB>label`` paths relative to DATA_DIR
  (``train.sh`` prefixes them with the data folder).

Writes ``ph2-train.txt``, ``ph2-val.txt``, ``dsb2018-train.txt``, ``dsb2018-val.txt`` (one
name a line, sorted; ``tilesegment train --train-list/--val-list`` reads them) and
``dsb2018-types.tsv`` (id, type, mean, spread) so the typing can be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PH2_VAL_CASES = 8
#: The previous nuclei-he's held-out MoNuSeg slides (kept so before/after compare).
MONUSEG_VAL = (
    "TCGA-AR-A1AS-01Z-00-DX1",
    "TCGA-B0-5710-01Z-00-DX1",
    "TCGA-HE-7130-01Z-00-DX1",
    "TCGA-KB-A93J-01A-01-TS1",
)
TNBC_VAL_PATIENTS = 2
VAL_SHARE = 0.15
#: Grey levels: the DSB2018 stage-1 images are either exactly grey (spread 0) or clearly
#: coloured (spread 5-45); nothing lies between 0.01 and 5.
COLOUR_SPREAD = 2.0
#: Grey images: fluorescence means lie below 50, brightfield means above 200.
BRIGHT_MEAN = 127.0
TYPES = ("fluorescence", "brightfield", "he")


def ph2_split(root: Path, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) PH2 case ids from the folders ``root/IMDxxx``."""
    cases = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("IMD"))
    if len(cases) <= PH2_VAL_CASES:
        sys.exit(f"{root}: found {len(cases)} PH2 case folders (IMDxxx), need more than 8")
    order = np.random.default_rng(seed).permutation(len(cases))
    val = {cases[i] for i in order[:PH2_VAL_CASES]}
    return [c for c in cases if c not in val], sorted(val)


def image_type(path: Path) -> tuple[str, float, float]:
    """(type, mean intensity, colour spread) of one DSB2018 image (alpha dropped)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    spread = float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean())
    mean = float(rgb.mean())
    if spread > COLOUR_SPREAD:
        return "he", mean, spread
    return ("brightfield" if mean > BRIGHT_MEAN else "fluorescence"), mean, spread


def dsb_split(root: Path, seed: int) -> tuple[list[str], list[str], list[tuple]]:
    """(train, validation, typing rows) of the DSB2018 samples ``root/<id>/images/<id>.png``."""
    rows = []
    for sample in sorted(p for p in root.iterdir() if p.is_dir()):
        image = sample / "images" / f"{sample.name}.png"
        if not image.is_file():
            sys.exit(f"{image}: missing; expected the DSB2018 layout <id>/images/<id>.png")
        rows.append((sample.name, *image_type(image)))
    val: set[str] = set()
    for k, kind in enumerate(TYPES):
        ids = [r[0] for r in rows if r[1] == kind]
        if not ids:
            continue
        n_val = max(1, round(VAL_SHARE * len(ids)))
        order = np.random.default_rng([seed, k]).permutation(len(ids))
        val.update(ids[i] for i in order[:n_val])
    train = [r[0] for r in rows if r[0] not in val]
    return train, sorted(val), rows


def he_split(data: Path, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) ``image<TAB>label`` lines (relative to ``data``) of MoNuSeg + TNBC."""
    train: list[str] = []
    val: list[str] = []
    for dataset in ("monuseg", "tnbc"):
        stems = sorted(p.stem for p in (data / dataset / "images").glob("*.png"))
        if not stems:
            sys.exit(f"{data / dataset / 'images'}: no PNG images; give the shared data folder")
        if dataset == "monuseg":
            held = set(MONUSEG_VAL)
        else:
            patients = sorted({s.split("_")[0] for s in stems})
            order = np.random.default_rng(seed).permutation(len(patients))
            held_patients = {patients[i] for i in order[:TNBC_VAL_PATIENTS]}
            held = {s for s in stems if s.split("_")[0] in held_patients}
        for stem in stems:
            line = f"{dataset}/images/{stem}.png\t{dataset}/labels/{stem}.tif"
            (val if stem in held else train).append(line)
    return train, val


def write_names(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{n}\n" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, nargs="?", default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "splits")
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    ph2 = args.data / "ph2" / "PH2 Dataset images"
    dsb = args.data / "dsb2018" / "stage1_train"
    for folder in (ph2, dsb):
        if not folder.is_dir():
            sys.exit(f"{folder}: not found; give the shared data folder as DATA_DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    train, val = ph2_split(ph2, args.seed)
    write_names(args.out / "ph2-train.txt", train)
    write_names(args.out / "ph2-val.txt", val)
    print(f"ph2: {len(train)} train, {len(val)} validation cases")
    train, val, rows = dsb_split(dsb, args.seed)
    write_names(args.out / "dsb2018-train.txt", train)
    write_names(args.out / "dsb2018-val.txt", val)
    with (args.out / "dsb2018-types.tsv").open("w") as fh:
        fh.write("id\ttype\tmean\tspread\n")
        fh.writelines(f"{i}\t{t}\t{m:.1f}\t{s:.2f}\n" for i, t, m, s in rows)
    held = {t: sum(1 for r in rows if r[1] == t and r[0] in set(val)) for t in TYPES}
    total = {t: sum(1 for r in rows if r[1] == t) for t in TYPES}
    shares = ", ".join(f"{t} {held[t]}/{total[t]}" for t in TYPES)
    print(f"dsb2018: {len(train)} train, {len(val)} validation samples ({shares})")
    if (args.data / "monuseg").is_dir() and (args.data / "tnbc").is_dir():
        train, val = he_split(args.data, args.seed)
        write_names(args.out / "nuclei-he-train.txt", train)
        write_names(args.out / "nuclei-he-val.txt", val)
        print(f"nuclei-he: {len(train)} train, {len(val)} validation tiles")


if __name__ == "__main__":
    main()
