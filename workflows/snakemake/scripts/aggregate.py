"""Collect the run reports of many tilesegment outputs into one tab-separated table.

Used by the Snakefile's ``aggregate`` rule (``script:``), and runnable by hand::

    python workflows/snakemake/scripts/aggregate.py results/runs.tsv results/*.zarr

One row per output, from ``OUT.report.json`` beside ``OUT.zarr`` (status, tiles, megapixels,
seconds, throughput, model hash, peak memory) and, when it exists, the per-nucleus table
``OUT.nuclei.csv`` beside it (the instance count).
"""

# No `from __future__` import: Snakemake's script directive puts its preamble above this file.
import argparse
import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tilesegment.store.layout import report_path

COLUMNS = (
    "slide",
    "status",
    "tiles",
    "tiles_processed",
    "tiles_skipped_no_tissue",
    "megapixels",
    "seconds",
    "mpx_per_s",
    "model_sha256",
    "peak_rss_mb",
    "workers_peak_rss_mb",
    "instances",
    "output",
)


def report_row(slide: str, output: Path, table: Path | None = None) -> dict[str, Any]:
    """The table row of one output; status ``missing`` when it has no readable report."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(slide=slide, output=str(output), status="missing")
    try:
        doc = json.loads(report_path(output).read_text())
    except (OSError, ValueError):
        return row
    tiles, rss = doc.get("tiles", {}), doc.get("peak_rss_mb", {})
    row.update(
        status=doc.get("status", ""),
        tiles=tiles.get("total", ""),
        tiles_processed=tiles.get("processed", ""),
        tiles_skipped_no_tissue=tiles.get("skipped_no_tissue", ""),
        megapixels=doc.get("megapixels", {}).get("image", ""),
        seconds=doc.get("seconds", {}).get("total", ""),
        mpx_per_s=doc.get("mpx_per_s", ""),
        model_sha256=doc.get("params", {}).get("model_sha256", ""),
        peak_rss_mb=rss.get("main", ""),
        workers_peak_rss_mb=rss.get("workers", ""),
    )
    if table is not None and table.is_file():
        with table.open(newline="") as f:
            row["instances"] = max(0, sum(1 for _ in csv.reader(f)) - 1)  # minus the header
    return row


def write_table(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` as a TSV with a header line; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _table_beside(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".zarr") + ".nuclei.csv")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="the TSV to write")
    parser.add_argument("outputs", type=Path, nargs="+", help="OUT.zarr folders")
    args = parser.parse_args(argv)
    rows = [report_row(o.name.removesuffix(".zarr"), o, _table_beside(o)) for o in args.outputs]
    write_table(rows, args.table)


def _from_snakemake(smk: Any) -> None:
    tables = list(smk.params.tables) or [None] * len(smk.params.slides)
    rows = [
        report_row(slide, Path(zarr), None if table is None else Path(table))
        for slide, zarr, table in zip(smk.params.slides, smk.params.zarrs, tables, strict=True)
    ]
    write_table(rows, Path(smk.output[0]))


if __name__ == "__main__":
    if "snakemake" in globals():  # run by the Snakefile's script: directive
        _from_snakemake(globals()["snakemake"])
    else:
        main()
