"""Instances, measurements and GeoJSON from real output stores with many chunk-crossing nuclei."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.draw import disk

from tilesegment import postprocess
from tilesegment.cli.export import export
from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.postprocess import (
    InstanceOptions,
    default_table_path,
    export_geojson,
    instance_polygon,
    iter_features,
    label_chunked,
    label_instances,
    measure_instances,
    postprocess_output,
)
from tilesegment.postprocess import geojson as geojson_module
from tilesegment.store import ClassSpec, OutputStore, is_complete

shapely = pytest.importorskip("shapely")

CLASSES = ClassSpec(("background", "nucleus"), ((0, 0, 0, 0), (200, 40, 90, 255)))
SHAPE = (200, 250)  # not a multiple of the chunk: clipped edge chunks
CHUNK = (64, 64)
MPP = (0.5, 0.5)  # 10 µm² = 40 px
MIN_AREA_PX = 40


# --- synthetic stores -----------------------------------------------------------------------


def draw_objects(seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """A truth image of separate objects (>= 2 px apart) and the values of special ones.

    Special objects: a disk on the chunk corner (64, 64) spanning 4 chunks, an annulus on the
    corner (128, 128) (4 chunks and a hole), a U whose arms cross the chunk row border at
    y = 128 twice and join below it, and two objects too small to keep.
    """
    truth = np.zeros(SHAPE, dtype=np.int32)
    special = {}

    def place(pixels: np.ndarray, name: str | None = None) -> bool:
        value = int(truth.max()) + 1
        grown = ndimage.binary_dilation(pixels, iterations=2, structure=np.ones((3, 3)))
        if truth[grown].any():
            return False
        truth[pixels] = value
        if name:
            special[name] = value
        return True

    def disk_mask(centre: tuple[float, float], radius: float) -> np.ndarray:
        m = np.zeros(SHAPE, dtype=bool)
        m[disk(centre, radius, shape=SHAPE)] = True
        return m

    assert place(disk_mask((64, 64), 9), "corner")
    annulus = disk_mask((128, 128), 14) & ~disk_mask((128, 128), 6)
    assert place(annulus, "annulus")
    u = np.zeros(SHAPE, dtype=bool)
    u[100:150, 200:204] = True
    u[100:150, 214:218] = True
    u[146:150, 200:218] = True
    assert place(u, "u")
    tiny = np.zeros(SHAPE, dtype=bool)
    tiny[10:13, 120:123] = True  # 9 px
    assert place(tiny, "tiny")
    assert place(disk_mask((180, 20), 3), "small")  # 29 px < 40 px
    rng = np.random.default_rng(seed)
    for _ in range(400):
        centre = (rng.uniform(0, SHAPE[0]), rng.uniform(0, SHAPE[1]))
        place(disk_mask(centre, rng.uniform(4, 9)))
    return truth, special


def probabilities(truth: np.ndarray, seed: int = 1) -> np.ndarray:
    """(2, H, W) probabilities whose argmax is ``truth > 0``, varying inside objects."""
    rng = np.random.default_rng(seed)
    noise = rng.random(truth.shape, dtype=np.float32)
    p1 = np.where(truth > 0, 0.55 + 0.45 * noise, 0.45 * noise).astype(np.float32)
    return np.stack([1 - p1, p1])


def build_store(
    path: Path,
    truth: np.ndarray,
    *,
    mpp: tuple[float, float] | None = MPP,
    attrs: dict | None = None,
    finish: bool = True,
    dtype: str = "uint8",
) -> Path:
    store = OutputStore.create(
        path,
        image_shape=truth.shape,
        classes=CLASSES,
        chunk_shape=CHUNK,
        mpp=mpp,
        attrs=attrs,
        dtype=dtype,
    )
    p = probabilities(truth)
    boxes = list(store.chunk_boxes())
    for box in boxes if finish else boxes[:3]:
        store.write_chunk(box, p[(slice(None), *box.slices)])
    if finish:
        store.finalize()
    return path


def reference_labels(fg: np.ndarray, connectivity: int = 4, min_area_px: float = 0) -> np.ndarray:
    """Whole-image scipy labels, small ones removed, renumbered by first pixel in raster order."""
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    lab, _ = ndimage.label(fg, structure=structure)
    values, first = np.unique(lab.ravel(), return_index=True)
    area = np.bincount(lab.ravel())
    keep = (values > 0) & (area[values] >= min_area_px)
    values, first = values[keep], first[keep]
    lut = np.zeros(lab.max() + 1, dtype=np.uint32)
    lut[values[np.argsort(first)]] = np.arange(1, len(values) + 1)
    return lut[lab]


def assemble(labels: postprocess.ChunkedLabels, fg: np.ndarray) -> np.ndarray:
    out = np.zeros(fg.shape, dtype=np.uint32)
    (h, w), (cy, cx) = fg.shape, labels.chunk_shape
    for y in range(0, h, cy):
        for x in range(0, w, cx):
            box = Box(y, x, min(cy, h - y), min(cx, w - x))
            out[box.slices] = labels.relabel(box, fg[box.slices])
    return out


@pytest.fixture(scope="module")
def drawn() -> tuple[np.ndarray, dict[str, int]]:
    return draw_objects()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, drawn) -> tuple[Path, postprocess.InstanceSummary]:
    """A finished store from slide level 1 (level0_per_px 2) with labels/nuclei computed."""
    truth, _ = drawn
    path = tmp_path_factory.mktemp("pp") / "slide.zarr"
    build_store(path, truth, attrs={"level": 1, "level0_per_px": [2.0, 2.0]})
    return path, label_instances(path, InstanceOptions(min_area_um2=10.0))


@pytest.fixture(scope="module")
def nuclei(labelled) -> np.ndarray:
    return OutputStore.open(labelled[0]).label("nuclei")[:]


# --- chunk-consistent labelling -------------------------------------------------------------


def test_instances_are_chunk_consistent_and_match_scipy(labelled, nuclei, drawn):
    _, summary = labelled
    truth, special = drawn
    kept = [v for v in range(1, truth.max() + 1) if (truth == v).sum() >= MIN_AREA_PX]
    assert special["tiny"] not in kept and special["small"] not in kept
    assert summary.count == len(kept) > 100
    assert summary.removed == truth.max() - len(kept) >= 2
    assert summary.min_area_px == pytest.approx(MIN_AREA_PX)
    assert nuclei.dtype == np.uint32
    assert set(np.unique(nuclei)) == set(range(summary.count + 1))  # consecutive ids
    np.testing.assert_array_equal(nuclei, reference_labels(truth > 0, 4, MIN_AREA_PX))
    # One id per drawn object (same partition), including the multi-chunk ones.
    for v in kept:
        ids = np.unique(nuclei[truth == v])
        assert len(ids) == 1 and ids[0] > 0
    assert np.all(nuclei[(truth == special["tiny"]) | (truth == special["small"])] == 0)
    for name in ("corner", "annulus", "u"):
        rows, cols = np.nonzero(truth == special[name])
        assert len({(r // CHUNK[0], c // CHUNK[1]) for r, c in zip(rows, cols, strict=True)}) >= 2
    # Ids follow the first pixel in raster order.
    firsts = [np.flatnonzero(nuclei.ravel() == i)[0] for i in range(1, summary.count + 1)]
    assert firsts == sorted(firsts)


def test_store_stays_valid_ngff_after_adding_nuclei(labelled):
    models = pytest.importorskip("ome_zarr_models.v04")
    path, _ = labelled
    assert is_complete(path)
    root = zarr.open_group(str(path), mode="r")
    assert models.Image.from_zarr(root).labels.attributes.labels == ["mask", "nuclei"]
    models.ImageLabel.from_zarr(root["labels/nuclei"])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    chunks=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    density=st.floats(0.2, 0.75),
    connectivity=st.sampled_from([4, 8]),
    min_area=st.sampled_from([0, 3]),
)
def test_label_chunked_equals_whole_image_labelling(
    seed, shape, chunks, density, connectivity, min_area
):
    fg = np.random.default_rng(seed).random(shape) < density
    labels = label_chunked(
        lambda b: fg[b.slices], shape, chunks, connectivity=connectivity, min_area_px=min_area
    )
    expected = reference_labels(fg, connectivity, min_area)
    np.testing.assert_array_equal(assemble(labels, fg), expected)
    assert labels.count == expected.max()


def test_label_chunked_threads_and_chunk_shapes_agree():
    fg = np.random.default_rng(3).random((90, 70)) < 0.55
    results = [
        assemble(label_chunked(lambda b: fg[b.slices], fg.shape, c, threads=t), fg)
        for c, t in (((90, 70), 1), ((7, 9), 2), ((16, 1), 3))
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_one_px_diagonal_border_separates_with_4_connectivity_only():
    fg = np.ones((20, 20), dtype=bool)
    fg[np.arange(20), 19 - np.arange(20)] = False  # an 8-connected line of background
    read = lambda b: fg[b.slices]  # noqa: E731
    assert label_chunked(read, fg.shape, (8, 8), connectivity=4).count == 2
    assert label_chunked(read, fg.shape, (8, 8), connectivity=8).count == 1


def test_label_chunked_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="connectivity"):
        label_chunked(lambda b: None, (4, 4), (2, 2), connectivity=6)
    with pytest.raises(ConfigError, match="gave shape"):
        label_chunked(lambda b: np.zeros((1, 1), bool), (4, 4), (2, 2))


# --- measurements ---------------------------------------------------------------------------


def test_table_matches_numpy_reference(labelled, nuclei):
    path, summary = labelled
    table = measure_instances(path)
    stored_p = OutputStore.open(path).probabilities[1][:].astype(np.float64) / 255
    assert len(table) == summary.count
    np.testing.assert_array_equal(table.ids, np.arange(1, summary.count + 1))
    rows, cols = np.indices(nuclei.shape)
    for k, i in enumerate(table.ids):
        m = nuclei == i
        r, c = rows[m], cols[m]
        assert table.area_px[k] == m.sum()
        np.testing.assert_allclose(table.centroid_px[k], (r.mean(), c.mean()), rtol=1e-12)
        assert table.bbox_px[k].tolist() == [r.min(), c.min(), r.max() + 1, c.max() + 1]
        assert table.mean_probability[k] == pytest.approx(stored_p[m].mean(), rel=1e-9)
    np.testing.assert_allclose(table.area_um2, table.area_px * 0.25)
    np.testing.assert_allclose(table.centroid_um, table.centroid_px * 0.5)
    np.testing.assert_allclose(table.centroid_level0, (table.centroid_px + 0.5) * 2)
    assert table.mean_probability.min() > 0.55  # argmax foreground: p > 0.5


def test_table_csv_round_trip(labelled, tmp_path):
    path, _ = labelled
    table = measure_instances(path)
    (csv_path,) = postprocess.write_table(table, tmp_path / "t.csv", parquet=False)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["id", "centroid_y_um", "centroid_x_um"]
    data = np.loadtxt(csv_path, delimiter=",", skiprows=1)
    assert data.shape == (len(table), len(header))
    cols = dict(zip(header, data.T, strict=True))
    np.testing.assert_array_equal(cols["id"], table.ids)
    np.testing.assert_array_equal(cols["area_px"], table.area_px)
    np.testing.assert_allclose(cols["centroid_x_level0_px"], table.centroid_level0[:, 1], atol=1e-3)
    np.testing.assert_allclose(cols["mean_probability"], table.mean_probability, atol=1e-5)
    assert default_table_path(path) == path.parent / "slide.nuclei.csv"


# --- polygons and GeoJSON -------------------------------------------------------------------


def test_instance_polygon_is_the_pixel_outline():
    rng = np.random.default_rng(5)
    for _ in range(30):
        blob = ndimage.binary_opening(rng.random((15, 17)) < 0.6)
        lab, n = ndimage.label(blob)
        if n == 0:
            continue
        m = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
        exact = instance_polygon(m, origin=(3, 4), simplify_px=0)
        assert exact.is_valid and exact.area == m.sum()
        rows, cols = np.nonzero(m)
        assert exact.bounds == (cols.min() + 4, rows.min() + 3, cols.max() + 5, rows.max() + 4)
        assert exact.exterior.is_ccw
        smooth = instance_polygon(m, origin=(3, 4))
        assert smooth.is_valid
        assert abs(smooth.area - m.sum()) <= 0.5 * exact.length


def test_geojson_features_for_qupath(labelled, nuclei, tmp_path):
    path, summary = labelled
    out = tmp_path / "nuclei.geojson"
    assert export_geojson(path, out, simplify_px=0) == summary.count
    doc = json.load(out.open())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == summary.count
    table = measure_instances(path)
    by_id = {}
    for f in doc["features"]:
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"] == {"name": "Nucleus", "color": [200, 40, 90]}
        assert f["geometry"]["type"] == "Polygon"
        by_id[props["measurements"]["id"]] = f
    assert sorted(by_id) == table.ids.tolist()
    for k, i in enumerate(table.ids):
        poly = shapely.geometry.shape(by_id[i]["geometry"])
        assert poly.is_valid
        # level0_per_px 2: exact pixel outline, doubled; GeoJSON order is (x, y).
        assert poly.area == pytest.approx(4 * table.area_px[k])
        y0, x0, y1, x1 = table.bbox_px[k]
        assert poly.bounds == (2 * x0, 2 * y0, 2 * x1, 2 * y1)
        m = by_id[i]["properties"]["measurements"]
        assert m["area_px"] == table.area_px[k]
        assert m["area_um2"] == pytest.approx(table.area_um2[k])
    annulus = int(nuclei[128, 118])  # on the ring: centre (128, 128), radii 6..14
    assert annulus > 0
    assert len(by_id[annulus]["geometry"]["coordinates"]) == 2  # shell + hole


def test_geojson_simplified_and_downsample_override(labelled, nuclei, tmp_path):
    path, _ = labelled
    table = measure_instances(path)
    export_geojson(path, tmp_path / "d1.geojson", downsample=1.0)
    export_geojson(path, tmp_path / "d2.geojson")  # level0_per_px 2 from the store
    one = json.load((tmp_path / "d1.geojson").open())["features"]
    two = json.load((tmp_path / "d2.geojson").open())["features"]
    assert len(one) == len(two) == len(table)
    for f1, f2 in zip(one, two, strict=True):
        i = f1["properties"]["measurements"]["id"]
        assert f2["properties"]["measurements"]["id"] == i
        for r1, r2 in zip(
            f1["geometry"]["coordinates"], f2["geometry"]["coordinates"], strict=True
        ):
            np.testing.assert_allclose(np.asarray(r2), 2 * np.asarray(r1))
        poly = shapely.geometry.shape(f1["geometry"])
        y0, x0, y1, x1 = table.bbox_px[i - 1]
        exact = instance_polygon(nuclei[y0:y1, x0:x1] == i, origin=(y0, x0), simplify_px=0)
        assert poly.is_valid and len(poly.interiors) == len(exact.interiors)
        assert len(poly.exterior.coords) <= len(exact.exterior.coords)
        # Douglas-Peucker moves the outline by at most the tolerance (0.5 px).
        assert abs(poly.area - exact.area) <= 0.5 * exact.length
        assert poly.hausdorff_distance(exact) <= 0.5 + 1e-9


def test_features_are_streamed_lazily(labelled, monkeypatch, tmp_path):
    path, summary = labelled
    reads = []
    real_read = geojson_module._read_region

    def counting(array, box):
        reads.append(box)
        return real_read(array, box)

    monkeypatch.setattr(geojson_module, "_read_region", counting)
    chunks = len(list(OutputStore.open(path).chunk_boxes()))
    features = iter_features(path, threads=1)
    assert inspect.isgenerator(features) and reads == []
    next(features)
    assert len(reads) == 1  # one chunk region read for the first feature, not the image
    assert sum(1 for _ in features) == summary.count - 1
    assert 1 < len(reads) <= chunks  # each region read once
    reads.clear()
    features = iter_features(path, threads=2)
    next(features)
    assert len(reads) <= 4 < chunks  # at most 2 * threads regions ahead
    features.close()

    def whole_dump(*args, **kwargs):
        raise AssertionError("the collection must not be dumped in one go")

    dumped = []
    real_dumps = json.dumps

    def per_feature(obj, **kwargs):
        dumped.append(obj["type"])
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(geojson_module.json, "dump", whole_dump)
    monkeypatch.setattr(geojson_module.json, "dumps", per_feature)
    export_geojson(path, tmp_path / "s.geojson")
    assert dumped == ["Feature"] * summary.count


# --- lifecycle, mpp-less stores and the command line ----------------------------------------


def test_unknown_mpp_uses_pixels(tmp_path, drawn):
    truth, _ = drawn
    path = build_store(tmp_path / "px.zarr", truth, mpp=None)
    result = postprocess_output(
        path, InstanceOptions(min_area_um2=30), geojson=tmp_path / "px.geojson"
    )
    expected = reference_labels(truth > 0, 4, 30)
    assert result.instances == expected.max()
    np.testing.assert_array_equal(OutputStore.open(path).label("nuclei")[:], expected)
    table = measure_instances(path)
    assert np.isnan(table.area_um2).all()
    feature = json.load((tmp_path / "px.geojson").open())["features"][0]
    assert "area_um2" not in feature["properties"]["measurements"]
    assert result.tables == (tmp_path / "px.nuclei.csv",)


def test_probability_threshold_on_float32_store(tmp_path, drawn):
    truth, _ = drawn
    path = build_store(tmp_path / "f.zarr", truth, dtype="float32")
    summary = label_instances(path, InstanceOptions(threshold=0.8, min_area_um2=2.0))
    fg = probabilities(truth)[1] >= 0.8  # scattered pixels: many small fragments
    expected = reference_labels(fg, 4, 8)
    assert summary.count == expected.max() > 10 and summary.threshold == 0.8
    np.testing.assert_array_equal(OutputStore.open(path).label("nuclei")[:], expected)
    with pytest.raises(ConfigError, match="threshold"):
        label_instances(path, InstanceOptions(threshold=1.5))
    with pytest.raises(ConfigError, match="class_id"):
        label_instances(path, InstanceOptions(class_id=2))


def test_image_without_nuclei(tmp_path):
    path = build_store(tmp_path / "empty.zarr", np.zeros(SHAPE, dtype=np.int32))
    result = postprocess_output(path, geojson=tmp_path / "e.geojson")
    assert result.instances == 0 and result.computed.count == 0
    assert json.load((tmp_path / "e.geojson").open()) == {
        "type": "FeatureCollection",
        "features": [],
    }
    assert len(result.tables[0].read_text().splitlines()) == 1  # the header only


def test_interrupted_export_is_recomputed(tmp_path, drawn):
    truth, _ = drawn
    path = build_store(tmp_path / "i.zarr", truth)
    with pytest.raises(ConfigError, match="has no finished labels/nuclei"):
        postprocess_output(path, instances=False)
    OutputStore.open(path, "r+").create_label("nuclei", dtype="uint32")  # then "crash"
    assert not is_complete(path)
    with pytest.raises(StoreError, match="left unfinished"):
        measure_instances(path)
    with pytest.raises(StoreError, match=r"left unfinished.*--instances"):
        postprocess_output(path, instances=False)
    result = postprocess_output(path)
    assert result.computed is not None and is_complete(path)
    np.testing.assert_array_equal(
        OutputStore.open(path).label("nuclei")[:], reference_labels(truth > 0, 4, MIN_AREA_PX)
    )


def test_cli_export_writes_table_and_geojson(tmp_path, labelled):
    path = tmp_path / "cli.zarr"
    shutil.copytree(labelled[0], path)
    runner = CliRunner()
    args = [str(path), "--geojson", str(tmp_path / "x.geojson"), "--table", str(tmp_path / "x.csv")]
    result = runner.invoke(export, args)
    assert result.exit_code == 0, result.output
    assert "reused labels/nuclei" in result.output  # the fixture's labels were kept
    n = labelled[1].count
    assert len(json.load((tmp_path / "x.geojson").open())["features"]) == n
    assert len((tmp_path / "x.csv").read_text().splitlines()) == n + 1

    # Recompute with 8-connectivity and a larger minimum area: the label is replaced.
    result = runner.invoke(
        export, [*args, "--instances", "--connectivity", "8", "--min-area", "20"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("labelled")
    truth = draw_objects()[0]
    np.testing.assert_array_equal(
        OutputStore.open(path).label("nuclei")[:], reference_labels(truth > 0, 8, 80)
    )
    assert is_complete(path)
    root = zarr.open_group(str(path), mode="r")
    assert root["labels"].attrs["labels"] == ["mask", "nuclei"]
    models = pytest.importorskip("ome_zarr_models.v04")
    models.ImageLabel.from_zarr(root["labels/nuclei"])


def test_cli_export_refuses_incomplete_or_missing_store(tmp_path, drawn):
    path = build_store(tmp_path / "half.zarr", drawn[0], finish=False)
    result = CliRunner().invoke(export, [str(path), "--geojson", str(tmp_path / "h.geojson")])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert "is incomplete (the run did not finish)" in message and "--overwrite" in message
    assert not (tmp_path / "h.geojson").exists()
    result = CliRunner().invoke(export, [str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2 and "does not exist" in result.output
