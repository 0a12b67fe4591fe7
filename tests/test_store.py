"""Tests of the OME-Zarr output store: exact data, pyramids, NGFF validity, completion, safety."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from tilesegment.errors import ConfigError, StoreError
from tilesegment.geometry import Box
from tilesegment.store import ClassSpec, OutputStore, is_complete, pyramid_shapes

CLASSES = ClassSpec(
    names=("background", "tumour", "stroma"),
    colours=((0, 0, 0, 0), (220, 20, 60, 255), (46, 139, 87, 255)),
)
SHAPE = (1301, 2099)  # odd on both axes, and at every pyramid level along y
CHUNK = (384, 512)
MPP = (0.25, 0.26)


def chunk_probabilities(box: Box, classes: int = len(CLASSES)) -> np.ndarray:
    """Deterministic random softmax-like probabilities for one box, (C, h, w) float32."""
    rng = np.random.default_rng([box.y, box.x, classes])
    p = rng.random((classes, box.h, box.w), dtype=np.float32) ** 3
    return p / p.sum(axis=0)


def write_all(store: OutputStore, order_seed: int = 0) -> np.ndarray:
    """Write every chunk of ``store`` in shuffled order; return the full float probabilities."""
    full = np.zeros((len(store.classes), *store.image_shape), dtype=np.float32)
    boxes = list(store.chunk_boxes())
    np.random.default_rng(order_seed).shuffle(boxes)
    for box in boxes:
        p = chunk_probabilities(box)
        store.write_chunk(box, p)
        full[(slice(None), *box.slices)] = p
    return full


def reference_mean(a: np.ndarray) -> np.ndarray:
    """2 x 2 mean over the last two axes in float64, averaging the pixels present at odd
    edges (windows summed with ``np.add.reduceat``)."""
    h, w = a.shape[-2:]
    rows, cols = np.arange(0, h, 2), np.arange(0, w, 2)
    sums = np.add.reduceat(np.add.reduceat(a.astype(np.float64), rows, -2), cols, -1)
    counts = np.outer(np.add.reduceat(np.ones(h), rows), np.add.reduceat(np.ones(w), cols))
    return sums / counts


def _write_boxes(path: str, boxes: list[tuple[int, int, int, int]]) -> int:
    """Worker process body: open the store by path and write its share of chunks."""
    store = OutputStore.open(path, mode="r+")
    for y, x, h, w in boxes:
        box = Box(y, x, h, w)
        store.write_chunk(box, chunk_probabilities(box))
    return len(boxes)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A finalised uint8 store of awkward size written in shuffled order, and its inputs."""
    path = tmp_path_factory.mktemp("store") / "out.zarr"
    store = OutputStore.create(
        path,
        image_shape=SHAPE,
        classes=CLASSES,
        chunk_shape=CHUNK,
        mpp=MPP,
        attrs={"model": "unet-test"},
    )
    full = write_all(store, order_seed=1)
    store.finalize()
    return path, full


def small_store(path: Path, **kwargs) -> OutputStore:
    args = {
        "image_shape": (300, 500),
        "classes": CLASSES,
        "chunk_shape": (128, 128),
        "mpp": MPP,
    }
    args.update(kwargs)
    return OutputStore.create(path, **args)


# --- data -----------------------------------------------------------------------------------


def test_level0_is_quantised_probabilities_and_mask_is_argmax(finished):
    path, full = finished
    store = OutputStore.open(path)
    assert store.probabilities.dtype == np.uint8
    assert store.probabilities.chunks == (3, *CHUNK)
    np.testing.assert_array_equal(
        store.probabilities[:], np.rint(np.clip(full, 0, 1) * 255).astype(np.uint8)
    )
    assert store.mask.dtype == np.uint8
    np.testing.assert_array_equal(store.mask[:], np.argmax(full, axis=0))


