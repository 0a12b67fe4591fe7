"""Tests for tilesegment.train.weights: the fast border weight map vs the literal definition."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import data_path
from tilesegment.errors import ConfigError
from tilesegment.train import weights as weights_module
from tilesegment.train.labels import instances_from_binary, separate_touching
from tilesegment.train.weights import (
    border_weight_map,
    border_weight_map_bruteforce,
    cached_weight_map,
    class_weight_map,
    window_radius,
)


def assert_close_to_bruteforce(instances: np.ndarray, **params: object) -> np.ndarray:
    """Fast == brute force within BORDER_RTOL * w0 plus float32 rounding of the sum."""
    fast = border_weight_map(instances, **params)
    slow = border_weight_map_bruteforce(instances, **params)
    assert fast.dtype == slow.dtype == np.float32
    assert fast.shape == slow.shape == instances.shape
    w0 = float(params.get("w0", 10.0))
    tolerance = 1e-6 * w0 + 2 * np.finfo(np.float32).eps * np.abs(slow)
    difference = np.abs(fast.astype(np.float64) - slow)
    assert np.all(difference <= tolerance), float(difference.max())
    return slow


# ---------------------------------------------------------------------------- real data
@pytest.mark.parametrize("index", [0, 17])
def test_fast_equals_bruteforce_isbi(index: int) -> None:
    labels = tifffile.imread(data_path("isbi2012", "train-labels.tif"))[index]
    cells = instances_from_binary(labels == 255)
    assert cells.max() > 50
    slow = assert_close_to_bruteforce(cells)
    np.testing.assert_allclose(border_weight_map(cells), slow, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "origin", "separate"),
    [
        ("TCGA-18-5592-01Z-00-DX1.tif", (0, 0), True),
        ("TCGA-HE-7130-01Z-00-DX1.tif", (500, 300), True),
        ("TCGA-G9-6336-01Z-00-DX1.tif", (640, 640), False),
    ],
)
def test_fast_equals_bruteforce_monuseg(name: str, origin: tuple[int, int], separate: bool) -> None:
    labels = tifffile.imread(data_path("monuseg", "labels", name))
    y, x = origin
    crop = labels[y : y + 360, x : x + 360]
    if separate:
        crop = separate_touching(crop)
    assert len(np.unique(crop)) > 20
    slow = assert_close_to_bruteforce(crop)
    np.testing.assert_allclose(border_weight_map(crop), slow, rtol=0, atol=1e-5)
    # The border term really is there: background between nuclei is weighted up.
    assert slow[crop == 0].max() > 5.0


# ------------------------------------------------------------------------ property tests
@st.composite
def instance_maps(draw: st.DrawFn) -> np.ndarray:
    """Small maps of 0-6 rectangles, possibly overlapping, touching or cut by the border."""
    height = draw(st.integers(1, 28))
    width = draw(st.integers(1, 28))
    out = np.zeros((height, width), dtype=draw(st.sampled_from([np.uint8, np.int32, np.int64])))
    for _ in range(draw(st.integers(0, 6))):
        y = draw(st.integers(-2, height))
        x = draw(st.integers(-2, width))
        h = draw(st.integers(1, 8))
        w = draw(st.integers(1, 8))
        out[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = draw(st.integers(1, 9))
    return out


@settings(max_examples=120, deadline=None)
@given(
    instances=instance_maps(),
    w0=st.floats(0.5, 20.0),
    sigma=st.floats(0.5, 8.0),
    class_weights=st.sampled_from(["balanced", None, (0.25, 3.0)]),
)
def test_fast_equals_bruteforce_property(
    instances: np.ndarray, w0: float, sigma: float, class_weights: object
) -> None:
    slow = assert_close_to_bruteforce(instances, w0=w0, sigma=sigma, class_weights=class_weights)
    base = class_weight_map(instances != 0, class_weights)
    # Foreground pixels carry only w_c; the border term is non-negative and at most w0.
    np.testing.assert_array_equal(slow[instances != 0], base[instances != 0])
    assert np.all(slow >= base)
    assert np.all(slow <= base + w0 + 1e-5)
    if len(np.unique(instances[instances != 0])) < 2:
        np.testing.assert_array_equal(slow, base)


# ------------------------------------------------------------------------ exact examples
@pytest.mark.parametrize("fn", [border_weight_map, border_weight_map_bruteforce])
def test_zero_and_one_object_have_no_border_term(fn: object) -> None:
    empty = np.zeros((20, 30), dtype=np.int32)
    np.testing.assert_array_equal(fn(empty), np.ones((20, 30), dtype=np.float32))
    one = empty.copy()
    one[5:9, 5:9] = 4
    np.testing.assert_array_equal(fn(one), class_weight_map(one != 0, "balanced"))


@pytest.mark.parametrize("fn", [border_weight_map, border_weight_map_bruteforce])
def test_two_points_midpoint_value(fn: object) -> None:
    labels = np.zeros((11, 21), dtype=np.int32)
    labels[5, 2] = 1
    labels[5, 12] = 2
    w = fn(labels, w0=10.0, sigma=5.0, class_weights=None)
    # Midpoint (5, 7): d1 = d2 = 5.
    assert w[5, 7] == pytest.approx(1 + 10 * math.exp(-(10**2) / 50), rel=1e-6)
    # Off-axis pixel (2, 7): d1 = d2 = sqrt(9 + 25).
    d = math.sqrt(34)
    assert w[2, 7] == pytest.approx(1 + 10 * math.exp(-((2 * d) ** 2) / 50), rel=1e-6)
    assert w[5, 2] == w[5, 12] == 1.0


def test_touching_objects_weight_the_separation_gap() -> None:
    labels = np.zeros((12, 12), dtype=np.int32)
    labels[2:10, 1:6] = 1
    labels[2:10, 6:11] = 2
    separated = separate_touching(labels)
    w = border_weight_map(separated, class_weights=None)
    # The 2-px gap: d1 = 1, d2 = 2 on each gap column.
    assert w[5, 5] == pytest.approx(1 + 10 * math.exp(-9 / 50), rel=1e-6)
    assert w[5, 5] == pytest.approx(w[5, 6])
    assert w[5, 5] > w[0, 0]


def test_class_weights_balanced_and_explicit() -> None:
    fg = np.zeros((10, 10), dtype=bool)
    fg[:2] = True  # 20 % foreground
    balanced = class_weight_map(fg, "balanced")
    assert balanced.mean() == pytest.approx(1.0)
    assert balanced[0, 0] == pytest.approx(100 / (2 * 20))
    assert balanced[9, 9] == pytest.approx(100 / (2 * 80))
    np.testing.assert_array_equal(class_weight_map(fg, (0.5, 4.0))[fg], 4.0)
    np.testing.assert_array_equal(class_weight_map(fg, None), 1.0)
    np.testing.assert_array_equal(class_weight_map(np.ones((3, 3), bool), "balanced"), 1.0)


def test_foreground_mask_overrides_class_balancing_only() -> None:
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[1:3, 1:3] = 1
    labels[6:8, 6:8] = 2
    fg = np.zeros_like(labels, dtype=bool)
    fg[:5] = True
    w = border_weight_map(labels, foreground=fg)
    w_ref = border_weight_map(labels, class_weights=None)
    base = class_weight_map(fg, "balanced")
    np.testing.assert_allclose(w, base + (w_ref - 1.0), atol=1e-5)


def test_window_radius() -> None:
    assert window_radius(5.0) == 27
    assert 10.0 * math.exp(-(window_radius(5.0) ** 2) / 50) < 1e-5


def test_invalid_arguments() -> None:
    labels = np.zeros((5, 5), dtype=np.int32)
    with pytest.raises(ConfigError, match="integer dtype"):
        border_weight_map(labels.astype(float))
    with pytest.raises(ConfigError, match="integer dtype"):
        border_weight_map(labels.astype(bool))
    with pytest.raises(ConfigError, match="sigma"):
        border_weight_map(labels, sigma=0.0)
    with pytest.raises(ConfigError, match="w0"):
        border_weight_map_bruteforce(labels, w0=-1.0)
    with pytest.raises(ConfigError, match="class_weights"):
        border_weight_map(labels, class_weights="inverse")
    with pytest.raises(ConfigError, match="class_weights"):
        border_weight_map(labels, class_weights=(1.0, -2.0))
    with pytest.raises(ConfigError, match="foreground"):
        border_weight_map(labels, foreground=np.zeros((4, 4), bool))
    with pytest.raises(ConfigError, match=r"\(Y, X\)"):
        border_weight_map(np.zeros((2, 5, 5), dtype=np.int32))


def test_sparse_large_ids() -> None:
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[2:5, 2:5] = 10**9
    labels[12:15, 12:15] = 7
    np.testing.assert_array_equal(
        border_weight_map(labels), border_weight_map(np.where(labels > 100, 1, labels))
    )


# ----------------------------------------------------------------------------------- cache
def test_cached_weight_map_roundtrip(tmp_path, monkeypatch) -> None:
    labels = np.zeros((30, 30), dtype=np.uint16)
    labels[3:8, 3:8] = 1
    labels[3:8, 12:18] = 2
    first = cached_weight_map(labels, tmp_path, sigma=3.0)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(first, border_weight_map(labels, sigma=3.0))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(weights_module, "border_weight_map", fail)
    np.testing.assert_array_equal(cached_weight_map(labels, tmp_path, sigma=3.0), first)
    monkeypatch.undo()

    # Other parameters or other pixels: other entries.
    cached_weight_map(labels, tmp_path, sigma=4.0)
    changed = labels.copy()
    changed[20, 20] = 3
    cached_weight_map(changed, tmp_path, sigma=3.0)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_cached_weight_map_recovers_from_corrupt_file(tmp_path, caplog) -> None:
    labels = np.zeros((16, 16), dtype=np.int32)
    labels[2:5, 2:5] = 1
    labels[9:12, 9:12] = 2
    cached_weight_map(labels, tmp_path)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not a numpy file")
    with caplog.at_level(logging.WARNING, logger="tilesegment.train.weights"):
        again = cached_weight_map(labels, tmp_path)
    assert "unreadable" in caplog.text
    np.testing.assert_array_equal(again, border_weight_map(labels))
    np.testing.assert_array_equal(np.load(path), again)
