"""The tutorial models' splits: rewritten from the real data they equal the committed lists;
PH2 holds out 8 whole cases, DSB2018 about 15 % of each image type."""

from __future__ import annotations

import csv
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
    done = subprocess.run(
        [sys.executable, str(script), str(ph2.parents[1]), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in ("ph2-train", "ph2-val", "dsb2018-train", "dsb2018-val", "dsb2018-types"):
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