def test_pyramid_levels_match_numpy_reference(finished):
    path, _ = finished
    store = OutputStore.open(path)
    image, mask = store.pyramid(), store.pyramid("mask")
    assert [a.shape[1:] for a in image] == [(1301, 2099), (651, 1050), (326, 525)]
    assert [a.shape for a in mask] == [a.shape[1:] for a in image]
    assert max(image[-1].shape[1:]) <= 1024 < max(image[-2].shape[1:])
    previous = image[0][:]
    for k in range(1, len(image)):
        expected = np.rint(reference_mean(previous)).astype(np.uint8)
        got = image[k][:]
        np.testing.assert_array_equal(got, expected)
        clipped = tuple(min(c, n) for c, n in zip(CHUNK, got.shape[1:], strict=True))
        assert image[k].chunks == (3, *clipped)
        np.testing.assert_array_equal(mask[k][:], mask[0][:: 2**k, :: 2**k])
        previous = got


@pytest.mark.parametrize(
    "fmt, shards", [("ngff-0.4", None), ("ngff-0.5", (256, 256))], ids=["0.4", "0.5-sharded"]
)
def test_pyramid_over_unwritten_chunks_is_zero_and_costs_no_file(
    tmp_path, monkeypatch, fmt, shards
):
    """A slide that is mostly glass has most level-0 chunks never written: the levels below
    hold 0 there (the value downsampling gives) without a chunk computed or a file written, and
    the written corner is downsampled as anywhere else."""
    from tilesegment.store import levels
    from tilesegment.store.layout import stored_blocks

    computed = []
    mean = levels.DOWNSAMPLERS["mean"]
    monkeypatch.setitem(levels.DOWNSAMPLERS, "mean", lambda b: computed.append(1) or mean(b))
    store = OutputStore.create(
        tmp_path / "out.zarr",
        image_shape=(2100, 2900),
        classes=CLASSES,
        chunk_shape=(128, 128),
        mpp=MPP,
        format=fmt,
        shard_shape=shards,
    )
    corner = Box(128, 256, 128, 128)  # one chunk of tissue
    store.write_chunk(corner, chunk_probabilities(corner))
    store.finalize()
    image, mask = store.pyramid(), store.pyramid("mask")
    assert len(image) == 3  # 2100 -> 1050 -> 525
    assert len(computed) == 2  # one chunk per level, of 9 x 12 and 5 x 6
    # The chunk (or shard) files are listed, so empty regions are not even read.
    block = {(1, 2)} if shards is None else {(0, 1)}
    assert stored_blocks(store.path / "0") == block
    assert stored_blocks(store.path / "labels" / "mask" / "0") == block
    previous = image[0][:]
    assert previous[:, 128:256, 256:384].any() and not previous[:, :128].any()
    for k in range(1, len(image)):
        got = image[k][:]
        np.testing.assert_array_equal(got, np.rint(reference_mean(previous)).astype(np.uint8))
        np.testing.assert_array_equal(mask[k][:], mask[0][:: 2**k, :: 2**k])
        previous = got
        # One chunk (or shard) file: the corner's; every other one reads as the fill, 0.
        level = store.path / str(k)
        stored = [
            f for f in level.rglob("*") if f.is_file() and not f.name.startswith((".", "zarr"))
        ]
        assert len(stored) == 1, stored


def test_pyramid_shapes_stop_at_1024():
    assert pyramid_shapes((1024, 1024)) == [(1024, 1024)]
    assert pyramid_shapes((1025, 3)) == [(1025, 3), (513, 2)]
    assert pyramid_shapes((100_000, 100_001))[-1] == (782, 782)


def test_store_layout_is_zarr_v2_with_slash_separator(finished):
    path, _ = finished
    for key in ("0", "2", "labels/mask/0", "labels/mask/2"):
        meta = json.loads((path / key / ".zarray").read_text())
        assert meta["zarr_format"] == 2
        assert meta["dimension_separator"] == "/"
        assert meta["fill_value"] == 0
        assert meta["compressor"]["id"] == "blosc"
    assert (path / "0" / "0" / "0" / "0").is_file()


