"""Tests for tilesegment.train.augment: determinism, alignment of labels, dtype contracts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage as ndi

from tests.conftest import data_path
from tilesegment.errors import ConfigError
from tilesegment.geometry import mirror_indices
from tilesegment.train.augment import (
    HE_DEFAULTS,
    HED_FROM_RGB,
    PhotometricRanges,
    _displacement_field,
    colour_jitter,
    elastic_deformation,
    flip_rotate,
    gaussian_blur,
    intensity_jitter,
    random_crop_box,
    rng_for,
    scale_crop,
)


def block_image(shape: tuple[int, int] = (160, 200), seed: int = 0) -> np.ndarray:
    """Piecewise-constant uint8 image: 20 x 20 px blocks of values 10, 80, 150 or 220."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(np.array([10, 80, 150, 220], dtype=np.uint8), size=(8, 10))
    return np.kron(blocks, np.ones((20, 20), dtype=np.uint8))[: shape[0], : shape[1]]


def label_of(image: np.ndarray) -> np.ndarray:
    """The labelling rule of the synthetic data: label = value // 64 (0, 1, 2, 3)."""
    return (image // 64).astype(np.int32)


# ---------------------------------------------------------------------------------- rng_for
def test_rng_for_is_deterministic_and_distinct() -> None:
    draw = lambda *key: rng_for(*key).random(4)  # noqa: E731
    np.testing.assert_array_equal(draw(7, 2, 11), draw(7, 2, 11))
    assert not np.array_equal(draw(7, 2, 11), draw(7, 2, 12))
    assert not np.array_equal(draw(7, 2, 11), draw(7, 3, 11))
    assert not np.array_equal(draw(7, 2, 11), draw(8, 2, 11))
    # Not a concatenation artefact: (1, 23) and (12, 3) are different streams.
    assert not np.array_equal(draw(0, 1, 23), draw(0, 12, 3))


@pytest.mark.parametrize("bad", [(-1, 0, 0), (0, 1.5, 0), (0, 0, True), (0, 0, "3")])
def test_rng_for_rejects_bad_keys(bad: tuple) -> None:
    with pytest.raises(ConfigError, match="integer >= 0"):
        rng_for(*bad)


# --------------------------------------------------------------------------- random_crop_box
@settings(max_examples=100, deadline=None)
@given(
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    crop_fraction=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)),
    align=st.sampled_from([1, 2, 16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_crop_box_inside_and_aligned(
    size: tuple[int, int], crop_fraction: tuple[float, float], align: int, seed: int
) -> None:
    crop = tuple(max(1, int(s * f)) for s, f in zip(size, crop_fraction, strict=True))
    y, x = random_crop_box((*size, 3), crop, np.random.default_rng(seed), align=align)
    assert 0 <= y <= size[0] - crop[0] and 0 <= x <= size[1] - crop[1]
    assert y % align == 0 and x % align == 0


def test_random_crop_box_reaches_every_aligned_origin() -> None:
    seen = {random_crop_box((100, 60), (60, 60), rng_for(0, 0, i), align=16) for i in range(300)}
    assert seen == {(0, 0), (16, 0), (32, 0)}


def test_random_crop_box_rejects_bad_shapes() -> None:
    rng = rng_for(0, 0, 0)
    with pytest.raises(ConfigError, match="crop_shape"):
        random_crop_box((100, 100), (101, 10), rng)
    with pytest.raises(ConfigError, match="align"):
        random_crop_box((100, 100), (10, 10), rng, align=0)
    with pytest.raises(ConfigError, match="image_shape"):
        random_crop_box((100,), (10, 10), rng)


# ------------------------------------------------------------------------------ flip_rotate
def test_flip_rotate_same_transform_for_all_arrays() -> None:
    base = np.arange(5 * 7).reshape(5, 7)
    rgb = np.stack([base, base + 100, base + 200], axis=-1).astype(np.uint16)
    outcomes = set()
    for i in range(200):
        a, b, c = flip_rotate([base, base * 2.0, rgb], rng_for(1, 0, i))
        np.testing.assert_array_equal(b, a * 2.0)
        np.testing.assert_array_equal(c[..., 2], a + 200)
        assert a.flags.c_contiguous and c.shape[2] == 3
        assert sorted(a.shape) == [5, 7]
        outcomes.add(a.tobytes() + bytes(a.shape))
    assert len(outcomes) == 8  # all symmetries of the square occur


def test_flip_rotate_rejects_mismatched_arrays() -> None:
    with pytest.raises(ConfigError, match="same"):
        flip_rotate([np.zeros((4, 4)), np.zeros((4, 5))], rng_for(0, 0, 0))


# ----------------------------------------------------------------------- elastic_deformation
def test_elastic_keeps_labels_integral_and_aligned() -> None:
    image = block_image()
    labels = label_of(image)
    weights = np.linspace(0, 1, image.size, dtype=np.float32).reshape(image.shape)
    out_image, out_labels, out_weights = elastic_deformation(
        image, labels, weights, rng_for(3, 1, 4)
    )
    assert out_image.shape == image.shape and out_image.dtype == np.uint8
    assert out_labels.shape == labels.shape and out_labels.dtype == np.int32
    assert out_weights.shape == weights.shape and out_weights.dtype == np.float32
    assert not np.array_equal(out_image, image), "the deformation must move pixels"
    assert set(np.unique(out_labels)) <= set(np.unique(labels))

    mismatch = out_labels != label_of(out_image)
    assert mismatch.mean() < 0.02
    # Every mismatch sits at a block edge: its 3 x 3 neighbourhood of the warped image is
    # not constant (interpolated between two blocks).
    edge = ndi.maximum_filter(out_image, 3) != ndi.minimum_filter(out_image, 3)
    assert not np.any(mismatch & ~edge)
    # Where the image value is one of the block values, the label matches it exactly.
    pure = np.isin(out_image, [10, 80, 150, 220]) & ~edge
    np.testing.assert_array_equal(out_labels[pure], label_of(out_image)[pure])


def test_elastic_rgb_and_determinism() -> None:
    grey = block_image(seed=1)
    image = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    labels = label_of(grey).astype(np.uint16)
    a = elastic_deformation(image, labels, None, rng_for(5, 2, 9))
    b = elastic_deformation(image, labels, None, rng_for(5, 2, 9))
    c = elastic_deformation(image, labels, None, rng_for(5, 2, 10))
    assert a[2] is None
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == image.shape and a[0].dtype == np.uint8
    assert a[1].dtype == np.uint16
    # Channels move together: channel 1 is still 255 - channel 0 up to rounding.
    assert np.abs(a[0][..., 1].astype(int) + a[0][..., 0] - 255).max() <= 1


def test_elastic_zero_sigma_is_identity() -> None:
    image = block_image()
    labels = label_of(image)
    weights = np.random.default_rng(0).random(image.shape).astype(np.float32)
    out = elastic_deformation(image, labels, weights, rng_for(0, 0, 0), sigma=0.0)
    np.testing.assert_array_equal(out[0], image)
    np.testing.assert_array_equal(out[1], labels)
    np.testing.assert_allclose(out[2], weights, atol=1e-6)


@pytest.mark.parametrize("sigma", [10.0, 60.0, 300.0])
def test_elastic_matches_scipy_map_coordinates(sigma: float) -> None:
    """The shared sampler equals map_coordinates with mode='reflect' (numpy 'symmetric')."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, (90, 70)).astype(np.int64)
    weights = rng.random((90, 70)).astype(np.float32)
    out = elastic_deformation(image, labels, weights, rng_for(1, 1, 1), sigma=sigma)
    field = _displacement_field((90, 70), rng_for(1, 1, 1), 3, sigma)
    coords = np.indices((90, 70), dtype=np.float64) + field
    ref_image = np.stack(
        [
            ndi.map_coordinates(image[..., c], coords, order=1, mode="reflect", output=np.float32)
            for c in range(3)
        ],
        axis=-1,
    )
    assert np.abs(np.rint(ref_image) - out[0]).max() <= 1
    ref_weights = ndi.map_coordinates(weights, coords, order=1, mode="reflect")
    np.testing.assert_allclose(out[2], ref_weights, atol=1e-5)
    ref_labels = ndi.map_coordinates(labels, coords, order=0, mode="reflect")
    assert (ref_labels != out[1]).mean() < 1e-3


def test_elastic_displacement_statistics() -> None:
    """Node displacements have the requested spread; the field is smooth between nodes."""
    fields = np.stack(
        [_displacement_field((101, 101), rng_for(0, 0, i), 3, 10.0) for i in range(300)]
    )
    nodes = fields[:, :, ::50, ::50]
    assert nodes.std() == pytest.approx(10.0, rel=0.1)
    assert np.abs(np.diff(fields, axis=-1)).max() < 3.0


def test_elastic_cubic_and_float_image() -> None:
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    out, _, _ = elastic_deformation(image, None, None, rng_for(0, 0, 1), image_order=3)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= image.min() and out.max() <= image.max()


def test_elastic_rejects_bad_arguments() -> None:
    image = np.zeros((10, 10), dtype=np.uint8)
    rng = rng_for(0, 0, 0)
    with pytest.raises(ConfigError, match="labels"):
        elastic_deformation(image, np.zeros((10, 11), np.int32), None, rng)
    with pytest.raises(ConfigError, match="grid"):
        elastic_deformation(image, None, None, rng, grid=1)
    with pytest.raises(ConfigError, match="image_order"):
        elastic_deformation(image, None, None, rng, image_order=2)


# -------------------------------------------------------------------- intensity and colour
def test_intensity_jitter_uint8_mild_and_deterministic() -> None:
    image = block_image()
    a = intensity_jitter(image, rng_for(0, 0, 1))
    b = intensity_jitter(image, rng_for(0, 0, 1))
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - image).mean() < 0.2 * 255
    changed = [
        not np.array_equal(intensity_jitter(image, rng_for(0, 0, i)), image) for i in range(5)
    ]
    assert any(changed)
    np.testing.assert_array_equal(
        intensity_jitter(image, rng_for(0, 0, 1), brightness=0, contrast=0, gamma=0), image
    )


def test_intensity_jitter_float_stays_in_unit_range() -> None:
    image = np.random.default_rng(0).random((20, 20, 3))
    out = intensity_jitter(image, rng_for(0, 0, 0), brightness=0.5)
    assert out.dtype == np.float64 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ConfigError, match="brightness"):
        intensity_jitter(image, rng_for(0, 0, 0), brightness=1.5)


def test_colour_jitter_real_he_tile() -> None:
    path = data_path("monuseg", "images", "TCGA-21-5784-01Z-00-DX1.png")
    image = np.asarray(Image.open(path).convert("RGB"))[:256, :256]
    np.testing.assert_array_equal(colour_jitter(image, rng_for(0, 0, 0), sigma=0, bias=0), image)
    out = colour_jitter(image, rng_for(0, 0, 0))
    again = colour_jitter(image, rng_for(0, 0, 0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, again)
    difference = np.abs(out.astype(int) - image)
    assert 0 < difference.mean() < 25
    with pytest.raises(ConfigError, match="RGB"):
        colour_jitter(image[..., 0], rng_for(0, 0, 0))


# ------------------------------------------------------------------------ scale and blur
def test_scale_crop_without_jitter_is_the_mirror_indexed_crop() -> None:
    image = np.stack([block_image(), 255 - block_image()], axis=-1)
    labels = label_of(image[..., 0])
    weights = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    got = scale_crop(image, labels, weights, (-7, 150), 64, rng_for(0, 0, 0), max_scale=0)
    box = np.ix_(mirror_indices(-7, 57, 160), mirror_indices(150, 214, 200))
    for out, source in zip(got, (image, labels, weights), strict=True):
        np.testing.assert_array_equal(out, source[box])


def test_scale_crop_keeps_labels_integral_and_aligned() -> None:
    image = block_image()
    labels = label_of(image)
    for index in range(5):
        out_image, out_labels, out_weights = scale_crop(
            image, labels, None, (30, 40), 96, rng_for(1, 2, index), max_scale=0.3
        )
        assert out_image.dtype == np.uint8 and out_labels.dtype == np.int32
        assert out_image.shape == out_labels.shape == (96, 96) and out_weights is None
        assert set(np.unique(out_labels)) <= set(np.unique(labels))
        edge = ndi.maximum_filter(out_image, 3) != ndi.minimum_filter(out_image, 3)
        mismatch = out_labels != label_of(out_image)
        assert not np.any(mismatch & ~edge), "labels must sit on the pixels they label"


def test_scale_crop_factor_stays_in_range_both_ways_and_is_seeded() -> None:
    ramp = np.tile(np.arange(400, dtype=np.float32), (400, 1))  # value = column index
    factors = []
    for index in range(200):
        out, _, _ = scale_crop(ramp, None, None, (150, 150), 64, rng_for(7, 0, index))
        factors.append(1.0 / float(np.mean(np.diff(out, axis=1))))  # output px per source px
    factors = np.array(factors)
    assert factors.min() >= 1 / 1.1 - 1e-4 and factors.max() <= 1.1 + 1e-4
    assert factors.min() < 0.93 and factors.max() > 1.07
    again = scale_crop(ramp, None, None, (150, 150), 64, rng_for(7, 0, 3))[0]
    np.testing.assert_array_equal(
        again, scale_crop(ramp, None, None, (150, 150), 64, rng_for(7, 0, 3))[0]
    )
    with pytest.raises(ConfigError, match="max_scale"):
        scale_crop(ramp, None, None, (0, 0), 8, rng_for(0, 0, 0), max_scale=1.5)


def test_gaussian_blur_sigma_within_range_on_half_the_samples() -> None:
    impulse = np.zeros((41, 41), np.float32)
    impulse[20, 20] = 1.0
    yy = np.mgrid[:41, :41][0] - 20
    sigmas = []
    for index in range(200):
        out = gaussian_blur(impulse, rng_for(2, 0, index), max_sigma=1.5)
        assert out.dtype == np.float32 and abs(float(out.sum()) - 1) < 1e-4
        sigmas.append(float(np.sqrt((out * yy**2).sum())))  # the impulse's spread = sigma
    sigmas = np.array(sigmas)
    assert 70 <= np.count_nonzero(sigmas == 0) <= 130  # p = 0.5
    assert sigmas.max() <= 1.5 + 1e-3 and sigmas.max() > 1.2
    rgb = np.stack([block_image()] * 3, axis=-1)
    a, b = (gaussian_blur(rgb, rng_for(2, 0, 1), p=1.0) for _ in range(2))
    assert a.dtype == np.uint8 and a.shape == rgb.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[..., 0], a[..., 2])  # no blur across channels
    np.testing.assert_array_equal(gaussian_blur(rgb, rng_for(2, 0, 1), max_sigma=0, p=1), rgb)


def test_hed_jitter_scales_each_stain_within_its_range() -> None:
    path = data_path("tnbc", "images", "01_1.png")
    image = np.asarray(Image.open(path).convert("RGB"))[:128, :128].astype(np.float64) / 255

    def stains(rgb: np.ndarray) -> np.ndarray:
        return (-np.log((rgb * 255 + 1) / 256)).reshape(-1, 3) @ HED_FROM_RGB

    before = stains(image)
    ratios = []
    for index in range(40):
        out = colour_jitter(image, rng_for(4, 1, index), sigma=0.2, bias=0)
        inside = np.all((out > 0) & (out < 1), axis=-1).ravel()  # not clipped
        strong = inside[:, None] & (np.abs(before) > 0.05)
        ratio = [np.median(stains(out)[strong[:, c], c] / before[strong[:, c], c]) for c in (0, 1)]
        ratios.append(ratio)
    ratios = np.array(ratios)
    assert ratios.min() >= 0.8 - 1e-6 and ratios.max() <= 1.2 + 1e-6
    assert ratios.min() < 0.9 and ratios.max() > 1.1
    assert np.std(ratios[:, 0] - ratios[:, 1]) > 0.02  # H and E vary independently


def test_photometric_ranges_are_seeded_and_mild_on_he() -> None:
    path = data_path("monuseg", "images", "TCGA-21-5784-01Z-00-DX1.png")
    image = np.asarray(Image.open(path).convert("RGB"))[:128, :128]
    a = HE_DEFAULTS.apply(image, rng_for(0, 0, 5))
    np.testing.assert_array_equal(a, HE_DEFAULTS.apply(image, rng_for(0, 0, 5)))
    assert a.dtype == np.uint8 and not np.array_equal(a, image)
    assert np.abs(a.astype(int) - image).mean() < 40
    off = PhotometricRanges(0, 0, 0, 0, 0, 0)
    np.testing.assert_array_equal(off.apply(image, rng_for(0, 0, 5)), image)
