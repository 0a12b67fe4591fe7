"""Training data: readers, splits, targets and weights, aligned and deterministic crops."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests.conftest import data_path
from tests.train.conftest import blob_pair, write_folder
from tilesegment.errors import ConfigError
from tilesegment.geometry import PAD_MODE
from tilesegment.model.unet import UNet, UNetConfig
from tilesegment.train import data as D
from tilesegment.train import sampling as S


def isbi_pairs():
    return D.load_pairs(
        data_path("isbi2012", "train-volume.tif"), data_path("isbi2012", "train-labels.tif")
    )


def test_isbi_stack_slices_and_names():
    pairs = isbi_pairs()
    assert len(pairs) == 25
    assert pairs[3].name == "train-volume:3"
    assert pairs[0].image.shape == (512, 512, 1) and pairs[0].image.dtype == np.uint8
    # stored as 0/255, normalised to 0/1 (and said so)
    assert set(np.unique(pairs[0].label)) == {0, 1}
    assert pairs[0].label_note == "0/255"
    assert D.resolve_label_kind(pairs, None) == "binary"


def test_monuseg_folder_matched_by_stem():
    images = data_path("monuseg", "images")
    pairs = D.load_pairs(images, data_path("monuseg", "labels"))
    assert len(pairs) == 24
    assert pairs[0].name == sorted(p.stem for p in images.glob("*.png"))[0]
    assert pairs[0].image.shape == (1000, 1000, 3)
    assert pairs[0].label.dtype == np.uint16
    assert D.resolve_label_kind(pairs, None) == "instances"


def test_folder_refuses_unmatched_images_unless_listed_and_detects_kind(tmp_path, caplog):
    images, labels = write_folder(tmp_path, 3, kind="binary")
    (labels / "img2.tif").unlink()
    with pytest.raises(ConfigError, match=r"1 of 3 images in .* have no label \(img2.png\)"):
        D.load_pairs(images, labels)
    pairs = D.load_pairs(images, labels, only={"img0", "img1"})
    assert [p.name for p in pairs] == ["img0", "img1"]
    assert D.resolve_label_kind(pairs, None) == "binary"
    assert "detected 'binary'" in caplog.text


def test_split_is_seeded_and_by_image():
    pairs = isbi_pairs()
    a = D.split_pairs(pairs, val_fraction=0.2, seed=4)
    b = D.split_pairs(pairs, val_fraction=0.2, seed=4)
    c = D.split_pairs(pairs, val_fraction=0.2, seed=5)
    names = [[p.name for p in part] for part in (*a, *c)]
    assert names[:2] == [[p.name for p in part] for part in b]
    assert len(names[1]) == 5 and len(names[0]) == 20
    assert not set(names[0]) & set(names[1])
    assert names[1] != names[3]


def test_split_lists(tmp_path):
    pairs = isbi_pairs()
    val = tmp_path / "val.txt"
    val.write_text("# held out\ntrain-volume:0\ntrain-volume:7\n\n")
    train, held = D.split_pairs(pairs, val_names=D.read_name_list(val))
    assert [p.name for p in held] == ["train-volume:0", "train-volume:7"]
    assert len(train) == 23
    with pytest.raises(ConfigError, match="not in the data"):
        D.split_pairs(pairs, val_names=["train-volume:99"])


def test_targets_weights_binary_isbi():
    pair = isbi_pairs()[0]
    target, weights = D.target_and_weights(pair.label, "binary", num_classes=2)
    assert target.dtype == np.uint8 and set(np.unique(target)) == {0, 1}
    # Class 1 = cell interior = label 1 (stored as 255); separation only ever removes cell pixels.
    assert np.all(target[pair.label == 0] == 0)
    assert np.mean(target[pair.label == 1]) > 0.97
    assert weights.dtype == np.float32 and weights.min() > 0
    # Membrane pixels between two cells carry the border term on top of the class weight.
    membrane = weights[target == 0]
    assert membrane.max() > membrane.min() + 5


def test_boundary_class_and_separation():
    _, inst = blob_pair(0)
    target, weights = D.target_and_weights(inst, "instances", num_classes=3, boundary_class=True)
    assert set(np.unique(target)) == {0, 1, 2}
    assert np.all(target[inst == 0] == 0)
    # an object pixel below a background pixel is on the outline: boundary (or cut), never
    # interior
    outline = np.zeros(inst.shape, bool)
    outline[1:] = (inst[1:] > 0) & (inst[:-1] == 0)
    assert outline.any() and np.all(target[outline] != 1)
    assert weights.shape == inst.shape


def test_label_value_errors():
    with pytest.raises(ConfigError, match="binary expects values 0/1 or 0/255, found"):
        D.target_and_weights(np.array([[0, 7], [255, 0]]), "binary", num_classes=2)
    with pytest.raises(ConfigError, match="class value 4 but the model has 3 classes"):
        D.target_and_weights(np.array([[0, 4]]), "classes", num_classes=3)


def test_mismatched_shapes_are_refused(tmp_path):
    images, labels = write_folder(tmp_path, 2)
    tifffile.imwrite(labels / "img1.tif", np.zeros((60, 64), np.uint16))
    with pytest.raises(ConfigError, match=r"img1.png: image is 64 x 64 px but its label img1.tif"):
        D.load_pairs(images, labels)


def sampler_for(items, *, tile=60, depth=2, seed=0, augment=None):
    net = UNet(UNetConfig(depth=depth, base_channels=1, in_channels=1))
    return S.CropSampler(
        items,
        tile=tile,
        halo=net.halo,
        pooling=net.pooling,
        seed=seed,
        augment=augment or S.AugmentOptions(flips=False, elastic_sigma=0, intensity=False),
    ), net


def test_crops_are_aligned_windows_of_the_mirrored_image():
    """Without augmentation a crop is the mirror-padded image at an origin that is a multiple
    of the pooling factor, and target/weights are exactly its centred output window."""
    pairs = isbi_pairs()[:2]
    items = D.prepare_items(pairs, "binary", num_classes=2, channels=1)
    sampler, net = sampler_for(items, tile=188, depth=3)
    h, o, t = net.halo, sampler.output, sampler.tile
    for index in range(6):
        image, target, weights = sampler.sample(2, index)
        assert image.shape == (t, t, 1) and target.shape == weights.shape == (o, o)
        found = []
        for it in items:
            frame = sampler.frame_shape(it)
            pad = ((h, frame[0] - h - 512), (h, frame[1] - h - 512))
            img = np.pad(it.image[..., 0], pad, mode=PAD_MODE)
            for y in range(0, frame[0] - t + 1, net.pooling):
                for x in range(0, frame[1] - t + 1, net.pooling):
                    if np.array_equal(img[y : y + t, x : x + t], image[..., 0]):
                        found.append((it, y, x, pad))
        assert len(found) == 1
        it, y, x, pad = found[0]
        tgt = np.pad(it.target, pad, mode=PAD_MODE)
        wts = np.pad(it.weights, pad, mode=PAD_MODE)
        np.testing.assert_array_equal(target, tgt[y + h : y + h + o, x + h : x + h + o])
        np.testing.assert_array_equal(weights, wts[y + h : y + h + o, x + h : x + h + o])


@pytest.mark.parametrize(
    "aug",
    [
        S.AugmentOptions(flips=True, elastic_sigma=10.0, intensity=False),
        S.AugmentOptions(flips=True, elastic_sigma=0, intensity=False, scale=0.3),
    ],
    ids=["elastic", "scale"],
)
def test_deformed_crops_keep_labels_on_their_pixels(aug):
    """With flips and elastic deformation, or scale jitter (the target resampled by nearest
    neighbour on the image's grid), the target still sits on the pixels it labels: the
    synthetic image is bright exactly where the label is foreground."""
    pairs = []
    for i in range(3):
        _, inst = blob_pair(i, (96, 96), n=8)
        image = np.where(inst > 0, 200, 40).astype(np.uint8)[..., None]
        pairs.append(D.LabelledImage(f"b{i}", image, inst, f"b{i}"))
    items = D.prepare_items(pairs, "instances", num_classes=2, channels=1, boundary_class=False)
    sampler, net = sampler_for(items, tile=60, depth=2, augment=aug)
    h, o = net.halo, sampler.output
    agree = []
    for index in range(20):
        image, target, weights = sampler.sample(0, index)
        assert image.shape == (60, 60, 1) and target.shape == weights.shape == (o, o)
        assert set(np.unique(target)) <= {0, 1} and np.isfinite(weights).all()
        bright = image[h : h + o, h : h + o, 0] > 120
        fg = target > 0
        # separation borders are background in the target but bright in the image
        agree.append(np.mean(bright[fg]) if fg.any() else 1.0)
        assert np.mean(fg & ~bright) < 0.02
    assert np.mean(agree) > 0.98


def test_samples_depend_only_on_seed_epoch_index():
    items = D.prepare_items(isbi_pairs()[:3], "binary", num_classes=2, channels=1)
    aug = S.AugmentOptions()
    a, _ = sampler_for(items, augment=aug, seed=1)
    b, _ = sampler_for(items, augment=aug, seed=1)
    for got, again in zip(a.sample(3, 5), b.sample(3, 5), strict=True):
        np.testing.assert_array_equal(got, again)
    assert not np.array_equal(a.sample(3, 5)[0], a.sample(3, 6)[0])
    assert not np.array_equal(a.sample(3, 5)[0], a.sample(4, 5)[0])


def test_rank_sampler_splits_each_global_batch():
    one = list(S.RankSampler(steps=3, global_batch=4, rank=0, world=1))
    ranks = [list(S.RankSampler(steps=3, global_batch=4, rank=r, world=2)) for r in range(2)]
    for s in range(3):
        glob = one[4 * s : 4 * s + 4]
        assert ranks[0][2 * s : 2 * s + 2] + ranks[1][2 * s : 2 * s + 2] == glob
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        S.RankSampler(steps=1, global_batch=3, rank=0, world=2)


def test_channel_stats():
    items = D.prepare_items(isbi_pairs()[:2], "binary", num_classes=2, channels=1)
    mean, std = D.channel_stats(items)
    pixels = np.concatenate([it.image.ravel() for it in items]) / 255.0
    assert mean == pytest.approx((pixels.mean(),), rel=1e-9)
    assert std == pytest.approx((pixels.std(),), rel=1e-6)
