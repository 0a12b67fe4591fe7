"""Which metrics a label kind gets, per image and pooled over a set of images.

:func:`evaluate_pair` scores one (prediction, truth) pair with the metrics of
:mod:`tilesegment.train.metrics` that suit the truth's kind; :func:`mean_scores` averages
the per-image numbers; :func:`pooled_scores` computes the dataset-level forms the field
reports: the aggregated AJI and AJI+ (``sum C / sum U`` over all images; Kumar et al. 2017,
Graham et al. 2019), object precision/recall/F1 from the summed TP/FP/FN (as StarDist's
``matching_dataset``), and class IoU/Dice from the summed confusion matrix. Panoptic quality
is reported per image and as the mean over images (HoVer-Net's and CellViT's convention), not
pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.train.labels import LabelKind, detect_label_kind
from tilesegment.train.metrics import (
    aji_counts,
    aji_plus_counts,
    class_scores,
    confusion_matrix,
    object_f1,
    panoptic_quality,
    pixel_error,
    rand_scores,
    segmentation_from_binary,
    variation_of_information,
)

__all__ = ["HEADLINE_METRIC", "evaluate_pair", "mean_scores", "pooled_scores"]

#: The metric that ranks images (and is shown first) per label kind; higher is better.
HEADLINE_METRIC: dict[str, str] = {
    "instances": "aji",
    "binary": "foreground_dice",
    "classes": "mean_dice",
}

#: Per-image counts, summed by :func:`pooled_scores` rather than averaged.
COUNT_KEYS = frozenset(
    {
        "aji_intersection",
        "aji_union",
        "aji_plus_intersection",
        "aji_plus_union",
        "object_tp",
        "object_fp",
        "object_fn",
    }
)


def _nanmean(values: np.ndarray) -> float:
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else math.nan


def _class_fields(confusion: np.ndarray) -> dict[str, Any]:
    scores = class_scores(confusion)
    return {
        "iou_per_class": scores["iou"].tolist(),
        "dice_per_class": scores["dice"].tolist(),
        "mean_iou": _nanmean(scores["iou"]),
        "mean_dice": _nanmean(scores["dice"]),
        "mean_foreground_dice": _nanmean(scores["dice"][1:]),
    }


def _foreground_fields(confusion: np.ndarray) -> dict[str, Any]:
    scores = class_scores(confusion)
    return {
        "foreground_iou": float(scores["iou"][1]),
        "foreground_dice": float(scores["dice"][1]),
        "iou_per_class": scores["iou"].tolist(),
        "dice_per_class": scores["dice"].tolist(),
    }


def evaluate_pair(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    kind: LabelKind | None = None,
    *,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """All metrics that make sense for one (prediction, truth) pair of a given kind.

    Parameters
    ----------
    pred_labels, true_labels : ndarray, same shape
    kind : {"binary", "classes", "instances"}, optional
        Default: :func:`tilesegment.train.labels.detect_label_kind` of ``true_labels``.

        * ``"binary"`` (foreground = ``!= 0``; ISBI: 255 = cell): ``pixel_error``,
          ``foreground_iou``, ``foreground_dice``, ``iou_per_class`` / ``dice_per_class``
          (background, foreground), and the Rand and information scores of the 4-connected
          components of the foreground
          (:func:`~tilesegment.train.metrics.segmentation_from_binary`).
        * ``"classes"``: ``pixel_error``, ``pixel_accuracy``, ``iou_per_class``,
          ``dice_per_class`` (lists), ``mean_iou`` and ``mean_dice`` (NaN classes skipped),
          ``mean_foreground_dice`` (the mean Dice of classes 1 ..).
        * ``"instances"``: ``aji`` (Kumar et al. 2017) with its ``aji_intersection`` and
          ``aji_union``; ``aji_plus`` (AJI+, Graham et al. 2019) with ``aji_plus_intersection``
          and ``aji_plus_union``; ``pq``,
          ``dq``, ``sq``; ``object_*`` from :func:`~tilesegment.train.metrics.object_f1` at
          IoU 0.5; pixel-level ``foreground_iou`` / ``foreground_dice`` (and per class); the
          Rand and information scores of the instance maps themselves.

        Every kind also gets ``confusion``, the pixel confusion matrix (rows = truth) of the
        classes (binary and instances: background / foreground), as nested lists.
    num_classes : int, optional
        Classes only: size of the per-class lists. Default: largest class in either map + 1.

    Returns
    -------
    dict
        Python floats, ints and lists, plus ``"kind"``.
    """
    if pred_labels.shape != true_labels.shape:
        raise ConfigError(
            f"`pred_labels` shape {pred_labels.shape} must equal `true_labels` shape "
            f"{true_labels.shape}"
        )
    if kind is None:
        kind = detect_label_kind(true_labels)
    result: dict[str, Any] = {"kind": kind}
    if kind == "classes":
        largest = int(max(pred_labels.max(initial=0), true_labels.max(initial=0)))
        confusion = confusion_matrix(pred_labels, true_labels, num_classes or largest + 1)
        result.update(
            pixel_error=pixel_error(pred_labels, true_labels),
            pixel_accuracy=1.0 - pixel_error(pred_labels, true_labels),
            **_class_fields(confusion),
            confusion=confusion.tolist(),
        )
        return result
    if kind not in ("binary", "instances"):
        raise ConfigError(f'`kind` ({kind!r}) must be "binary", "classes" or "instances"')
    pred_fg = (pred_labels != 0).astype(np.uint8)
    true_fg = (true_labels != 0).astype(np.uint8)
    confusion = confusion_matrix(pred_fg, true_fg, 2)
    if kind == "binary":
        result["pixel_error"] = pixel_error(pred_fg, true_fg)
        pred_seg = segmentation_from_binary(pred_fg)
        true_seg = segmentation_from_binary(true_fg)
    else:
        for name, counts in (("aji", aji_counts), ("aji_plus", aji_plus_counts)):
            intersection, union = counts(pred_labels, true_labels)
            result[name] = intersection / union if union else math.nan
            result[f"{name}_intersection"], result[f"{name}_union"] = intersection, union
        quality = panoptic_quality(pred_labels, true_labels)
        result.update({k: quality[k] for k in ("pq", "dq", "sq")})
        result.update({f"object_{k}": v for k, v in object_f1(pred_labels, true_labels).items()})
        pred_seg, true_seg = pred_labels, true_labels
    result.update(_foreground_fields(confusion))
    result.update(rand_scores(pred_seg, true_seg))
    result.update(variation_of_information(pred_seg, true_seg))
    result["confusion"] = confusion.tolist()
    return result


def mean_scores(per_image: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over images of every scalar metric and, element-wise, of the per-class lists.

    NaN values are skipped; counts (:data:`COUNT_KEYS`) and the confusion matrices are left
    to :func:`pooled_scores`.
    """
    out: dict[str, Any] = {}
    if not per_image:
        return out
    for key, value in per_image[0].items():
        if key in COUNT_KEYS or key == "confusion" or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = _nanmean(np.array([row[key] for row in per_image], dtype=np.float64))
        elif isinstance(value, list) and key.endswith("_per_class"):
            if len({len(row[key]) for row in per_image}) != 1:
                continue  # class counts differ between images: only the pooled lists
            table = np.array([row[key] for row in per_image], dtype=np.float64)
            out[key] = [_nanmean(column) for column in table.T]
    return out


