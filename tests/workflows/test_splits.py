"""The tutorial models' splits: rewritten from the real data they equal the committed lists;
PH2 holds out 8 whole cases, DSB2018 about 15 % of each image type."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.conftest import ROOT, data_path

SPLITS = ROOT / "workflows" / "models" / "splits"


def lines(path):
    return path.read_text().splitlines()


def test_splits_are_reproducible_and_disjoint(tmp_path):
    ph2 = data_path("ph2", "PH2 Dataset images")
    dsb = data_path("dsb2018", "stage1_train")
    script = ROOT / "workflows" / "models" / "splits.py"
    data_path("monuseg", "images"), data_path("tnbc", "images")  # skip without them
    done = subprocess.run(
        [sys.executable, str(script), str(ph2.parents[1]), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    names = ("ph2-train", "ph2-val", "dsb2018-train", "dsb2018-val", "dsb2018-types")
    for name in (*names, "nuclei-he-train", "nuclei-he-val"):
        suffix = ".tsv" if name.endswith("types") else ".txt"
        assert lines(tmp_path / f"{name}{suffix}") == lines(SPLITS / f"{name}{suffix}"), name

    cases = sorted(p.name for p in ph2.iterdir() if p.is_dir())
    train, val = lines(SPLITS / "ph2-train.txt"), lines(SPLITS / "ph2-val.txt")
    assert len(val) == 8 and not set(train) & set(val) and sorted(train + val) == cases

    samples = sorted(p.name for p in dsb.iterdir() if p.is_dir())
    train, val = lines(SPLITS / "dsb2018-train.txt"), lines(SPLITS / "dsb2018-val.txt")
    assert not set(train) & set(val) and sorted(train + val) == samples
    with (SPLITS / "dsb2018-types.tsv").open() as fh:
        types = {row["id"]: row["type"] for row in csv.DictReader(fh, delimiter="\t")}
    held = set(val)
    for kind in ("fluorescence", "brightfield", "he"):
        ids = [i for i, t in types.items() if t == kind]
        share = sum(i in held for i in ids) / len(ids)
        assert ids and share > 0 and abs(share - 0.15) < 0.5 / len(ids) + 0.01, (kind, share)
    assert 0.13 < len(val) / len(samples) < 0.17


def test_nuclei_he_split_holds_out_whole_slides_and_patients():
    data = data_path("monuseg", "images").parents[1]
    train = [line.split("\t") for line in lines(SPLITS / "nuclei-he-train.txt")]
    val = [line.split("\t") for line in lines(SPLITS / "nuclei-he-val.txt")]
    for image, label in train + val:
        assert (data / image).is_file() and (data / label).is_file(), image
    stems = {split: [image.split("/")[-1][:-4] for image, _ in rows]
             for split, rows in (("train", train), ("val", val))}  # fmt: skip
    everything = sorted(
        p.stem for d in ("monuseg", "tnbc") for p in (data / d / "images").glob("*.png")
    )
    assert sorted(stems["train"] + stems["val"]) == everything
    patients = {s: {n.split("_")[0] for n in stems[s] if "_" in n} for s in stems}
    assert len(patients["val"]) == 2 and not patients["train"] & patients["val"]
    held_monuseg = {n for n in stems["val"] if n.startswith("TCGA")}
    previous = json.loads((ROOT / "tilesegment" / "models" / "nuclei-he.json").read_text())
    old_validation = previous["training"]["data"]["validation"]
    assert (
        held_monuseg == {n for n in old_validation if n.startswith("TCGA")}
        and len(held_monuseg) == 4
    )
