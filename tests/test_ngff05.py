"""``tilesegment run --format ngff-0.5`` on the real Aperio slide: the same arrays as the default
NGFF 0.4 output in sharded Zarr v3 (fewer files), valid NGFF 0.5 for ome-zarr-models and
ome-zarr-py, and every path that writes or reads an output works on it: resume after SIGKILL,
the dask executor, ``export`` and :mod:`tilesegment.dask`.

Both formats are run once per module, with a tiny model trained "at" 1 um/px (the 0.499 um/px
slide is read resampled to about 1481 x 1108 px, a quarter of the pixels), small chunks
(384 px) and shards (2 x 2 chunks), so that the output has 2 x 2 shards, some cut by the
image edge.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.infer.conftest import done_records, invoke, wait_for_records
from tilesegment.infer.options import RunOptions
from tilesegment.infer.run import run_slide
from tilesegment.store import OutputStore, is_complete
from tilesegment.store.layout import DONE_LOG, state_dir

#: Chunks of one tile stride (384 px) and shards of 2 x 2 chunks: 4 x 3 chunks in 2 x 2 shards.
OPTIONS = RunOptions(
    tile_size=572,
    chunk_target_px=384,
    shard_target_px=768,
    preview=False,
    progress=False,
    precision="fp32",  # the reference arithmetic, whatever the CPU
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A fixed random depth-4 model with 4 base channels and 3 classes, at 1 um/px."""
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint

    spec = ModelSpec.default(UNetConfig(depth=4, base_channels=4, classes=3), name="tiny", mpp=1.0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(new_model(spec, seed=5), spec, path)
    return path


@pytest.fixture(scope="module")
def slide() -> Path:
    from tests.conftest import data_path

    return data_path("slides", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def outputs(model, slide, tmp_path_factory) -> dict[str, Path]:
    """One run of each format, same options otherwise (same file name: omero records it)."""
    paths = {}
    for fmt in ("ngff-0.4", "ngff-0.5"):
        paths[fmt] = tmp_path_factory.mktemp(fmt) / "cmu.zarr"
        run_slide(slide, paths[fmt], model, replace(OPTIONS, format=fmt))
    return paths


def arrays(path: Path) -> dict[str, zarr.Array]:
    """Every array of an output (all levels of the image and of each label), by key."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        members = zarr.open_group(path, mode="r").members(max_depth=None)
        return {k: v for k, v in members if isinstance(v, zarr.Array)}


def assert_same_arrays(got: Path, expected: Path) -> None:
    a, b = arrays(got), arrays(expected)
    assert sorted(a) == sorted(b)
    assert "1" in a and "labels/mask/0" in a and "labels/tissue/1" in a
    for key in b:
        x, y = a[key][:], b[key][:]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x, y), f"{key}: {np.count_nonzero(x != y)} values differ"


def files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def test_same_arrays_as_ngff_04_in_fewer_files_of_whole_shards(outputs):
    assert_same_arrays(outputs["ngff-0.5"], outputs["ngff-0.4"])
    store = OutputStore.open(outputs["ngff-0.5"])
    assert store.format == "ngff-0.5" and store.chunk_shape == (384, 384)
    assert store.shard_shape == (768, 768) and store.image_shape[0] > 1100
    for key, array in arrays(outputs["ngff-0.5"]).items():
        assert array.metadata.zarr_format == 3 and array.shards is not None, key
        # Shards of 2 x 2 chunks, clipped to the chunks that cover the level.
        assert array.shards[-2:] == tuple(min(768, -(-n // 384) * 384) for n in array.shape[-2:])
        assert array.metadata.dimension_names[-2:] == ("y", "x")
    # Level 0 of the image: 4 x 3 chunk files in 0.4, 2 x 2 shard files in 0.5.
    assert len(list((outputs["ngff-0.4"] / "0" / "0").glob("*/*"))) == 12
    assert len(list((outputs["ngff-0.5"] / "0" / "c" / "0").glob("*/*"))) == 4
    v4, v5 = len(files(outputs["ngff-0.4"])), len(files(outputs["ngff-0.5"]))
    assert v5 < v4 / 2, (v5, v4)


def test_validates_as_ngff_05_and_opens_with_ome_zarr_py(outputs):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image, ImageLabel, Labels

    path = outputs["ngff-0.5"]
    assert is_complete(path)
    root = zarr.open_group(path, mode="r")
    image = Image.from_zarr(root)
    assert image.ome_zarr_version == "0.5"
    labels = Labels.from_zarr(root["labels"])
    assert labels.attributes.ome.labels == ["mask", "tissue"]
    for name in ("mask", "tissue"):
        ImageLabel.from_zarr(root[f"labels/{name}"])
    ms = image.attributes.ome.multiscales[0]
    assert ms.datasets[0].coordinateTransformations[0].scale[1:] == pytest.approx([1.0, 1.0], 0.01)
    # The same metadata as 0.4, wrapped in "ome", with the version stated once.
    v4 = zarr.open_group(outputs["ngff-0.4"], mode="r").attrs
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    assert ome["omero"]["channels"] == v4["omero"]["channels"]
    assert ome["multiscales"][0]["datasets"] == v4["multiscales"][0]["datasets"]
    assert root.attrs["tilesegment"]["status"] == "complete"
    mask = root["labels/mask"].attrs["ome"]["image-label"]
    assert (
        mask["colors"]
        == zarr.open_group(outputs["ngff-0.4"])["labels/mask"].attrs["image-label"]["colors"]
    )
    nodes = list(Reader(parse_url(str(path)))())
    shapes = [a.shape for a in OutputStore.open(outputs["ngff-0.4"]).pyramid()]
    assert [d.shape for d in nodes[0].data] == shapes and len(shapes) == 2
    assert len(nodes[0].metadata["channel_names"]) == 3
    found = {Path(n.zarr.path).name: n for n in nodes[1:]}
    assert {"mask", "tissue"} <= set(found)
    assert found["mask"].data[0].shape == shapes[0][1:]


def test_sigkill_then_resume_gives_the_same_arrays(model, slide, outputs, tmp_path):
    """A run killed after its first shard resumes into the arrays of an uninterrupted run, also
    when records of a written shard were lost (its other chunks are kept, not zeroed)."""
    out = tmp_path / "cmu.zarr"
    options = replace(OPTIONS, format="ngff-0.5")
    code = (
        "import sys\n"
        "from tilesegment.infer.options import RunOptions\n"
        "from tilesegment.infer.run import run_slide\n"
        f"run_slide(sys.argv[1], sys.argv[2], sys.argv[3], {options!r})\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(slide), str(out), str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = wait_for_records(proc, out, 1, timeout=600)  # a busy machine starts slowly
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not is_complete(out)
    recorded = done_records(out)
    # Killed before completion; on a busy machine every chunk may be recorded by then (the
    # records removed below still make the resume recompute some).
    assert seen <= recorded <= done_records(outputs["ngff-0.5"])
    # A shard written whole is recorded chunk by chunk: lose the last records, as a crash in
    # the middle of a commit could. Those chunks are computed again, the rest kept.
    log = state_dir(out) / DONE_LOG
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[: max(1, len(lines) - 3)]))
    summary = run_slide(slide, out, model, replace(OPTIONS, format="ngff-0.5", resume=True))
    assert summary.extra["report"]["tiles"]["done_before"] > 0
    assert is_complete(out)
    assert_same_arrays(out, outputs["ngff-0.5"])


def test_dask_workers_write_the_same_arrays(model, slide, outputs, tmp_path):
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    out = tmp_path / "cmu.zarr"
    run_slide(slide, out, model, replace(OPTIONS, format="ngff-0.5", dask_workers=2))
    assert_same_arrays(out, outputs["ngff-0.5"])


def test_export_labels_instances_shard_by_shard(outputs, tmp_path):
    tables, copies = {}, {}
    for fmt, path in outputs.items():
        copies[fmt] = tmp_path / fmt / path.name  # the module's outputs stay as run
        shutil.copytree(path, copies[fmt])
        tables[fmt] = tmp_path / f"{fmt}.csv"
        args = ("--method", "components", "--class-id", "2", "--min-area", "0")
        result = invoke("export", copies[fmt], *args, "--table", tables[fmt])
        assert result.exit_code == 0, result.output
        assert is_complete(copies[fmt])
    assert len(tables["ngff-0.5"].read_text().splitlines()) > 10
    assert tables["ngff-0.5"].read_text() == tables["ngff-0.4"].read_text()
    assert_same_arrays(copies["ngff-0.5"], copies["ngff-0.4"])  # with labels/nuclei now
    from ome_zarr_models.v05 import ImageLabel, Labels

    root = zarr.open_group(copies["ngff-0.5"], mode="r")
    assert Labels.from_zarr(root["labels"]).attributes.ome.labels[-1] == "nuclei"
    ImageLabel.from_zarr(root["labels/nuclei"])
    assert root["labels/nuclei/0"].shards == (768, 768)


def test_lazy_dask_api_reads_sharded_zarr_v3(model, slide, outputs, tmp_path):
    """:func:`tilesegment.dask.segment` of the run's pixels stored as a sharded Zarr v3 array
    equals the stored NGFF 0.5 output, read lazily with dask."""
    import dask
    import dask.array as da

    from tilesegment.dask import segment
    from tilesegment.infer.source import open_source
    from tilesegment.io import open_slide
    from tilesegment.model import load_checkpoint

    with open_slide(slide) as reader:  # the pixels the run read: resampled to 1 um/px
        source = open_source(reader, load_checkpoint(model)[1], OPTIONS)
        h, w = source.image_shape
        pixels = source.reader.read_region(source.level, 0, 0, h, w)
    image = zarr.create_array(
        tmp_path / "pixels.zarr", data=pixels, chunks=(512, 512, 3), shards=(1024, 1024, 3)
    )
    probabilities, mask = segment(
        image, model, output="both", dtype="uint8", precision="fp32", tile_size=572
    )
    store = OutputStore.open(outputs["ngff-0.5"])
    stored = da.from_zarr(store.probabilities)
    stored_mask = da.from_zarr(store.mask)
    tissue = da.from_zarr(store.label("tissue")) > 0
    got, got_mask, want, want_mask, inside = dask.compute(
        probabilities, mask, stored, stored_mask, tissue, scheduler="threads"
    )
    # The run skips tiles without tissue (left 0); compare where it computed.
    computed = np.broadcast_to(inside, want.shape)
    diff = np.abs(got.astype(np.int16) - want)[computed]
    assert inside.mean() > 0.3
    # Interior blocks are the run's tiles exactly; edge blocks are shorter forward passes.
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.9999
    assert (got_mask == want_mask)[inside].mean() >= 0.9999


def test_report_and_resume_record_the_format(outputs, model, slide):
    from tilesegment.errors import ConfigError
    from tilesegment.store.layout import report_path

    report = json.loads(report_path(outputs["ngff-0.5"]).read_text())
    assert report["status"] == "complete"
    # Resuming a 0.5 output as 0.4 (or the reverse) is refused, naming the difference.
    with pytest.raises(ConfigError, match=r"format 'ngff-0.5' -> None"):
        run_slide(slide, outputs["ngff-0.5"], model, replace(OPTIONS, resume=True))