# --- NGFF metadata --------------------------------------------------------------------------


def test_validates_with_ome_zarr_models(finished):
    models = pytest.importorskip("ome_zarr_models.v04")
    path, _ = finished
    root = zarr.open_group(str(path), mode="r")
    image = models.Image.from_zarr(root)
    (multiscale,) = image.attributes.multiscales
    assert [a.name for a in multiscale.axes] == ["c", "y", "x"]
    assert [a.type for a in multiscale.axes] == ["channel", "space", "space"]
    assert [a.unit for a in multiscale.axes][1:] == ["micrometer", "micrometer"]
    scales = [list(d.coordinateTransformations[0].scale) for d in multiscale.datasets]
    assert scales == [[1.0, MPP[0] * 2**k, MPP[1] * 2**k] for k in range(3)]
    assert [c.label for c in image.attributes.omero.channels] == list(CLASSES.names)
    assert image.labels is not None and image.labels.attributes.labels == ["mask"]

    label = models.ImageLabel.from_zarr(root["labels/mask"])
    meta = label.attributes.image_label
    assert meta.source.image == "../../"
    assert {c.label_value: tuple(c.rgba) for c in meta.colors} == dict(enumerate(CLASSES.colours))
    (multiscale,) = label.attributes.multiscales
    scales = [list(d.coordinateTransformations[0].scale) for d in multiscale.datasets]
    assert scales == [[MPP[0] * 2**k, MPP[1] * 2**k] for k in range(3)]


def test_opens_with_ome_zarr_reader(finished):
    pytest.importorskip("ome_zarr")
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path, full = finished
    nodes = list(Reader(parse_url(path, fmt=FormatV04()))())
    image = next(n for n in nodes if n.load(Multiscales) and not n.load(Label))
    assert image.metadata["channel_names"] == list(CLASSES.names)
    assert [d.shape for d in image.data] == [(3, 1301, 2099), (3, 651, 1050), (3, 326, 525)]
    assert image.metadata["coordinateTransformations"][0] == [
        {"type": "scale", "scale": [1.0, *MPP]}
    ]
    mask = next(n for n in nodes if n.load(Label))
    assert mask.metadata["name"] == "mask"
    assert set(mask.metadata["color"]) == {0, 1, 2}
    np.testing.assert_array_equal(np.asarray(mask.data[2]), np.argmax(full, 0)[::4, ::4])


def test_unknown_mpp_writes_pixel_scales_without_unit(tmp_path):
    store = small_store(tmp_path / "px.zarr", image_shape=(1500, 700), mpp=None)
    store.finalize()
    attrs = json.loads((tmp_path / "px.zarr" / ".zattrs").read_text())
    (multiscale,) = attrs["multiscales"]
    assert all("unit" not in axis for axis in multiscale["axes"])
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert scales == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]


# --- completion and concurrency -------------------------------------------------------------


def test_incomplete_until_finalize(tmp_path):
    path = tmp_path / "run.zarr"
    store = small_store(path, attrs={"slide": "a.svs"})
    assert not is_complete(path) and not store.is_complete()
    root_attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    assert "multiscales" not in root_attrs and "omero" not in root_attrs
    assert root_attrs["tilesegment"]["status"] == "incomplete"
    assert "image-label" not in dict(zarr.open_group(str(path / "labels" / "mask")).attrs)

    writer = OutputStore.open(path, mode="r+")  # as a separate worker would
    write_all(writer)
    assert not is_complete(path)
    OutputStore.open(path, mode="r+").finalize()
    assert is_complete(path)
    done = OutputStore.open(path)
    assert done.attrs == {"slide": "a.svs"}
    assert "multiscales" in dict(zarr.open_group(str(path), mode="r").attrs)


def test_is_complete_is_false_for_missing_or_foreign_paths(tmp_path):
    assert not is_complete(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=2)
    assert not is_complete(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="not a tilesegment output store"):
        OutputStore.open(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="not a tilesegment output store"):
        OutputStore.open(tmp_path / "missing.zarr")


