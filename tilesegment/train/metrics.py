"""Segmentation metrics: pixel, class overlap, ISBI-2012 Rand / information scores, AJI, object
F1, panoptic quality. Which of them a label kind gets, and their pooling over a set of images,
is :mod:`tilesegment.train.scores`.

Every function takes ``(pred, truth)`` label images of the same shape (any dimensionality;
:func:`class_scores` takes their confusion matrix) and is pure numpy/scipy. Object-level
metrics are computed from a sparse contingency table (the counts of each (truth id, predicted
id) pair, via ``np.bincount`` or ``np.unique`` on a combined key), never with a loop over
objects that touches the whole image.

Conventions
-----------
Rand and information-theoretic scores (Arganda-Carreras et al. 2015, "Crowdsourcing the
creation of image segmentation algorithms for connectomics", the final ISBI 2012 metrics):

* *Foreground restriction*: only pixels where the ground truth is foreground
  (``truth != 0``) are counted; ``N`` is their number and ``p_ij`` the fraction of them with
  predicted id ``i`` and true id ``j``; ``s_i = sum_j p_ij``, ``t_j = sum_i p_ij``.
* *Prediction background*: a predicted 0 inside the true foreground (a predicted boundary
  pixel) is a segment of its own, one singleton per pixel, as in the challenge's reference
  implementation. Such pixels neither merge two true objects nor join a predicted object.
* Rand scores use the ``N**2`` normalisation (pairs drawn with replacement):
  ``V_split = sum p_ij^2 / sum t_j^2`` (1 = no true object is split),
  ``V_merge = sum p_ij^2 / sum s_i^2`` (1 = no true objects are merged),
  ``F = 2 sum p_ij^2 / (sum s_i^2 + sum t_j^2)`` (their harmonic mean), Rand error ``1 - F``.
* Information scores, natural logarithms (nats), with ``S`` = prediction, ``T`` = truth:
  ``vi_split = H(S|T)``, ``vi_merge = H(T|S)``, ``vi = vi_split + vi_merge``;
  ``info_split = I(S;T) / H(S)``, ``info_merge = I(S;T) / H(T)``,
  ``info_fscore = 2 I(S;T) / (H(S) + H(T))``. A score whose denominator is 0 (a single
  segment, so nothing can be split or merged on that side) is 1.

For binary cell/membrane maps (ISBI 2012: 255 = cell interior), the segmentations compared
are the 4-connected components of the cell class, :func:`segmentation_from_binary`. The
challenge leaderboard additionally thins the predicted boundaries and reports the best score
over a sweep of binarisation thresholds of the probability map; both steps are left to the
caller (these functions score one given segmentation).

Instance metrics (0 = background):

* AJI, aggregated Jaccard index (Kumar et al., IEEE TMI 2017, Algorithm 1, the AJI of the
  published MoNuSeg numbers; HoVer-Net's ``get_fast_aji``): every true object ``G`` takes the
  predicted object ``S`` of largest IoU (ties: the one whose first pixel comes first in raster
  order, so the ids never matter) and adds ``|G & S|`` to ``C``, ``|G | S|`` to ``U``; a
  prediction may serve several true objects. A true object overlapping no prediction adds
  ``|G|`` to ``U``, and so does every prediction never taken. ``AJI = C / U``, NaN when both
  maps are empty; over a set of images ``sum C / sum U`` (:func:`aji_counts`).
* AJI+ (Graham et al., HoVer-Net, Medical Image Analysis 2019): the same sums over a maximal
  unique pairing instead, true and predicted objects paired one-to-one with the largest summed
  IoU (:func:`tilesegment.train.pairing.max_iou_pairing`); every unpaired object adds its area
  to ``U``. A merge then costs the second true object its area, not the merged union again.
* Object F1: true and predicted objects are matched one-to-one when their IoU is at least
  ``iou_threshold`` (default 0.5), greedily by decreasing IoU (ties in raster order of the
  objects' first pixels). For thresholds above 0.5 a match is unique anyway; at exactly 0.5
  the greedy order only breaks exact ties and cannot change the counts.
* Panoptic quality (Kirillov et al. 2019, as HoVer-Net and CellViT compute it for nuclei):
  pairs with IoU *above* 0.5 are matches (unique by construction), ``SQ`` = mean IoU of the
  matches, ``DQ = TP / (TP + FP/2 + FN/2)``, ``PQ = DQ x SQ``. Unlike the object F1, a pair
  at exactly 0.5 does not match.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tilesegment.errors import ConfigError
from tilesegment.train.labels import instances_from_binary
from tilesegment.train.pairing import max_iou_pairing

logger = logging.getLogger(__name__)

__all__ = [
    "aggregated_jaccard_index",
    "aji_counts",
    "aji_plus",
    "aji_plus_counts",
    "class_scores",
    "confusion_matrix",
    "dice_per_class",
    "iou_per_class",
    "matched_objects",
    "object_f1",
    "panoptic_quality",
    "pixel_accuracy",
    "pixel_error",
    "rand_scores",
    "segmentation_from_binary",
    "variation_of_information",
]


# --------------------------------------------------------------------------------- helpers
def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as arrays of the same shape, or ConfigError."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ConfigError(f"`pred` shape {pred.shape} must equal `truth` shape {truth.shape}")
    return pred, truth


def _as_ids(label: np.ndarray, name: str) -> np.ndarray:
    """Flat int64 ids >= 0; sparse large ids are compacted (0 stays 0, order kept).

    Compaction (one sort) happens when the largest id exceeds ``4 * size + 65536``, so that
    the per-id tables below (``bincount``, ``find_objects``) stay proportional to the image.
    """
    label = np.asarray(label)
    if label.dtype == bool:
        return label.ravel().astype(np.int64)
    if not np.issubdtype(label.dtype, np.integer):
        raise ConfigError(f"`{name}` must be an integer label image, got dtype {label.dtype}")
    flat = label.ravel()
    if flat.size == 0:
        return flat.astype(np.int64)
    if np.issubdtype(flat.dtype, np.signedinteger) and flat.min() < 0:
        raise ConfigError(f"`{name}` must be >= 0, got minimum {flat.min()}")
    if int(flat.max()) > 4 * flat.size + 65536:
        values, compact = np.unique(flat, return_inverse=True)
        return compact.astype(np.int64) + (1 if values[0] != 0 else 0)
    return flat.astype(np.int64)


def _pair_counts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two flat id arrays: (a_ids, b_ids, counts), counts > 0."""
    if a.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    n_b = int(b.max()) + 1
    key = a * n_b + b
    n_keys = (int(a.max()) + 1) * n_b
    if n_keys <= max(4 * a.size, 1 << 22):
        counts = np.bincount(key, minlength=n_keys)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    return keys // n_b, keys % n_b, counts.astype(np.int64)


