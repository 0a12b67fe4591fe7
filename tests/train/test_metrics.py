"""Tests for tilesegment.train.metrics: hand-computed values, independent references."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

from tests.conftest import data_path
from tilesegment.errors import ConfigError
from tilesegment.train.labels import separate_touching
from tilesegment.train.metrics import (
    aggregated_jaccard_index,
    aji_counts,
    aji_plus,
    aji_plus_counts,
    class_scores,
    confusion_matrix,
    dice_per_class,
    iou_per_class,
    object_f1,
    panoptic_quality,
    pixel_accuracy,
    pixel_error,
    rand_scores,
    segmentation_from_binary,
    variation_of_information,
)
from tilesegment.train.scores import evaluate_pair, mean_scores, pooled_scores


def relabel(label: np.ndarray, seed: int) -> np.ndarray:
    """Random permutation of the non-zero ids (0 stays 0), with a gap in the id range."""
    ids = np.unique(label[label != 0])
    new = np.random.default_rng(seed).permutation(ids.size) * 3 + 5
    lut = np.zeros(int(label.max()) + 1, dtype=np.int64)
    lut[ids] = new
    return lut[label]


def expand_singletons(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference convention: restrict to truth != 0, give every predicted 0 its own id."""
    inside = truth.ravel() != 0
    p = pred.ravel()[inside].astype(np.int64)
    t = truth.ravel()[inside].astype(np.int64)
    zeros = np.flatnonzero(p == 0)
    p[zeros] = p.max(initial=0) + 1 + np.arange(zeros.size)
    return p, t