def test_parallel_writer_processes(tmp_path):
    path = tmp_path / "par.zarr"
    store = small_store(path, image_shape=(700, 900))
    boxes = [(b.y, b.x, b.h, b.w) for b in store.chunk_boxes()]
    shares = [boxes[0::2], boxes[1::2]]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        assert sum(pool.map(_write_boxes, [str(path)] * 2, shares)) == len(boxes)
    store.finalize()
    assert is_complete(path)
    expected = np.zeros((3, 700, 900), np.float32)
    for y, x, h, w in boxes:
        expected[:, y : y + h, x : x + w] = chunk_probabilities(Box(y, x, h, w))
    np.testing.assert_array_equal(store.mask[:], np.argmax(expected, 0))
    np.testing.assert_array_equal(store.probabilities[:], np.rint(expected * 255))


def test_write_after_finalize_or_read_only_is_refused(tmp_path):
    path = tmp_path / "ro.zarr"
    store = small_store(path)
    box = Box(0, 0, 128, 128)
    with pytest.raises(StoreError, match="read-only"):
        OutputStore.open(path).write_chunk(box, chunk_probabilities(box))
    store.finalize()
    with pytest.raises(StoreError, match="finalised"):
        OutputStore.open(path, mode="r+").write_chunk(box, chunk_probabilities(box))


# --- creation safety ------------------------------------------------------------------------


def test_refuses_existing_path_without_overwrite(tmp_path):
    path = tmp_path / "OUT.zarr"
    small_store(path)
    with pytest.raises(StoreError, match=r"OUT\.zarr already exists; pass --overwrite"):
        small_store(path)


def test_overwrite_replaces_a_store(tmp_path):
    path = tmp_path / "OUT.zarr"
    old = small_store(path)
    write_all(old)
    old.finalize()
    new = small_store(path, image_shape=(200, 250), overwrite=True)
    assert new.image_shape == (200, 250)
    assert not is_complete(path)
    assert not (path / "0" / "0" / "0" / "0").exists()  # old chunks are gone


def test_overwrite_accepts_an_empty_directory(tmp_path):
    path = tmp_path / "empty.zarr"
    path.mkdir()
    with pytest.raises(StoreError, match="already exists"):
        small_store(path)
    small_store(path, overwrite=True)
    assert (path / ".zgroup").is_file()


@pytest.mark.parametrize("kind", ["plain", "foreign-zarr", "file"])
def test_overwrite_refuses_to_delete_other_things(tmp_path, kind):
    path = tmp_path / "precious"
    if kind == "file":
        path.write_text("data")
    else:
        path.mkdir()
        (path / "thesis.tex").write_text("data")
        if kind == "foreign-zarr":
            (path / ".zgroup").write_text('{"zarr_format": 2}')
    with pytest.raises(StoreError, match="refusing"):
        small_store(path, overwrite=True)
    assert path.exists()
    if kind != "file":
        assert (path / "thesis.tex").read_text() == "data"


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "match"),
    [
        (Box(1, 0, 128, 128), "not chunk-aligned along y"),
        (Box(0, 64, 128, 128), "not chunk-aligned along x"),
        (Box(0, 0, 100, 128), "not chunk-aligned along y"),
        (Box(256, 0, 128, 128), "outside the image"),
        (Box(256, 384, 44, 100), "not chunk-aligned along x"),
    ],
)
def test_misaligned_box_is_refused(tmp_path, box, match):
    store = small_store(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match=match):
        store.write_chunk(box, np.zeros((3, box.h, box.w), np.float32))


def test_edge_and_multi_chunk_boxes_are_accepted(tmp_path):
    store = small_store(tmp_path / "a.zarr")
    for box in (Box(256, 384, 44, 116), Box(0, 0, 256, 384)):
        p = chunk_probabilities(box)
        store.write_chunk(box, p)
        np.testing.assert_array_equal(store.mask[box.slices], np.argmax(p, 0))