def _first_pixels(ids: np.ndarray) -> np.ndarray:
    """Flat index of the first pixel of each id (raster order), indexed by id; -1 if absent.

    On the flat array, the bounding "box" that ``find_objects`` returns for an id starts at
    its first pixel: one O(N) pass in C.
    """
    out = np.full(int(ids.max(initial=0)) + 1, -1, dtype=np.int64)
    for index, box in enumerate(ndi.find_objects(ids), start=1):
        if box is not None:
            out[index] = box[0].start
    return out


def _sizes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(object ids > 0, their pixel counts)."""
    counts = np.bincount(ids) if ids.size else np.zeros(1, dtype=np.int64)
    present = np.flatnonzero(counts)
    present = present[present > 0]
    return present, counts[present]


def _ratio(numerator: float, denominator: float, empty: float = math.nan) -> float:
    return float(numerator / denominator) if denominator else empty


# ----------------------------------------------------------------------- pixel and class
def pixel_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels whose labels differ (compare like with like: binarise first).

    >>> pixel_error(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))
    0.25
    """
    pred, truth = _pair(pred, truth)
    if pred.size == 0:
        return math.nan
    return float(np.count_nonzero(pred != truth) / pred.size)


def pixel_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels whose labels agree, ``1 - pixel_error``."""
    return 1.0 - pixel_error(pred, truth)


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 pixel counts, rows = truth, columns = prediction.

    Summing the matrices of several images gives the pooled (dataset-level) class scores.

    >>> confusion_matrix(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2)
    array([[2, 1],
           [0, 1]])
    """
    pred, truth = _pair(pred, truth)
    if num_classes < 1:
        raise ConfigError(f"`num_classes` ({num_classes}) must be >= 1")
    p = _as_ids(pred, "pred")
    t = _as_ids(truth, "truth")
    for name, ids in (("pred", p), ("truth", t)):
        if ids.size and ids.max() >= num_classes:
            raise ConfigError(f"`{name}` has class {ids.max()} >= `num_classes` ({num_classes})")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """IoU ``TP / (TP + FP + FN)`` and Dice ``2 TP / (2 TP + FP + FN)`` of each class.

    Parameters
    ----------
    confusion : (K, K) int ndarray
        Rows = truth, columns = prediction (:func:`confusion_matrix`, or a sum of them).

    Returns
    -------
    dict
        ``iou`` and ``dice``, (K,) float64 arrays: NaN for a class absent from both maps
        (undefined); 0 for a class that only one of them contains.
    """
    confusion = np.asarray(confusion)
    tp = np.diag(confusion).astype(np.float64)
    total = (confusion.sum(0) + confusion.sum(1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "iou": np.where(total > tp, tp / (total - tp), np.nan),
            "dice": np.where(total > 0, 2 * tp / total, np.nan),
        }


def iou_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Intersection over union of each class, ``TP / (TP + FP + FN)``.

    Parameters
    ----------
    pred, truth : int ndarray, same shape
        Class maps with values in ``0 .. num_classes - 1``.
    num_classes : int

    Returns
    -------
    iou : (num_classes,) float64 ndarray
        NaN for a class absent from both maps (IoU undefined); 0 for a class that only one
        of them contains.

    Examples
    --------
    >>> iou_per_class(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 3)
    array([0.66666667, 0.5       ,        nan])
    """
    return class_scores(confusion_matrix(pred, truth, num_classes))["iou"]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice coefficient of each class, ``2 TP / (2 TP + FP + FN)``; NaN as in :func:`iou_per_class`.

    >>> dice_per_class(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2)
    array([0.8       , 0.66666667])
    """
    return class_scores(confusion_matrix(pred, truth, num_classes))["dice"]


# ------------------------------------------------------------------- Rand and information
def segmentation_from_binary(mask: np.ndarray) -> np.ndarray:
    """Cells as the 4-connected components of the cell class (``mask != 0``).

    For ISBI 2012 labels (255 = cell interior, 0 = membrane) pass the label image itself.
    See :func:`tilesegment.train.labels.instances_from_binary`; returns int32 ids, 0 = boundary.
    """
    return instances_from_binary(np.asarray(mask) != 0)


def _foreground_table(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Counts behind the Rand and information scores (see the module docstring)."""
    pred, truth = _pair(pred, truth)
    p = _as_ids(pred, "pred")
    t = _as_ids(truth, "truth")
    inside = t != 0
    p, t = p[inside], t[inside]
    n = int(p.size)
    assigned = p != 0
    singletons = n - int(np.count_nonzero(assigned))
    _, _, joint = _pair_counts(p[assigned], t[assigned])
    _, pred_sizes = _sizes(p[assigned])
    _, true_sizes = _sizes(t)
    return {
        "n": n,
        "singletons": singletons,
        "joint": joint.astype(np.float64),
        "pred_sizes": pred_sizes.astype(np.float64),
        "true_sizes": true_sizes.astype(np.float64),
    }


def rand_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Foreground-restricted Rand scores of the ISBI 2012 challenge.

    Parameters
    ----------
    pred : int ndarray
        Predicted segmentation, 0 = boundary/background (each such pixel inside the true
        foreground is its own singleton segment).
    truth : int ndarray, same shape
        True segmentation, 0 = background (ignored).

    Returns
    -------
    dict
        ``rand_split``, ``rand_merge``, ``rand_fscore`` and ``rand_error = 1 - rand_fscore``
        (definitions in the module docstring); all NaN without true foreground.

    Examples
    --------
    A true object split in two halves:

    >>> s = rand_scores(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 1]))
    >>> s["rand_split"], s["rand_merge"], round(s["rand_error"], 4)
    (0.5, 1.0, 0.3333)
    """
    table = _foreground_table(pred, truth)
    if table["n"] == 0:
        return dict.fromkeys(("rand_split", "rand_merge", "rand_fscore", "rand_error"), math.nan)
    singletons = table["singletons"]
    sum_joint = float(np.dot(table["joint"], table["joint"])) + singletons
    sum_pred = float(np.dot(table["pred_sizes"], table["pred_sizes"])) + singletons
    sum_true = float(np.dot(table["true_sizes"], table["true_sizes"]))
    split = sum_joint / sum_true
    merge = sum_joint / sum_pred
    fscore = 2.0 * sum_joint / (sum_pred + sum_true)
    return {
        "rand_split": split,
        "rand_merge": merge,
        "rand_fscore": fscore,
        "rand_error": 1.0 - fscore,
    }


def _entropy(counts: np.ndarray, singletons: int, n: int) -> float:
    """Entropy (nats) of a partition of ``n`` items into ``counts`` plus singletons."""
    p = counts[counts > 0] / n
    value = -float(np.dot(p, np.log(p)))
    if singletons:
        value += singletons / n * math.log(n)
    return value


def variation_of_information(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Foreground-restricted variation of information and information-theoretic scores.

    Same pixels and singleton convention as :func:`rand_scores`; natural logarithms.

    Returns
    -------
    dict
        ``vi_split = H(S|T)``, ``vi_merge = H(T|S)``, ``vi``, ``info_split = I/H(S)``,
        ``info_merge = I/H(T)``, ``info_fscore = 2 I / (H(S) + H(T))`` (S = prediction,
        T = truth); all NaN without true foreground.

    Examples
    --------
    >>> v = variation_of_information(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 1]))
    >>> round(v["vi_split"], 4), v["vi_merge"], v["info_split"], v["info_merge"]
    (0.6931, 0.0, 0.0, 1.0)
    """
    table = _foreground_table(pred, truth)
    n = table["n"]
    keys = ("vi_split", "vi_merge", "vi", "info_split", "info_merge", "info_fscore")
    if n == 0:
        return dict.fromkeys(keys, math.nan)
    singletons = table["singletons"]
    h_pred = _entropy(table["pred_sizes"], singletons, n)
    h_true = _entropy(table["true_sizes"], 0, n)
    h_joint = _entropy(table["joint"], singletons, n)
    mutual = max(h_pred + h_true - h_joint, 0.0)
    split = max(h_joint - h_true, 0.0)
    merge = max(h_joint - h_pred, 0.0)
    return {
        "vi_split": split,
        "vi_merge": merge,
        "vi": split + merge,
        "info_split": _ratio(mutual, h_pred, empty=1.0),
        "info_merge": _ratio(mutual, h_true, empty=1.0),
        "info_fscore": _ratio(2.0 * mutual, h_pred + h_true, empty=1.0),
    }


# -------------------------------------------------------------------------------- objects
def _overlaps(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Object areas and the IoU of every overlapping (true, predicted) pair."""
    pred, truth = _pair(pred, truth)
    p = _as_ids(pred, "pred")
    t = _as_ids(truth, "truth")
    both = (p != 0) & (t != 0)
    t_ids, p_ids, inter = _pair_counts(t[both], p[both])
    true_ids, true_area = _sizes(t)
    pred_ids, pred_area = _sizes(p)
    area_t = np.zeros(int(t.max(initial=0)) + 1, dtype=np.int64)
    area_t[true_ids] = true_area
    area_p = np.zeros(int(p.max(initial=0)) + 1, dtype=np.int64)
    area_p[pred_ids] = pred_area
    union = area_t[t_ids] + area_p[p_ids] - inter
    return {
        "pair_true_rank": _first_pixels(t)[t_ids],
        "pair_pred_rank": _first_pixels(p)[p_ids],
        "true_ids": true_ids,
        "true_area": true_area,
        "pred_ids": pred_ids,
        "pred_area": pred_area,
        "pair_true": t_ids,
        "pair_pred": p_ids,
        "inter": inter,
        "union": union,
        "iou": inter / union if union.size else np.zeros(0),
    }


def _aji_sums(o: dict[str, np.ndarray], chosen: np.ndarray) -> tuple[int, int]:
    """``(C, U)`` of an AJI from the chosen (true, predicted) pairs (indices into ``o``): their
    intersections, their unions, and the area of every object in no chosen pair."""
    intersection = int(o["inter"][chosen].sum())
    union = int(o["union"][chosen].sum())
    union += int(o["true_area"][~np.isin(o["true_ids"], o["pair_true"][chosen])].sum())
    union += int(o["pred_area"][~np.isin(o["pred_ids"], o["pair_pred"][chosen])].sum())
    return intersection, union


def aji_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """AJI's ``(C, U)``: the summed intersections and unions of Kumar et al.'s Algorithm 1.

    One prediction over two true objects serves both:

    >>> aji_counts(np.array([7, 7, 7, 7]), np.array([1, 1, 2, 2]))  # (2 + 2, 4 + 4)
    (4, 8)
    """
    o = _overlaps(pred, truth)
    # Best pair per true object: sort by (true id, -IoU, raster rank of the prediction) and
    # keep the first row of each true id.
    order = np.lexsort((o["pair_pred_rank"], -o["iou"], o["pair_true"]))
    first = np.ones(order.size, dtype=bool)
    first[1:] = o["pair_true"][order][1:] != o["pair_true"][order][:-1]
    return _aji_sums(o, order[first])


def aggregated_jaccard_index(pred: np.ndarray, truth: np.ndarray) -> float:
    """Aggregated Jaccard index of Kumar et al. (2017) of two instance maps (0 = background):
    ``C / U`` of :func:`aji_counts`, in [0, 1]; NaN when neither map has an object.

    One true object found with IoU 3/5, one missed, one false positive:

    >>> truth = np.array([1, 1, 1, 1, 0, 2, 2, 0, 0, 0])
    >>> pred = np.array([0, 1, 1, 1, 1, 0, 0, 0, 3, 3])
    >>> aggregated_jaccard_index(pred, truth)  # 3 / (5 + 2 + 2)
    0.3333333333333333
    """
    intersection, union = aji_counts(pred, truth)
    return _ratio(intersection, union)


def aji_plus_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """AJI+'s ``(C, U)`` (Graham et al. 2019): objects paired one-to-one, largest summed IoU.

    One prediction over two true objects is paired with one; the other adds its area:

    >>> aji_plus_counts(np.array([7, 7, 7, 7]), np.array([1, 1, 2, 2]))  # (2, 4 + 2)
    (2, 6)
    """
    o = _overlaps(pred, truth)
    ranks = (o["pair_true_rank"], o["pair_pred_rank"])
    return _aji_sums(o, max_iou_pairing(o["pair_true"], o["pair_pred"], o["iou"], ranks=ranks))


def aji_plus(pred: np.ndarray, truth: np.ndarray) -> float:
    """AJI+ of Graham et al. (2019), ``C / U`` of :func:`aji_plus_counts`; NaN when neither
    map has an object.

    >>> aji_plus(np.array([5, 5, 5, 5, 5, 6, 6, 0]), np.array([1, 1, 1, 2, 2, 2, 0, 0]))
    0.4444444444444444
    """
    intersection, union = aji_plus_counts(pred, truth)
    return _ratio(intersection, union)


def panoptic_quality(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Panoptic quality ``PQ = DQ x SQ`` of one class of instances, matching at IoU > 0.5.

    Parameters
    ----------
    pred, truth : int ndarray, same shape
        Instance maps, 0 = background.

    Returns
    -------
    dict
        ``pq``, ``dq = TP / (TP + FP/2 + FN/2)``, ``sq`` (mean IoU of the matches; NaN without a
        match), ``tp``, ``fp``, ``fn`` (counts, as floats) and ``iou_sum`` (the matches' IoUs
        summed). ``pq`` is ``iou_sum / (TP + FP/2 + FN/2)``: 0 when objects exist but none
        matches, NaN when neither map has an object.

    Examples
    --------
    One match with IoU 3/4, one missed true object, one false positive:

    >>> truth = np.array([1, 1, 1, 1, 0, 2, 2, 0, 0])
    >>> pred = np.array([0, 5, 5, 5, 0, 0, 0, 6, 6])
    >>> q = panoptic_quality(pred, truth)
    >>> q["dq"], q["sq"], q["pq"]  # 1 / (1 + 1/2 + 1/2), 3/4, 0.5 * 0.75
    (0.5, 0.75, 0.375)
    """
    o = _overlaps(pred, truth)
    match = o["iou"] > 0.5
    tp = int(np.count_nonzero(match))
    fp = int(o["pred_ids"].size) - tp
    fn = int(o["true_ids"].size) - tp
    iou_sum = float(o["iou"][match].sum())
    detections = tp + 0.5 * fp + 0.5 * fn
    return {
        "pq": _ratio(iou_sum, detections),
        "dq": _ratio(tp, detections),
        "sq": _ratio(iou_sum, tp),
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "iou_sum": iou_sum,
    }


def object_f1(
    pred: np.ndarray, truth: np.ndarray, *, iou_threshold: float = 0.5
) -> dict[str, float]:
    """Object-level detection scores with one-to-one matching at ``IoU >= iou_threshold``.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (counts, as floats), ``precision = tp / (tp + fp)``,
        ``recall = tp / (tp + fn)``, ``f1 = 2 tp / (2 tp + fp + fn)``; a ratio with a zero
        denominator is NaN.

    Examples
    --------
    >>> truth = np.array([1, 1, 1, 1, 0, 2, 2, 0, 0, 0])
    >>> pred = np.array([0, 1, 1, 1, 1, 0, 0, 0, 3, 3])
    >>> object_f1(pred, truth)["f1"]
    0.5
    """
    o = _overlaps(pred, truth)
    used_true, _ = _greedy_matches(o, iou_threshold)
    tp = len(used_true)
    fp = int(o["pred_ids"].size) - tp
    fn = int(o["true_ids"].size) - tp
    return {
        "tp": float(tp),
        "fp": float(fp),
        "fn": float(fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _greedy_matches(o: dict[str, np.ndarray], iou_threshold: float) -> tuple[set[int], set[int]]:
    """(true ids, predicted ids) matched one-to-one at ``IoU >= iou_threshold`` (the object F1's
    matching, see the module docstring)."""
    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"`iou_threshold` ({iou_threshold}) must be in (0, 1]")
    candidates = np.flatnonzero(o["iou"] >= iou_threshold)
    ranks = (o["pair_pred_rank"][candidates], o["pair_true_rank"][candidates])
    order = candidates[np.lexsort((*ranks, -o["iou"][candidates]))]
    used_true: set[int] = set()
    used_pred: set[int] = set()
    for t_id, p_id in zip(
        o["pair_true"][order].tolist(), o["pair_pred"][order].tolist(), strict=True
    ):
        if t_id not in used_true and p_id not in used_pred:
            used_true.add(t_id)
            used_pred.add(p_id)
    return used_true, used_pred


def matched_objects(
    pred: np.ndarray, truth: np.ndarray, *, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel masks of the objects :func:`object_f1` matches: (in a matched predicted object,
    in a matched true object), boolean arrays of the maps' shape.

    >>> matched_objects(np.array([3, 3, 0, 4]), np.array([1, 1, 1, 0]))[0].tolist()
    [True, True, False, False]
    """
    pred, truth = _pair(pred, truth)
    o = _overlaps(pred, truth)
    used_true, used_pred = _greedy_matches(o, iou_threshold)
    out = []
    for label, used in ((pred, used_pred), (truth, used_true)):
        ids = _as_ids(label, "label")
        lut = np.zeros(int(ids.max(initial=0)) + 1, dtype=bool)
        lut[list(used)] = True
        out.append(lut[ids].reshape(label.shape))
    return out[0], out[1]
