"""Data discovery for `train` and `evaluate`: every layout loads from real files (PH2, DSB2018,
TNBC, MoNuSeg, ISBI) or from small files written here; partial or ambiguous layouts are
one-line errors naming the files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import data_path
from tests.train.conftest import blob_pair
from tilesegment.errors import ConfigError
from tilesegment.train import data as D
from tilesegment.train.discover import discover, read_list

DSB_IDS = (  # two samples of the stage-1 training set
    "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",
    "97126a9791f0c1176e4563ad679a301dac27c59011f579e808bbd6e9f4cd1034",
)


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def blob(i=0, shape=(40, 48)):
    image, inst = blob_pair(i, shape)
    return image, (inst > 0).astype(np.uint8) * 255


# ------------------------------------------------------------------------------ real data
def test_ph2_own_layout_in_one_tree(caplog):
    caplog.set_level(logging.INFO)
    root = data_path("ph2", "PH2 Dataset images")
    pairs = D.load_pairs(root)
    assert len(pairs) == 40
    assert [p.name for p in pairs] == sorted(d.name for d in root.iterdir())
    first = pairs[0]
    assert first.image.ndim == 3 and first.image.shape[2] == 3
    assert first.label.shape == first.image.shape[:2]
    assert first.label.dtype == np.uint8 and set(np.unique(first.label)) == {0, 1}
    assert first.label_source == f"{first.name}_lesion.bmp"
    assert "matched 40 pair(s) (one tree)" in caplog.text
    assert f"{first.name}/{first.name}_lesion/{first.name}_lesion.bmp" in caplog.text
    assert "labels normalised: 40 x 1-bit" in caplog.text
    assert D.resolve_label_kind(pairs, None) == "binary"


def test_dsb2018_masks_merged_into_instance_ids():
    root = data_path("dsb2018", "stage1_train")
    pairs = D.load_pairs(root, only=set(DSB_IDS))
    assert [p.name for p in pairs] == sorted(DSB_IDS)
    for pair in pairs:
        masks = sorted((root / pair.name / "masks").glob("*.png"))
        assert pair.image.shape[2] == 3  # RGBA -> RGB
        raw = np.asarray(Image.open(root / pair.name / "images" / f"{pair.name}.png"))
        assert np.array_equal(pair.image, raw[..., :3])
        ids = np.unique(pair.label)
        assert ids[0] == 0 and len(ids) == len(masks) + 1
        third = np.asarray(Image.open(masks[2])) != 0
        assert np.all(pair.label[third] == 3)  # ids follow the sorted mask files
    assert D.resolve_label_kind(pairs, None) == "instances"


def test_dsb2018_discovery_finds_every_sample():
    root = data_path("dsb2018", "stage1_train")
    found = discover(root, root)
    assert found.layout.startswith("DSB2018") and len(found.pairs) == 330
    assert not found.unlabelled and not found.orphans
    assert all(p.labels == tuple(sorted(p.labels)) for p in found.pairs)
    with pytest.raises(ConfigError, match="--label-pattern applies to image folders, not to DSB"):
        discover(root, label_pattern="{stem}_mask.png")


def test_tnbc_and_monuseg_two_trees():
    tnbc = D.load_pairs(data_path("tnbc", "images"), data_path("tnbc", "labels"))
    assert len(tnbc) == 50 and tnbc[0].name == "01_1"
    assert tnbc[0].label.dtype == np.uint16 and tnbc[0].label_note == ""
    found = discover(data_path("monuseg", "images"), data_path("monuseg", "labels"))
    assert len(found.pairs) == 24 and found.layout == "two trees"


def test_isbi_stacks_by_name_list(tmp_path):
    listed = tmp_path / "val.txt"
    listed.write_text("train-volume:2\ntrain-volume:5\n")
    pairs, (names,) = D.load_data(
        data_path("isbi2012", "train-volume.tif"),
        data_path("isbi2012", "train-labels.tif"),
        lists=(listed,),
        only_listed=True,
    )
    assert len(pairs) == 25 and names == ["train-volume:2", "train-volume:5"]


# ------------------------------------------------------------------------------ named layouts
def test_isic_carvana_drive_naming(tmp_path):
    image, mask = blob(0)
    png(tmp_path / "isic/img/ISIC_0000000.png", np.stack([image] * 3, -1))
    png(tmp_path / "isic/seg/ISIC_0000000_segmentation.png", mask)
    carvana = Image.fromarray((mask > 0).astype(np.uint8), mode="L").convert("P")
    png(tmp_path / "carvana/train/0cdf5b5d0ce1_01.jpg", np.stack([image] * 3, -1))
    (tmp_path / "carvana/train_masks").mkdir()
    carvana.save(tmp_path / "carvana/train_masks/0cdf5b5d0ce1_01_mask.gif")
    (tmp_path / "drive/training/images").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "drive/training/images/21_training.tif", image)
    png(tmp_path / "drive/training/1st_manual/21_manual1.gif", mask)
    png(tmp_path / "same/images/cju0_seg.png", image)  # a stem that ends like a label
    png(tmp_path / "same/masks/cju0_seg.png", mask)
    cases = {
        "same": ("images", "masks", "cju0_seg"),
        "isic": ("img", "seg", "ISIC_0000000"),
        "carvana": ("train", "train_masks", "0cdf5b5d0ce1_01"),
        "drive": ("training/images", "training/1st_manual", "21_training"),
    }
    for case, (images, labels, name) in cases.items():
        (pair,) = D.load_pairs(tmp_path / case / images, tmp_path / case / labels)
        assert pair.name == name
        assert np.array_equal(pair.label, mask // 255), case


def test_ph2_colour_region_masks_are_left_out(tmp_path, caplog):
    """The full PH2 download also holds IMDxxx_roi/IMDxxx_R1_Label4.bmp region masks."""
    caplog.set_level(logging.INFO)
    image, mask = blob(5)
    case = tmp_path / "PH2 Dataset images/IMD002"
    png(case / "IMD002_Dermoscopic_Image/IMD002.bmp", np.stack([image] * 3, -1))
    png(case / "IMD002_lesion/IMD002_lesion.bmp", mask)
    png(case / "IMD002_roi/IMD002_R1_Label4.bmp", mask)
    png(case / "IMD002_roi/IMD002_R2_Label1.bmp", mask)
    (pair,) = D.load_pairs(tmp_path / "PH2 Dataset images")
    assert pair.name == "IMD002" and pair.label_source == "IMD002_lesion.bmp"
    assert "2 PH2 colour-region mask(s) left out" in caplog.text


def test_drive_fov_masks_in_the_same_tree_are_ambiguous(tmp_path):
    image, mask = blob(1)
    png(tmp_path / "training/images/21_training.png", image)
    png(tmp_path / "training/1st_manual/21_manual1.gif", mask)
    png(tmp_path / "training/mask/21_training_mask.gif", mask)
    with pytest.raises(
        ConfigError,
        match=r"21_training.png matches 2 labels \(21_training_mask.gif, 21_manual1.gif\)",
    ):
        D.load_pairs(tmp_path / "training")
    pairs = D.load_pairs(
        tmp_path / "training/images", tmp_path / "training", label_pattern="{stem}_manual1.gif"
    )
    assert [p.name for p in pairs] == ["21_training"]


def test_label_pattern_formats_and_normalisation(tmp_path, caplog):
    """BMP/GIF images, an RGB mask, an anti-aliased JPEG mask and a 0/1 mask, matched by
    ``--label-pattern`` in one tree; every mask becomes 0/1 and the log says how."""
    image, mask = blob(2)
    Image.fromarray(image).save(tmp_path / "a.bmp")
    Image.fromarray(image).save(tmp_path / "b.gif")
    Image.fromarray(image).save(tmp_path / "c.png")
    Image.fromarray(np.stack([mask] * 3, -1)).save(tmp_path / "GT-a.bmp")
    tinted = np.stack([mask, mask - mask // 255 * 12, mask - mask // 255 * 6], -1)  # near-white
    Image.fromarray(tinted).save(tmp_path / "GT-b.jpg", quality=75)
    Image.fromarray(mask // 255).save(tmp_path / "GT-c.png")
    caplog.set_level(logging.INFO)
    pairs = D.load_pairs(tmp_path, label_pattern="GT-{stem}.*")
    assert [p.name for p in pairs] == ["a", "b", "c"]
    for p in pairs:
        assert set(np.unique(p.label)) == {0, 1}
    assert np.array_equal(pairs[0].label, mask // 255)
    stored = np.asarray(Image.open(tmp_path / "GT-b.jpg"))
    assert not set(np.unique(stored)) <= {0, 255}  # the JPEG fringe
    assert not np.array_equal(stored[..., 0], stored[..., 1])  # and its colour noise
    assert np.mean(pairs[1].label != mask // 255) < 0.01
    assert pairs[0].label_note == "RGB, 0/255"
    assert pairs[1].label_note == "RGB, JPEG thresholded at 128"
    assert "anti-aliased JPEG mask(s) thresholded at 128, e.g. GT-b.jpg" in caplog.text


def test_npy_and_npz_stacks(tmp_path):
    images = np.stack([np.stack([blob(i)[0]] * 3, -1) for i in range(3)])
    masks = np.stack([blob(i)[1] for i in range(3)])[..., None]
    np.save(tmp_path / "x.npy", images.astype(np.float32) / 255)
    np.save(tmp_path / "y.npy", masks)
    np.savez(tmp_path / "both.npz", images=images, masks=masks[..., 0] // 255)
    from_npy = D.load_pairs(tmp_path / "x.npy", tmp_path / "y.npy")
    from_npz = D.load_pairs(tmp_path / "both.npz")
    assert [p.name for p in from_npy] == ["x:0", "x:1", "x:2"]
    assert [p.name for p in from_npz] == ["both:0", "both:1", "both:2"]
    for a, b, i in zip(from_npy, from_npz, range(3), strict=True):
        assert np.array_equal(a.image, images[i]) and np.array_equal(b.image, images[i])
        assert np.array_equal(a.label, b.label) and set(np.unique(a.label)) == {0, 1}
    np.savez(tmp_path / "three.npz", x_train=images, y_train=masks, x_val=images)
    with pytest.raises(ConfigError, match=r"three.npz: cannot tell which array holds the images"):
        D.load_pairs(tmp_path / "three.npz")
    np.save(tmp_path / "short.npy", masks[:2])
    with pytest.raises(ConfigError, match=r"x.npy has 3 images but .*short.npy has 2"):
        D.load_pairs(tmp_path / "x.npy", tmp_path / "short.npy")


# ------------------------------------------------------------------------------ list files
def test_pair_list_with_tabs_relative_to_the_list(tmp_path):
    for i in range(3):
        image, mask = blob(i)
        png(tmp_path / "data/imgs" / f"s{i}.png", image)
        png(tmp_path / "data/gt" / f"label{i}.png", mask)
    (tmp_path / "data/train.txt").write_text(
        "# image<TAB>label\nimgs/s0.png\tgt/label0.png\nimgs/s2.png\tgt/label2.png\n"
        "imgs/s1.png\tgt/label1.png\n"
    )
    (tmp_path / "data/val.txt").write_text("imgs/s1.png\tgt/label1.png\n")
    lists = (tmp_path / "data/train.txt", tmp_path / "data/val.txt")
    pairs, names = D.load_data(None, lists=lists)
    assert [p.name for p in pairs] == ["s0", "s1", "s2"]
    assert names == [["s0", "s2", "s1"], ["s1"]]  # the same pair twice is one pair
    assert np.array_equal(pairs[1].label, blob(1)[1] // 255)
    (tmp_path / "mixed.txt").write_text("data/imgs/s0.png\tdata/gt/label0.png\ns1\n")
    with pytest.raises(ConfigError, match=r"mixed.txt:2: the list mixes names and image<TAB>"):
        read_list(tmp_path / "mixed.txt")
    (tmp_path / "data/bad.txt").write_text("imgs/s0.png\tgt/nothing.png\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: the label .*nothing.png does not exist"):
        read_list(tmp_path / "data/bad.txt")
    with pytest.raises(ConfigError, match="give every list as pairs and no --images"):
        D.load_data(tmp_path / "data/imgs", lists=lists)
    png(tmp_path / "data/other/s1.png", blob(1)[0])
    (tmp_path / "data/val.txt").write_text("other/s1.png\tgt/label1.png\n")
    with pytest.raises(ConfigError, match=r"two images share the name 's1': .*imgs/s1.png and"):
        D.load_data(None, lists=(tmp_path / "data/train.txt", tmp_path / "data/val.txt"))


# ------------------------------------------------------------------------------ errors
def test_partial_and_ambiguous_layouts_name_the_files(tmp_path):
    image, mask = blob(3)
    png(tmp_path / "t/a/a.png", image)
    png(tmp_path / "t/a/a_mask.png", mask)
    png(tmp_path / "t/b/b.png", image)
    with pytest.raises(ConfigError, match=r"1 of 2 images in .*t have no label \(b/b.png\)"):
        D.load_pairs(tmp_path / "t")
    png(tmp_path / "t/b/b_label.png", mask)
    png(tmp_path / "t/c_gt.png", mask)
    with pytest.raises(ConfigError, match=r"1 label\(s\) match no image in .* \(c_gt.png\)"):
        D.load_pairs(tmp_path / "t")
    (tmp_path / "t/c_gt.png").unlink()
    png(tmp_path / "t/b/b_seg.png", mask)
    with pytest.raises(ConfigError, match=r"b.png matches 2 labels \(b_label.png, b_seg.png\)"):
        D.load_pairs(tmp_path / "t")
    (tmp_path / "t/b/b_seg.png").unlink()
    png(tmp_path / "t/x/a.png", image)
    with pytest.raises(ConfigError, match=r"two images share the name 'a': .*a.png and .*x/a.png"):
        D.load_pairs(tmp_path / "t")


def test_dsb_sample_without_masks_is_named(tmp_path):
    image, mask = blob(4)
    for sample in ("s1", "s2"):
        png(tmp_path / sample / "images" / f"{sample}.png", image)
    png(tmp_path / "s1/masks/m1.png", mask)
    (tmp_path / "s2/masks").mkdir()
    with pytest.raises(ConfigError, match=r"1 of 2 images in .* have no label \(s2/images/s2.png"):
        D.load_pairs(tmp_path)
    (pair,) = D.load_pairs(tmp_path, only={"s1"})
    assert set(np.unique(pair.label)) == {0, 1}