def test_bad_probabilities_are_refused(tmp_path):
    store = small_store(tmp_path / "a.zarr")
    box = Box(0, 0, 128, 128)
    with pytest.raises(StoreError, match="shape"):
        store.write_chunk(box, np.zeros((2, 128, 128), np.float32))
    with pytest.raises(StoreError, match=r"\[0, 1\]"):
        store.write_chunk(box, np.full((3, 128, 128), 3.5, np.float32))
    with pytest.raises(StoreError, match=r"\[0, 1\]"):
        store.write_chunk(box, np.full((3, 128, 128), np.nan, np.float32))


def test_bad_arguments_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        small_store(tmp_path / "a.zarr", dtype="float16")
    with pytest.raises(ConfigError, match="reserved"):
        small_store(tmp_path / "b.zarr", attrs={"status": "x"})
    with pytest.raises(ConfigError, match="one colour per class"):
        ClassSpec(("a", "b"), ((0, 0, 0, 0),))


def test_float32_option(tmp_path):
    store = small_store(tmp_path / "f.zarr", image_shape=(1101, 301), dtype="float32")
    full = write_all(store)
    store.finalize()
    levels = store.pyramid()
    assert [a.dtype for a in levels] == [np.float32, np.float32]
    np.testing.assert_array_equal(levels[0][:], full)
    np.testing.assert_allclose(levels[1][:], reference_mean(full), rtol=1e-6)
    omero = json.loads((tmp_path / "f.zarr" / ".zattrs").read_text())["omero"]
    assert omero["channels"][0]["window"]["end"] == 1.0


# --- further labels -------------------------------------------------------------------------


def test_generic_labels_nuclei_and_tissue(tmp_path):
    models = pytest.importorskip("ome_zarr_models.v04")
    path = tmp_path / "labels.zarr"
    store = small_store(path, image_shape=(1100, 300))
    write_all(store)
    store.create_label("nuclei", dtype="uint32")
    store.create_label("tissue", dtype="uint8", colours={0: (0, 0, 0, 0), 1: (0, 0, 255, 128)})
    rng = np.random.default_rng(7)
    nuclei = rng.integers(0, 2**32 - 1, size=(1100, 300), dtype=np.int64)
    tissue = rng.integers(0, 2, size=(1100, 300), dtype=np.uint8)
    for box in store.chunk_boxes():
        store.write_label_chunk("nuclei", box, nuclei[box.slices])
        store.write_label_chunk("tissue", box, tissue[box.slices])
    with pytest.raises(StoreError, match="do not fit"):
        store.write_label_chunk("tissue", Box(0, 0, 128, 128), np.full((128, 128), 300))
    with pytest.raises(StoreError, match="already has a label"):
        store.create_label("tissue", dtype="uint8")
    store.finalize()

    assert store.label("nuclei").dtype == np.uint32
    np.testing.assert_array_equal(store.label("nuclei")[:], nuclei)
    np.testing.assert_array_equal(store.pyramid("nuclei")[1][:], nuclei[::2, ::2])
    root = zarr.open_group(str(path), mode="r")
    assert models.Image.from_zarr(root).labels.attributes.labels == ["mask", "nuclei", "tissue"]
    for name in ("mask", "nuclei", "tissue"):
        models.ImageLabel.from_zarr(root[f"labels/{name}"])
    tissue_meta = models.ImageLabel.from_zarr(root["labels/tissue"]).attributes.image_label
    assert [tuple(c.rgba) for c in tissue_meta.colors] == [(0, 0, 0, 0), (0, 0, 255, 128)]


def test_label_added_after_completion_reopens_the_run(tmp_path):
    path = tmp_path / "later.zarr"
    store = small_store(path)
    write_all(store)
    store.finalize()
    image_attrs = json.loads((path / ".zattrs").read_text())["multiscales"]

    later = OutputStore.open(path, mode="r+")
    later.create_label("nuclei", dtype="uint32")
    assert not is_complete(path)
    assert json.loads((path / "labels" / ".zattrs").read_text())["labels"] == ["mask"]
    later.finalize()
    assert is_complete(path)
    assert json.loads((path / "labels" / ".zattrs").read_text())["labels"] == ["mask", "nuclei"]
    assert json.loads((path / ".zattrs").read_text())["multiscales"] == image_attrs