def reference_rand(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(split, merge) by counting ordered pixel pairs (with replacement), O(N^2)."""
    p, t = expand_singletons(pred, truth)
    same_p = p[:, None] == p[None, :]
    same_t = t[:, None] == t[None, :]
    both = np.count_nonzero(same_p & same_t)
    return both / np.count_nonzero(same_t), both / np.count_nonzero(same_p)


def reference_entropies(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """H(S), H(T), H(S, T) in nats by counting."""
    p, t = expand_singletons(pred, truth)
    n = p.size

    def h(counter: Counter) -> float:
        return -sum(c / n * math.log(c / n) for c in counter.values())

    return (
        h(Counter(p.tolist())),
        h(Counter(t.tolist())),
        h(Counter(zip(p.tolist(), t.tolist(), strict=True))),
    )


def _object_pairs(pred: np.ndarray, truth: np.ndarray):
    """Explicit masks (fine for tiny maps): true ids ascending, predicted ids in raster order of
    their first pixel, and the IoU, intersection and union of every (true, predicted) pair."""
    true_ids = [i for i in np.unique(truth) if i != 0]
    pred_ids = [j for j in dict.fromkeys(pred.ravel().tolist()) if j != 0]
    table = {}
    for i in true_ids:
        for j in pred_ids:
            g, s = truth == i, pred == j
            inter, union = np.count_nonzero(g & s), np.count_nonzero(g | s)
            table[i, j] = (inter / union, inter, union)
    return true_ids, pred_ids, table


def _aji_of(pairs, pred, truth, true_ids, pred_ids, table) -> float:
    """C / U of the chosen (true, predicted) pairs; every object in no pair adds its area."""
    c = sum(table[p][1] for p in pairs)
    u = sum(table[p][2] for p in pairs)
    u += sum(np.count_nonzero(truth == i) for i in true_ids if i not in {t for t, _ in pairs})
    u += sum(np.count_nonzero(pred == j) for j in pred_ids if j not in {p for _, p in pairs})
    return c / u if u else math.nan


def reference_aji(pred: np.ndarray, truth: np.ndarray) -> float:
    """Kumar et al. 2017, Algorithm 1, literally: each true object takes the prediction of
    highest IoU (predictions may be taken again; ties to the first in raster order); a true
    object that overlaps nothing adds its own area."""
    true_ids, pred_ids, table = _object_pairs(pred, truth)
    pairs = []
    for i in true_ids:
        best = max(pred_ids, key=lambda j: table[i, j][0], default=None)  # first of the ties
        if best is not None and table[i, best][0] > 0:
            pairs.append((i, best))
    return _aji_of(pairs, pred, truth, true_ids, pred_ids, table)


def reference_aji_plus(pred: np.ndarray, truth: np.ndarray) -> set[float]:
    """AJI+ by brute force: every one-to-one pairing of overlapping objects; the AJI+ values
    of those with the largest summed IoU (several when different pairings tie)."""
    true_ids, pred_ids, table = _object_pairs(pred, truth)

    def pairings(k: int, used: frozenset):
        if k == len(true_ids):
            yield []
            return
        yield from pairings(k + 1, used)
        for j in pred_ids:
            if j not in used and table[true_ids[k], j][0] > 0:
                for rest in pairings(k + 1, used | {j}):
                    yield [(true_ids[k], j), *rest]

    scored = [(sum(table[p][0] for p in pairs), pairs) for pairs in pairings(0, frozenset())]
    best = max(total for total, _ in scored)
    return {
        _aji_of(pairs, pred, truth, true_ids, pred_ids, table)
        for total, pairs in scored
        if total > best - 1e-9
    }


def reference_pq(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, float]:
    """(TP, FP, FN, summed IoU of matches) by explicit masks, matching at IoU > 0.5."""
    true_ids = [i for i in np.unique(truth) if i != 0]
    pred_ids = [j for j in np.unique(pred) if j != 0]
    ious = [
        np.count_nonzero((truth == i) & (pred == j)) / np.count_nonzero((truth == i) | (pred == j))
        for i in true_ids
        for j in pred_ids
    ]
    matched = [v for v in ious if v > 0.5]
    tp = len(matched)
    return tp, len(pred_ids) - tp, len(true_ids) - tp, float(sum(matched))


# ------------------------------------------------------------------------- pixel and class
def test_pixel_error_and_accuracy() -> None:
    pred = np.array([[0, 1], [1, 1]])
    truth = np.array([[0, 1], [0, 0]])
    assert pixel_error(pred, truth) == 0.5
    assert pixel_accuracy(pred, truth) == 0.5
    with pytest.raises(ConfigError, match="shape"):
        pixel_error(pred, truth[:1])


def test_iou_and_dice_per_class() -> None:
    truth = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 2, 2])
    np.testing.assert_allclose(iou_per_class(pred, truth, 4), [1 / 2, 2 / 4, 1 / 2, np.nan])
    np.testing.assert_allclose(dice_per_class(pred, truth, 4), [2 / 3, 4 / 6, 2 / 3, np.nan])
    # A class only in the prediction has IoU 0, not NaN.
    assert iou_per_class(np.array([3, 0]), np.array([0, 0]), 4)[3] == 0.0
    with pytest.raises(ConfigError, match="num_classes"):
        iou_per_class(pred, truth, 2)


# ------------------------------------------------------------------------------------- Rand
def test_rand_perfect_match_and_relabelling() -> None:
    truth = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2]])
    for pred in (truth, relabel(truth, 0), np.where(truth == 0, 9, truth)):
        scores = rand_scores(pred, truth)
        assert scores["rand_error"] == 0.0
        assert scores["rand_split"] == scores["rand_merge"] == 1.0
        vi = variation_of_information(pred, truth)
        assert vi["vi"] == pytest.approx(0.0, abs=1e-12)
        assert vi["info_fscore"] == pytest.approx(1.0)


def test_rand_split_merge_and_singletons_by_hand() -> None:
    one = np.array([1, 1, 1, 1])
    two = np.array([1, 1, 2, 2])
    # Split: sum p^2 = 8, sum s^2 = 8, sum t^2 = 16 (in pixel counts).
    split = rand_scores(two, one)
    assert (split["rand_split"], split["rand_merge"]) == (0.5, 1.0)
    assert split["rand_fscore"] == pytest.approx(2 / 3)
    assert split["rand_error"] == pytest.approx(1 / 3)
    # Merge: the mirror image.
    merge = rand_scores(one, two)
    assert (merge["rand_split"], merge["rand_merge"]) == (1.0, 0.5)
    # Predicted boundary pixels inside a true object are singletons:
    # sum p^2 = 2^2 + 1 + 1 = 6, sum s^2 = 6, sum t^2 = 16.
    thin = rand_scores(np.array([1, 1, 0, 0]), one)
    assert (thin["rand_split"], thin["rand_merge"]) == (6 / 16, 1.0)
    # Truth background is ignored entirely.
    ignored = rand_scores(np.array([5, 5, 5, 5]), np.array([0, 0, 3, 3]))
    assert ignored["rand_error"] == 0.0
    assert math.isnan(rand_scores(one, np.zeros(4, int))["rand_error"])


def test_information_scores_by_hand() -> None:
    one = np.array([1, 1, 1, 1])
    two = np.array([1, 1, 2, 2])
    split = variation_of_information(two, one)
    assert split["vi_split"] == pytest.approx(math.log(2))
    assert split["vi_merge"] == pytest.approx(0.0)
    assert split["info_split"] == pytest.approx(0.0)
    assert split["info_merge"] == 1.0  # H(T) = 0: nothing to merge
    merge = variation_of_information(one, two)
    assert merge["vi_merge"] == pytest.approx(math.log(2))
    assert merge["vi_split"] == pytest.approx(0.0)
    # Half/half split of a 2-object truth into 4 quarters: H(S|T) = ln 2, I = H(T) = ln 2.
    quarters = variation_of_information(np.array([1, 2, 3, 4]), np.array([1, 1, 2, 2]))
    assert quarters["vi_split"] == pytest.approx(math.log(2))
    assert quarters["info_split"] == pytest.approx(0.5)
    assert quarters["info_merge"] == pytest.approx(1.0)
    assert quarters["info_fscore"] == pytest.approx(2 / 3)


label_maps = arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 4))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_rand_and_vi_match_pair_counting(data: st.DataObject) -> None:
    truth = data.draw(label_maps)
    pred = data.draw(arrays(np.int64, truth.shape, elements=st.integers(0, 4)))
    scores = rand_scores(pred, truth)
    vi = variation_of_information(pred, truth)
    if not np.any(truth != 0):
        assert math.isnan(scores["rand_error"]) and math.isnan(vi["vi"])
        return
    split, merge = reference_rand(pred, truth)
    assert scores["rand_split"] == pytest.approx(split)
    assert scores["rand_merge"] == pytest.approx(merge)
    assert scores["rand_fscore"] == pytest.approx(2 * split * merge / (split + merge))
    h_s, h_t, h_st = reference_entropies(pred, truth)
    assert vi["vi_split"] == pytest.approx(h_st - h_t, abs=1e-9)
    assert vi["vi_merge"] == pytest.approx(h_st - h_s, abs=1e-9)
    if h_s > 1e-12:
        assert vi["info_split"] == pytest.approx((h_s + h_t - h_st) / h_s, abs=1e-9)
    # Invariance to relabelling either side.
    assert rand_scores(relabel(pred, 1), relabel(truth, 2)) == pytest.approx(scores)
    assert variation_of_information(relabel(pred, 3), truth) == pytest.approx(vi)


# -------------------------------------------------------------------------------------- AJI
def test_aji_and_f1_by_hand() -> None:
    truth = np.array([1, 1, 1, 1, 0, 2, 2, 0, 0, 0])
    pred = np.array([0, 1, 1, 1, 1, 0, 0, 0, 3, 3])
    # G1-S1: |inter| = 3, |union| = 5; G2 missed: + 2; S3 unused: + 2.
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(3 / 9)
    f1 = object_f1(pred, truth)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (1.0, 1.0, 1.0)
    assert f1["f1"] == 0.5 and f1["precision"] == 0.5 and f1["recall"] == 0.5
    assert object_f1(pred, truth, iou_threshold=0.7)["tp"] == 0.0


def test_aji_lets_a_merged_prediction_serve_both_true_objects_and_aji_plus_does_not() -> None:
    truth = np.array([1, 1, 2, 2])
    merged = np.array([7, 7, 7, 7])
    # AJI (Kumar et al. 2017): G1 and G2 both take the merged prediction, each with
    # intersection 2 and union 4: C = 4, U = 8.
    assert aji_counts(merged, truth) == (4, 8)
    assert aggregated_jaccard_index(merged, truth) == 0.5
    # AJI+ (Graham et al. 2019): one-to-one, so one of them is paired (2 / 4) and the other
    # adds its area: C = 2, U = 6.
    assert aji_plus_counts(merged, truth) == (2, 6)
    assert aji_plus(merged, truth) == pytest.approx(1 / 3)
    f1 = object_f1(merged, truth)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (1.0, 0.0, 1.0)  # IoU exactly 0.5 once


def test_aji_reuses_the_best_prediction_and_aji_plus_pairs_uniquely() -> None:
    truth = np.array([1, 1, 1, 2, 2, 2, 0, 0])
    pred = np.array([5, 5, 5, 5, 5, 6, 6, 0])
    # IoUs: G1-S5 3/5, G2-S5 2/6, G2-S6 1/4.
    # AJI: G1-S5 (3, 5), G2 takes S5 again (2, 6), S6 never taken (+ 2): 5 / 13.
    assert aji_counts(pred, truth) == (5, 13)
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(5 / 13)
    # AJI+: {G1-S5, G2-S6} sums 0.85 > 1/3 of {G2-S5}: (3 + 1) / (5 + 4).
    assert aji_plus_counts(pred, truth) == (4, 9)
    # Neither depends on the order of the ids (AJI+ is not greedy in true-id order).
    flipped = np.array([2, 2, 2, 1, 1, 1, 0, 0])
    assert aji_counts(pred, flipped) == (5, 13)
    assert aji_plus_counts(pred, flipped) == (4, 9)


def test_aji_plus_maximises_the_summed_iou_not_the_best_pair() -> None:
    truth = np.array([0, 2, 2, 2, 1, 1, 2, 2])
    pred = np.array([1, 1, 1, 2, 2, 2, 2, 2])
    # IoUs: G2-S2 3/7 (the best pair), G1-S2 2/5, G2-S1 2/6. Taking the best pair first would
    # leave G1 unpaired: (3) / (7 + 2 + 3). The maximal unique pairing is G1-S2 + G2-S1
    # (0.73 > 0.43): (2 + 2) / (5 + 6).
    assert aji_plus_counts(pred, truth) == (4, 11)
    # AJI: G1 and G2 both take S2, S1 is never taken: (2 + 3) / (5 + 7 + 3).
    assert aji_counts(pred, truth) == (5, 15)


def test_aggregated_aji_over_images_is_sum_c_over_sum_u() -> None:
    truth_a, pred_a = np.array([1, 1, 1, 2, 2, 2, 0, 0]), np.array([5, 5, 5, 5, 5, 6, 6, 0])
    truth_b, pred_b = np.array([1, 1, 0, 0]), np.array([0, 1, 1, 1])  # C 1, U 4
    rows = [evaluate_pair(p, t, "instances") for p, t in ((pred_a, truth_a), (pred_b, truth_b))]
    assert [r["aji"] for r in rows] == pytest.approx([5 / 13, 1 / 4])
    assert [r["aji_plus"] for r in rows] == pytest.approx([4 / 9, 1 / 4])
    pooled = pooled_scores(rows, "instances")
    assert pooled["aji"] == pytest.approx((5 + 1) / (13 + 4))  # not the mean
    assert pooled["aji_plus"] == pytest.approx((4 + 1) / (9 + 4))
    means = mean_scores(rows)
    assert means["aji"] == pytest.approx((5 / 13 + 1 / 4) / 2)
    assert means["aji_plus"] == pytest.approx((4 / 9 + 1 / 4) / 2)
    assert "aji_union" not in means and "aji_plus_intersection" not in means


def test_panoptic_quality_by_hand() -> None:
    truth = np.array([1, 1, 1, 1, 0, 2, 2, 0, 0])
    pred = np.array([0, 5, 5, 5, 0, 0, 0, 6, 6])
    q = panoptic_quality(pred, truth)
    # G1-S5 IoU 3/4 matches, G2 is missed (FN), S6 is a false positive.
    assert (q["tp"], q["fp"], q["fn"]) == (1.0, 1.0, 1.0)
    assert q["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert q["sq"] == pytest.approx(3 / 4)
    assert q["pq"] == pytest.approx(0.5 * 0.75)
    # Two matches, IoU 3/4 and 2/3: DQ = 1, SQ = PQ = their mean.
    two = panoptic_quality(np.array([1, 1, 1, 0, 2, 2, 2]), np.array([1, 1, 1, 1, 2, 2, 0]))
    assert two["dq"] == 1.0
    assert two["sq"] == pytest.approx((3 / 4 + 2 / 3) / 2) == two["pq"]


def test_pq_matches_above_half_but_f1_at_half() -> None:
    truth, pred = np.array([1, 1, 0, 0]), np.array([3, 0, 0, 0])  # IoU exactly 1/2
    q = panoptic_quality(pred, truth)
    assert (q["tp"], q["fp"], q["fn"]) == (0.0, 1.0, 1.0)
    assert q["pq"] == 0.0 and q["dq"] == 0.0 and math.isnan(q["sq"])
    assert object_f1(pred, truth)["f1"] == 1.0
    empty = panoptic_quality(np.zeros(3, int), np.zeros(3, int))
    assert math.isnan(empty["pq"]) and math.isnan(empty["dq"])


def test_dice_iou_from_confusion_and_pooled() -> None:
    truth = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 2, 2])
    confusion = confusion_matrix(pred, truth, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    scores = class_scores(confusion)
    np.testing.assert_allclose(scores["dice"], [2 / 3, 4 / 6, 2 / 3])
    np.testing.assert_allclose(scores["iou"], [1 / 2, 2 / 4, 1 / 2])
    # Pooled over two images = scores of the summed confusion, not the mean of the images'.
    rows = [evaluate_pair(pred, truth, "classes"), evaluate_pair(truth, truth, "classes")]
    pooled = pooled_scores(rows, "classes")
    # Summed confusion [[3, 1, 0], [0, 5, 1], [0, 0, 2]].
    np.testing.assert_allclose(pooled["dice_per_class"], [6 / 7, 10 / 12, 4 / 5])
    np.testing.assert_allclose(pooled["iou_per_class"], [3 / 4, 5 / 7, 2 / 3])
    np.testing.assert_allclose(mean_scores(rows)["dice_per_class"], [5 / 6, 5 / 6, 5 / 6])
    binary = evaluate_pair(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [0, 0]]), "binary")
    assert binary["foreground_dice"] == pytest.approx(2 / 3)
    assert binary["dice_per_class"] == pytest.approx([4 / 5, 2 / 3])
    assert binary["iou_per_class"] == pytest.approx([2 / 3, 1 / 2])


def test_aji_edge_cases() -> None:
    truth = np.array([[1, 1], [0, 2]])
    for aji in (aggregated_jaccard_index, aji_plus):
        assert aji(truth, truth) == 1.0
        assert aji(relabel(truth, 4), truth) == 1.0
        assert aji(np.zeros_like(truth), truth) == 0.0
        assert aji(truth, np.zeros_like(truth)) == 0.0
        assert math.isnan(aji(np.zeros((2, 2), int), np.zeros((2, 2), int)))
    f1 = object_f1(np.zeros((2, 2), int), np.zeros((2, 2), int))
    assert math.isnan(f1["f1"])


def test_f1_one_to_one_at_exact_half() -> None:
    truth = np.array([1, 1, 0])
    pred = np.array([4, 5, 0])  # two halves, IoU exactly 0.5 each
    f1 = object_f1(pred, truth)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (1.0, 1.0, 0.0)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_aji_and_aji_plus_match_brute_force(data: st.DataObject) -> None:
    shape = data.draw(st.tuples(st.integers(1, 8), st.integers(1, 8)))
    truth = data.draw(arrays(np.int32, shape, elements=st.integers(0, 5)))
    pred = data.draw(arrays(np.int32, shape, elements=st.integers(0, 5)))
    expected = reference_aji(pred, truth)
    got = aggregated_jaccard_index(pred, truth)
    plus = aji_plus(pred, truth)
    if math.isnan(expected):
        assert math.isnan(got) and math.isnan(plus)
    else:
        assert got == pytest.approx(expected)
        # AJI+ is the value of a pairing with the largest summed IoU.
        assert any(plus == pytest.approx(v) for v in reference_aji_plus(pred, truth)), plus
        # The predicted ids do not matter (ties go by raster order, not by id).
        assert aggregated_jaccard_index(relabel(pred, 0), truth) == pytest.approx(got)
        assert aji_plus(relabel(pred, 1), relabel(truth, 3)) == pytest.approx(plus)
    tp, fp, fn, iou_sum = reference_pq(pred, truth)
    q = panoptic_quality(relabel(pred, 2), truth)
    assert (q["tp"], q["fp"], q["fn"]) == (tp, fp, fn)
    assert q["iou_sum"] == pytest.approx(iou_sum)
    if tp:
        assert q["pq"] == pytest.approx(q["dq"] * q["sq"])


# ------------------------------------------------------------------------------- real data
def test_evaluate_pair_isbi_binary() -> None:
    labels = tifffile.imread(data_path("isbi2012", "train-labels.tif"))[2]
    perfect = evaluate_pair(labels, labels)
    assert perfect["kind"] == "binary"
    assert perfect["pixel_error"] == 0.0 and perfect["rand_error"] == 0.0
    assert perfect["info_fscore"] == pytest.approx(1.0)
    # Thicker membranes: cells shrink by one pixel; the cell partition barely changes.
    thick = np.where(ndi.binary_erosion(labels == 255), 255, 0).astype(np.uint8)
    scores = evaluate_pair(thick, labels, "binary")
    assert 0 < scores["pixel_error"] < 0.2
    assert 0 < scores["rand_error"] < 0.2
    # Removing membranes merges all cells: a large merge error.
    merged = evaluate_pair(np.full_like(labels, 255), labels, "binary")
    assert merged["rand_merge"] < 0.2 and merged["rand_split"] == 1.0
    cells = segmentation_from_binary(labels)
    assert cells.max() > 50 and cells.dtype == np.int32


def test_evaluate_pair_monuseg_instances_and_relabelling() -> None:
    truth = tifffile.imread(data_path("monuseg", "labels", "TCGA-21-5784-01Z-00-DX1.tif"))
    pred = np.roll(separate_touching(truth), 2, axis=1)
    scores = evaluate_pair(pred, truth)
    assert scores["kind"] == "instances"
    assert 0.5 < scores["aji"] < 1.0
    assert 0.8 < scores["object_f1"] <= 1.0
    assert 0 < scores["rand_error"] < 0.2
    assert 0.5 < scores["aji_plus"] < 1.0
    # Renumbering either map changes nothing.
    for again in (
        evaluate_pair(relabel(pred, 7), truth, "instances"),
        evaluate_pair(pred, relabel(truth, 8), "instances"),
    ):
        for key, value in scores.items():
            assert again[key] == (value if key == "confusion" else pytest.approx(value)), key
    perfect = evaluate_pair(truth, truth, "instances")
    assert perfect["aji"] == 1.0 and perfect["object_f1"] == 1.0 and perfect["rand_error"] == 0


def test_evaluate_pair_classes() -> None:
    truth = np.array([[0, 1, 2], [2, 2, 1]])
    pred = np.array([[0, 1, 2], [2, 1, 1]])
    scores = evaluate_pair(pred, truth)
    assert scores["kind"] == "classes"
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)
    assert scores["iou_per_class"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert scores["mean_iou"] == pytest.approx(7 / 9)
    with pytest.raises(ConfigError, match="kind"):
        evaluate_pair(pred, truth, "semantic")


def test_sparse_huge_ids_are_compacted() -> None:
    truth = np.array([[0, 10**12, 10**12], [3, 3, 0]], dtype=np.uint64)
    pred = np.array([[0, 2**40, 2**40], [7, 0, 0]], dtype=np.int64)
    small_truth = np.array([[0, 2, 2], [1, 1, 0]])
    small_pred = np.array([[0, 2, 2], [1, 0, 0]])
    assert aggregated_jaccard_index(pred, truth) == aggregated_jaccard_index(
        small_pred, small_truth
    )
    assert rand_scores(pred, truth) == rand_scores(small_pred, small_truth)
