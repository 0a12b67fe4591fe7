"""Tests for tilesegment.train.labels: separation borders, components, label-kind detection."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

from tests.conftest import data_path
from tilesegment.errors import ConfigError
from tilesegment.train.labels import detect_label_kind, instances_from_binary, separate_touching

EIGHT = np.ones((3, 3), dtype=bool)


def touching_mask(instances: np.ndarray) -> np.ndarray:
    """Reference: object pixels with a different non-zero id among their 8 neighbours."""
    padded = np.pad(instances, 1)
    height, width = instances.shape
    out = np.zeros(instances.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            other = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            out |= (instances != 0) & (other != 0) & (other != instances)
    return out


# ------------------------------------------------------------------------ separate_touching
def test_separate_touching_side_by_side_leaves_two_pixel_gap() -> None:
    a = np.array([[1, 1, 1, 2, 2, 2]] * 3, dtype=np.uint16)
    out = separate_touching(a)
    np.testing.assert_array_equal(out, np.array([[1, 1, 0, 0, 2, 2]] * 3, dtype=np.uint16))
    assert out.dtype == np.uint16


def test_separate_touching_diagonal_contact() -> None:
    a = np.zeros((4, 4), dtype=np.int32)
    a[:2, :2] = 3
    a[2:, 2:] = 7
    out = separate_touching(a)
    expected = a.copy()
    expected[1, 1] = 0
    expected[2, 2] = 0
    np.testing.assert_array_equal(out, expected)


def test_separate_touching_keeps_isolated_objects_and_background() -> None:
    a = np.zeros((6, 6), dtype=np.int64)
    a[1:3, 1:3] = 5
    a[4:, 4:] = 9
    np.testing.assert_array_equal(separate_touching(a), a)


def test_separate_touching_rejects_floats_and_negatives() -> None:
    with pytest.raises(ConfigError, match="integer dtype"):
        separate_touching(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match=">= 0"):
        separate_touching(np.array([[-1, 0], [0, 1]]))
    with pytest.raises(ConfigError, match=r"\(Y, X\)"):
        separate_touching(np.zeros((2, 2, 2), dtype=np.int32))


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 4))
)
def test_separate_touching_property(instances: np.ndarray) -> None:
    out = separate_touching(instances)
    removed = (instances != 0) & (out == 0)
    np.testing.assert_array_equal(removed, touching_mask(instances))
    # Kept pixels keep their id; no two different objects remain 8-adjacent.
    np.testing.assert_array_equal(out[out != 0], instances[out != 0])
    assert not touching_mask(out).any()


def test_separate_touching_real_monuseg() -> None:
    labels = tifffile.imread(data_path("monuseg", "labels", "TCGA-18-5592-01Z-00-DX1.tif"))
    assert touching_mask(labels).any(), "this tile is known to have touching nuclei"
    out = separate_touching(labels)
    assert not touching_mask(out).any()
    assert out.dtype == labels.dtype
    # Separation only removes the contact pixels: every nucleus keeps most of its area.
    before = np.bincount(labels.ravel())
    after = np.bincount(out.ravel(), minlength=before.size)
    assert np.all(after[1:] > 0)
    assert after[1:].sum() > 0.95 * before[1:].sum()


# --------------------------------------------------------------------- instances_from_binary
def test_instances_from_binary_uses_4_connectivity() -> None:
    mask = np.eye(4, dtype=bool)
    out = instances_from_binary(mask)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.diag([1, 2, 3, 4]).astype(np.int32))


def test_instances_from_binary_accepts_0_255() -> None:
    mask = np.array([[255, 255, 0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(instances_from_binary(mask), [[1, 1, 0, 2]])


def test_instances_from_binary_real_isbi_membranes_separate_cells() -> None:
    labels = tifffile.imread(data_path("isbi2012", "train-labels.tif"))[0]
    cells = instances_from_binary(labels == 255)
    n4 = int(cells.max())
    n8 = ndi.label(labels == 255, structure=EIGHT)[1]
    assert n4 >= n8 > 50
    # Every component is one cell: it never contains membrane pixels.
    assert np.all(labels[cells > 0] == 255)
    assert np.all(cells[labels == 0] == 0)


# ------------------------------------------------------------------------ detect_label_kind
@pytest.mark.parametrize(
    ("label", "kind"),
    [
        (np.array([[0, 255], [255, 0]], dtype=np.uint8), "binary"),
        (np.array([[0, 1], [1, 1]], dtype=np.int32), "binary"),
        (np.array([[True, False]]), "binary"),
        (np.zeros((3, 3), dtype=np.uint16), "binary"),
        (np.array([[255, 255]], dtype=np.uint8), "binary"),
        (np.array([[0, 1], [2, 3]], dtype=np.uint8), "classes"),
        (np.array([[0, 15]], dtype=np.int64), "classes"),
        (np.array([[0, 16]], dtype=np.int64), "instances"),
        (np.array([[0.0, 1.0], [2.0, 2.0]]), "classes"),
        (np.arange(100, dtype=np.uint16).reshape(10, 10), "instances"),
    ],
)
def test_detect_label_kind_rules(label: np.ndarray, kind: str) -> None:
    assert detect_label_kind(label) == kind


def test_detect_label_kind_threshold_is_configurable() -> None:
    label = np.array([[0, 3, 5]])
    assert detect_label_kind(label) == "classes"
    assert detect_label_kind(label, max_classes=4) == "instances"


def test_detect_label_kind_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="non-integral"):
        detect_label_kind(np.array([[0.5, 1.0]]))
    with pytest.raises(ConfigError, match=">= 0"):
        detect_label_kind(np.array([[-2, 1]]))
    with pytest.raises(ConfigError, match="max_classes"):
        detect_label_kind(np.array([[0, 1]]), max_classes=1)


def test_detect_label_kind_real_data() -> None:
    isbi = tifffile.imread(data_path("isbi2012", "train-labels.tif"))[3]
    assert detect_label_kind(isbi) == "binary"
    monuseg = tifffile.imread(data_path("monuseg", "labels", "TCGA-21-5784-01Z-00-DX1.tif"))
    assert detect_label_kind(monuseg) == "instances"