@pytest.mark.parametrize("classes", [1, 2, 3, 5])
def test_class_map_is_numpys_argmax_with_first_class_winning_ties(classes):
    from tilesegment.store import class_map

    rng = np.random.default_rng(classes)
    p = rng.random((classes, 67, 45)).astype(np.float32)
    p[:, :5, :5] = 0.5  # exact ties: the first class wins, as in np.argmax
    p[-1, 10:12, 10:12] = 2.0
    got = class_map(p)
    assert got.dtype == np.uint8 and got.shape == (67, 45)
    np.testing.assert_array_equal(got, np.argmax(p, axis=0))


# --- NGFF 0.5: sharded Zarr v3 --------------------------------------------------------------

SHARD = (3 * CHUNK[0], 2 * CHUNK[1])  # 1152 x 1024: 2 x 3 shards, cut by the image edges


def sharded_store(path: Path, **kwargs) -> OutputStore:
    args = {"image_shape": SHAPE, "classes": CLASSES, "chunk_shape": CHUNK, "mpp": MPP}
    return OutputStore.create(
        path, format="ngff-0.5", shard_shape=SHARD, attrs={"model": "unet-test"}, **args, **kwargs
    )


def write_by_shard(store: OutputStore, keep=lambda box: True) -> None:
    """Write every chunk of ``store`` (those ``keep`` accepts) through one ShardBuffer per
    shard, shards in shuffled order."""
    from tilesegment.store.shards import ShardBuffer

    shards: dict[Box, list[Box]] = {}
    for box in store.chunk_boxes():
        if keep(box):
            shards.setdefault(store.shard_box(box), []).append(box)
    order = list(shards)
    np.random.default_rng(2).shuffle(order)
    for shard in order:
        buffer = ShardBuffer(store, shard)
        for box in shards[shard]:
            buffer.write_chunk(box, chunk_probabilities(box))
        buffer.flush()