def pooled_scores(per_image: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Dataset-level scores from the summed counts of :func:`evaluate_pair` results.

    Returns
    -------
    dict
        ``iou_per_class``, ``dice_per_class`` from the summed confusion matrix (and
        ``mean_iou`` / ``mean_dice`` for classes, ``foreground_iou`` / ``foreground_dice``
        otherwise); for instances also ``aji`` and ``aji_plus`` (aggregated,
        ``sum C / sum U``) and ``object_precision``, ``object_recall``, ``object_f1`` from
        the summed TP, FP, FN. Empty without images.

    Examples
    --------
    Two images with AJI 2/4 and 1/8: the aggregated AJI is 3/12, their mean 0.3125.

    >>> rows = [{"aji_intersection": 2, "aji_union": 4, "aji_plus_intersection": 2,
    ...          "aji_plus_union": 4, "object_tp": 1.0, "object_fp": 0.0, "object_fn": 1.0,
    ...          "confusion": [[4, 0], [1, 3]]},
    ...         {"aji_intersection": 1, "aji_union": 8, "aji_plus_intersection": 1,
    ...          "aji_plus_union": 6, "object_tp": 0.0, "object_fp": 1.0, "object_fn": 0.0,
    ...          "confusion": [[6, 1], [0, 1]]}]
    >>> pooled = pooled_scores(rows, "instances")
    >>> pooled["aji"], pooled["aji_plus"], pooled["object_f1"], pooled["foreground_dice"]
    (0.25, 0.3, 0.5, 0.8)
    """
    if not per_image:
        return {}
    sizes = {len(row["confusion"]) for row in per_image}
    size = max(sizes)
    confusion = np.zeros((size, size), dtype=np.int64)
    for row in per_image:
        k = len(row["confusion"])
        confusion[:k, :k] += np.asarray(row["confusion"], dtype=np.int64)
    if kind == "classes":
        return _class_fields(confusion)
    out = _foreground_fields(confusion)
    if kind == "instances":
        for name in ("aji", "aji_plus"):
            union = sum(row[f"{name}_union"] for row in per_image)
            intersection = sum(row[f"{name}_intersection"] for row in per_image)
            out[name] = intersection / union if union else math.nan
        tp, fp, fn = (sum(row[f"object_{k}"] for row in per_image) for k in ("tp", "fp", "fn"))
        out["object_precision"] = tp / (tp + fp) if tp + fp else math.nan
        out["object_recall"] = tp / (tp + fn) if tp + fn else math.nan
        out["object_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return out
