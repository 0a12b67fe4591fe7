"""The Snakemake workflow end to end: two slides (one real, one with a space in its name)
through segment -> export -> aggregate, then every declared output validated."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from tests.conftest import ROOT, data_path
from tilesegment.model.checkpoint import file_sha256
from tilesegment.store import ClassSpec, OutputStore, is_complete
from tilesegment.store.layout import report_path
from tilesegment.testing.synthetic import write_slide

WORKFLOW = ROOT / "workflows" / "snakemake"


def snakemake(workdir: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    """``snakemake --cores 2`` on the project's Snakefile, in ``workdir``."""
    cmd = [
        *(sys.executable, "-m", "snakemake", "--cores", "2"),
        *("--snakefile", str(WORKFLOW / "Snakefile")),
        *("--configfile", str(config), "--directory", str(workdir), *extra),
    ]
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / ".cache")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory, tiny_model):
    """Run the workflow once; (workdir, outdir, {stem: slide}, model, config path)."""
    pytest.importorskip("snakemake", reason="snakemake missing: pip install -e '.[workflows]'")
    small = data_path("slides", "small.svs")  # real Aperio SVS, 16 x 16 px
    work = tmp_path_factory.mktemp("workflow")
    slides = work / "slides"
    slides.mkdir()
    (slides / "small.svs").symlink_to(small)
    write_slide(slides / "synthetic slide.tif", (1500, 1500), mpp=0.25, seed=5)
    (slides / "notes.txt").write_text("not matched by the patterns\n")
    model = tiny_model
    # A half-written output (created, never finished) must not count as done.
    outdir = work / "results"
    classes = ClassSpec(("a", "b", "c"), ((0, 0, 0, 255), (255, 0, 0, 255), (0, 255, 0, 255)))
    half = OutputStore.create(
        outdir / "small.zarr", image_shape=(8, 8), classes=classes, chunk_shape=(8, 8), mpp=None
    )
    assert not half.is_complete()
    config = {
        "slides": "slides",
        "patterns": ["*.svs", "*.tif"],
        "model": str(model),
        "outdir": "results",
        "threads": 1,
        "run": {"tissue": "auto", "preview": False},
    }
    config_path = work / "config.json"  # JSON is YAML
    config_path.write_text(json.dumps(config))
    result = snakemake(work, config_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stems = {"small": slides / "small.svs", "synthetic slide": slides / "synthetic slide.tif"}
    return work, outdir, stems, model, config_path


def test_every_declared_output_exists_and_is_valid(workflow_run):
    from ome_zarr_models.v04 import Image, ImageLabel

    _, outdir, stems, _, _ = workflow_run
    for stem in stems:
        store = outdir / f"{stem}.zarr"
        assert is_complete(store), store
        root = zarr.open_group(store, mode="r")
        Image.from_zarr(root)
        ImageLabel.from_zarr(root["labels/mask"])
        assert json.loads((outdir / f"{stem}.done").read_text())["status"] == "complete"
        doc = json.loads((outdir / f"{stem}.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
        assert (outdir / "logs" / f"{stem}.segment.log").read_text().startswith("$ ")
    assert zarr.open_group(outdir / "small.zarr", mode="r")["0"].shape == (3, 16, 16)


def test_aggregate_table_has_one_complete_row_per_slide(workflow_run):
    _, outdir, stems, model, _ = workflow_run
    with (outdir / "runs.tsv").open(newline="") as f:
        rows = {row["slide"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert sorted(rows) == sorted(stems)
    sha = file_sha256(model.with_suffix(".safetensors"))
    for stem, row in rows.items():
        report = json.loads(report_path(outdir / f"{stem}.zarr").read_text())
        assert row["status"] == "complete"
        assert row["model_sha256"] == sha
        assert int(row["tiles"]) == report["tiles"]["total"] >= 1
        assert float(row["megapixels"]) == pytest.approx(report["megapixels"]["image"])
        assert float(row["seconds"]) > 0 and float(row["mpx_per_s"]) > 0
        assert float(row["peak_rss_mb"]) > 0
        features = json.loads((outdir / f"{stem}.geojson").read_text())["features"]
        assert int(row["instances"]) == len(features)
    assert int(rows["synthetic slide"]["tiles"]) == 9  # 1500 px, default tile: 644 px cores, 3 x 3


def test_a_second_run_has_nothing_to_do(workflow_run):
    work, _, _, _, config = workflow_run
    again = snakemake(work, config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stderr + again.stdout