def test_ngff_05_holds_the_arrays_of_ngff_04_in_whole_shards(finished, tmp_path):
    from ome_zarr_models.v05 import Image, ImageLabel

    path = tmp_path / "out.zarr"
    store = sharded_store(path)
    assert store.format == "ngff-0.5" and store.sharded and store.shard_shape == SHARD
    write_by_shard(store)
    store.finalize()
    reference = OutputStore.open(finished[0])
    for name in (None, "mask"):
        got, want = store.pyramid(name), reference.pyramid(name)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want, strict=True):
            # Shards of the level-0 size, clipped to the (clipped) chunks covering the level.
            chunks = [min(c, n) for c, n in zip(CHUNK, a.shape[-2:], strict=True)]
            assert a.shards[-2:] == tuple(
                min(s, -(-n // c) * c) for s, c, n in zip(SHARD, chunks, a.shape[-2:], strict=True)
            )
            np.testing.assert_array_equal(a[:], b[:])
    # One file per shard: 2 x 3 at level 0 instead of 4 x 5 chunk files.
    assert sorted(p.relative_to(path / "0").as_posix() for p in (path / "0").rglob("c/*/*/*")) == [
        f"c/0/{i}/{j}" for i in range(2) for j in range(3)
    ]
    files = store.chunk_files.files(path, (3, 4), tissue=False)
    assert files == (path / "0/c/0/1/2", path / "labels/mask/0/c/1/2")
    assert all(f.is_file() for f in files)
    root = zarr.open_group(str(path), mode="r")
    Image.from_zarr(root)
    ImageLabel.from_zarr(root["labels/mask"])
    assert root.attrs["tilesegment"]["model"] == "unet-test" and is_complete(path)


def test_a_shard_written_again_keeps_the_chunks_not_rewritten(finished, tmp_path):
    """A shard whose chunks come in two writes (a resumed run) ends whole; chunks never written
    stay 0; single chunks written directly (read-modify-write) land too."""
    store = sharded_store(tmp_path / "again.zarr")
    write_by_shard(store, keep=lambda box: (box.y // CHUNK[0] + box.x // CHUNK[1]) % 2 == 0)
    write_by_shard(store, keep=lambda box: (box.y // CHUNK[0] + box.x // CHUNK[1]) % 2 == 1)
    np.testing.assert_array_equal(
        store.probabilities[:], OutputStore.open(finished[0]).probabilities[:]
    )
    direct = sharded_store(tmp_path / "direct.zarr")
    direct.write_chunk(Box(384, 512, *CHUNK), chunk_probabilities(Box(384, 512, *CHUNK)))
    direct.write_chunk(Box(0, 0, *CHUNK), chunk_probabilities(Box(0, 0, *CHUNK)))
    got = direct.probabilities[:]
    assert got[:, :384, :512].any() and got[:, 384:768, 512:1024].any()
    assert not got[:, :384, 512:1024].any() and not got[:, 768:].any()


def test_shard_options_are_checked(tmp_path):
    args = {"image_shape": SHAPE, "classes": CLASSES, "chunk_shape": CHUNK, "mpp": MPP}
    with pytest.raises(ConfigError, match=r"`shard_shape` needs format 'ngff-0\.5'"):
        OutputStore.create(tmp_path / "a.zarr", **args, shard_shape=SHARD)
    with pytest.raises(ConfigError, match="whole number of chunks"):
        OutputStore.create(tmp_path / "b.zarr", **args, format="ngff-0.5", shard_shape=(500, 1024))
    with pytest.raises(ConfigError, match="`format`"):
        OutputStore.create(tmp_path / "c.zarr", **args, format="ngff-0.6")
    from tilesegment.store.shards import ShardBuffer

    store = sharded_store(tmp_path / "d.zarr")
    buffer = ShardBuffer(store, store.shard_box(Box(0, 0, *CHUNK)))
    with pytest.raises(StoreError, match="outside the shard"):
        buffer.write_chunk(Box(0, 1024, *CHUNK), chunk_probabilities(Box(0, 1024, *CHUNK)))
    with pytest.raises(StoreError, match="not chunk-aligned"):
        buffer.write_chunk(Box(0, 10, *CHUNK), chunk_probabilities(Box(0, 10, *CHUNK)))


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 33, 47), (1, 7, 2), (5, 1), (1, 9), (4, 3, 3)])
def test_uint8_mean_downsample_rounds_half_to_even_like_float_sums(shape):
    from tilesegment.store.ngff import downsample_mean

    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    block = rng.integers(0, 256, shape, dtype=np.uint8)
    h, w = shape[-2:]
    if h >= 4 and w >= 4:  # exact halves: 6 / 4 = 1.5 rounds to 2, 10 / 4 = 2.5 to 2
        block[..., :2, :2] = [[1, 2], [2, 1]]
        block[..., 2:4, 2:4] = [[2, 3], [2, 3]]
    padded = np.zeros((*shape[:-2], h + h % 2, w + w % 2))
    counts = np.zeros((h + h % 2, w + w % 2))
    padded[..., :h, :w] = block
    counts[:h, :w] = 1
    sums = padded.reshape(*shape[:-2], -1, 2, padded.shape[-1] // 2, 2).sum(axis=(-3, -1))
    n = counts.reshape(-1, 2, counts.shape[-1] // 2, 2).sum(axis=(-3, -1))
    got = downsample_mean(block)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.rint(sums / n).astype(np.uint8))
    if h >= 4 and w >= 4:
        assert got[..., 0, 0].tolist() == [2] * got[..., 0, 0].size
        assert got[..., 1, 1].tolist() == [2] * got[..., 1, 1].size
