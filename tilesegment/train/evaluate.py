"""Score a model on labelled images: whole-image predictions, labels from them, metrics.

Used by the training loop (validation every epoch) and by ``tilesegment evaluate``. Both read
data with :func:`tilesegment.train.data.load_data`, so every layout of ``train`` works here too.

Resolution (:func:`predict_at_mpp`): when the images' µm/px is given and differs from the
model's, each image is resampled to the model's µm/px exactly as ``run`` resamples a slide
(:func:`tilesegment.io.resample.resample_array`, the kernel of ``ResampledReader``), predicted
there, and the class probabilities are resampled back onto the image's own grid (same kernel,
antialiased when shrinking): metrics are always computed at the image's and labels' size. A
model with a ``downsample`` F has every image shrunk by F the same way, whatever its µm/px.

From probabilities ``(K, H, W)`` to a label image comparable with the truth
(:func:`labels_from_probabilities`): the class map is the arg-max;

* ``binary``: foreground = class 1 (ISBI: cell interior); metrics of
  :func:`tilesegment.train.metrics.evaluate_pair` with kind ``"binary"`` (Rand error of the
  4-connected components, pixel error, foreground IoU/Dice);
* ``instances``: the 4-connected components of class 1, objects smaller than
  ``min_object_size`` px removed; with a boundary class (3 classes) the instances ``run``
  makes when the model declares them (``instances`` in its config: interior seeds grown into
  the nucleus region, :mod:`tilesegment.postprocess.seeded`), else the components of the
  interior class grown back over the boundary pixels by up to 2 px. Metrics: AJI and AJI+
  (per image and aggregated), PQ = DQ x SQ, object F1 at IoU 0.5, foreground Dice, Rand
  scores;
* ``classes``: the class map itself; pixel error, per-class and mean IoU/Dice.

Which metrics, their means and pooled forms: :mod:`tilesegment.train.scores`.

The validation loss is the training loss on whole images: ``sum(w * CE) / sum(w)`` over all
pixels of all images, with the same weight maps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.segmentation import expand_labels

from tilesegment.instances import InstanceSpec
from tilesegment.postprocess.seeded import seeded_instances
from tilesegment.train.labels import LabelKind, instances_from_binary
from tilesegment.train.scores import HEADLINE_METRIC, evaluate_pair, mean_scores, pooled_scores

log = logging.getLogger(__name__)

#: Metrics that can pick the best checkpoint (``--select-metric``), per label kind: metric ->
#: whether lower is better. Each is the mean over the validation images (``val_loss``: the
#: weighted cross-entropy over all of them).
SELECTABLE_METRICS: dict[str, dict[str, bool]] = {
    "binary": {
        "foreground_dice": False,
        "foreground_iou": False,
        "rand_error": True,
        "pixel_error": True,
        "info_fscore": False,
        "val_loss": True,
    },
    "instances": {
        "aji": False,
        "aji_plus": False,
        "pq": False,
        "object_f1": False,
        "foreground_dice": False,
        "rand_error": True,
        "val_loss": True,
    },
    "classes": {
        "mean_foreground_dice": False,
        "mean_dice": False,
        "mean_iou": False,
        "pixel_error": True,
        "val_loss": True,
    },
}

#: The default of ``--select-metric`` per label kind, and whether lower is better: the mean
#: foreground Dice for masks (the Rand error of a single-object mask such as a PH2 lesion is
#: 0 whatever its outline; ISBI membranes ask for ``rand_error``), the classic AJI of Kumar
#: et al. 2017 (the published numbers' AJI) for instances.
SELECTION_METRIC: dict[str, tuple[str, bool]] = {
    "binary": ("foreground_dice", False),
    "instances": ("aji", False),
    "classes": ("mean_foreground_dice", False),
}


def selection_metric(
    kind: str, requested: str | None = None, *, validation: bool = True
) -> tuple[str, bool]:
    """(metric, lower is better) that picks a run's best checkpoint.

    Parameters
    ----------
    kind : {"binary", "classes", "instances"}
    requested : str, optional
        ``--select-metric``; None = :data:`SELECTION_METRIC` of ``kind``.
    validation : bool
        Whether the run has validation images; without, the training loss decides.

    >>> selection_metric("binary"), selection_metric("binary", "rand_error")
    (('foreground_dice', False), ('rand_error', True))
    >>> selection_metric("instances", validation=False)
    ('train_loss', True)
    """
    from tilesegment.errors import ConfigError

    if not validation:
        if requested is not None:
            raise ConfigError(
                f"--select-metric {requested} needs validation images: give --val-list or a "
                "--val-fraction above 0"
            )
        return "train_loss", True
    if requested is None:
        return SELECTION_METRIC[kind]
    allowed = SELECTABLE_METRICS[kind]
    if requested not in allowed:
        raise ConfigError(
            f"--select-metric {requested} is not computed for {kind} labels; choose one of "
            f"{', '.join(allowed)}"
        )
    return requested, allowed[requested]


#: Metrics shown in tables and logs, per label kind (all of them go to JSON).
SUMMARY_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("rand_error", "pixel_error", "foreground_dice", "foreground_iou", "info_fscore"),
    "instances": ("aji", "object_f1", "foreground_dice", "rand_error"),
    "classes": ("pixel_error", "mean_iou", "mean_dice", "mean_foreground_dice"),
}

#: Columns of ``evaluate``'s table per label kind: (metric, header); classes add per-class
#: Dice and IoU columns.
TABLE_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "instances": (
        ("aji", "AJI"),
        ("aji_plus", "AJI+"),
        ("pq", "PQ"),
        ("dq", "DQ"),
        ("sq", "SQ"),
        ("foreground_dice", "Dice"),
        ("object_f1", "F1@0.5"),
    ),
    "binary": (
        ("foreground_dice", "Dice"),
        ("foreground_iou", "IoU"),
        ("pixel_error", "pixel error"),
        ("rand_error", "Rand error"),
    ),
    "classes": (
        ("mean_dice", "mean Dice"),
        ("mean_iou", "mean IoU"),
        ("pixel_accuracy", "accuracy"),
    ),
}


def remove_small_objects(instances: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects with fewer than ``min_size`` pixels to 0 (ids otherwise unchanged).

    >>> remove_small_objects(np.array([1, 1, 0, 2]), 2)
    array([1, 1, 0, 0])
    """
    if min_size <= 1 or instances.size == 0:
        return instances
    sizes = np.bincount(instances.ravel())
    small = sizes < min_size
    small[0] = False
    out = instances.copy()
    out[small[instances]] = 0
    return out


def labels_from_probabilities(
    probs: np.ndarray,
    kind: LabelKind,
    *,
    min_object_size: int = 0,
    seeded: InstanceSpec | None = None,
) -> np.ndarray:
    """Predicted label image of the truth's kind from (K, H, W) class probabilities;
    ``seeded``: the model's interior/boundary classes, for instances as ``run`` makes them."""
    classes = probs.argmax(0).astype(np.uint8)
    if kind == "classes":
        return classes
    if kind == "binary":
        return (classes == 1).astype(np.uint8)
    if seeded is not None:
        return seeded_instances(classes, seeded, min_area_px=min_object_size).astype(np.int32)
    instances = remove_small_objects(instances_from_binary(classes == 1), min_object_size)
    if probs.shape[0] >= 3:  # boundary class: give the boundary pixels back to their objects
        grown = expand_labels(instances, distance=2)
        instances = np.where((classes == 2) & (instances == 0), grown, instances)
    return instances


def weighted_loss_terms(
    probs: np.ndarray, target: np.ndarray, weights: np.ndarray
) -> tuple[float, float]:
    """``(sum(w * -log p_target), sum(w))`` for one image (probabilities clipped at 1e-7)."""
    p = np.take_along_axis(probs, target[None].astype(np.intp), axis=0)[0]
    ce = -np.log(np.clip(p, 1e-7, 1.0))
    return float(np.dot(weights.ravel().astype(np.float64), ce.ravel())), float(weights.sum())


def predict_at_mpp(
    image: np.ndarray, predictor: Any, image_mpp: float | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(K, H, W) probabilities on ``image``'s grid, predicted at the model's µm/px or
    downsample.

    Parameters
    ----------
    image : (H, W, C) uint8 ndarray
    predictor : :class:`tilesegment.infer.predict.Predictor`
    image_mpp : float, optional
        µm/px of ``image``; None (or within ``MPP_TOLERANCE`` of the model's, or a model
        without a µm/px) predicts the image as it is. A model with a ``downsample`` ``F``
        sees every image shrunk by ``F`` (a virtual µm/px of 1 resampled to ``F``, as
        :func:`tilesegment.infer.source.open_source` does), whatever ``image_mpp``.

    Returns
    -------
    (probabilities, shape)
        ``shape`` is the (h, w) the model saw.
    """
    from tilesegment.infer.predict import predict_image
    from tilesegment.io.resample import (
        MPP_TOLERANCE,
        resample_array,
        resample_probabilities,
        scale_and_shape,
        to_uint8,
    )

    model_mpp = predictor.spec.mpp
    if predictor.spec.downsample is not None:
        image_mpp, model_mpp = 1.0, predictor.spec.downsample
    if image_mpp is None or model_mpp is None or abs(image_mpp / model_mpp - 1) <= MPP_TOLERANCE:
        return predict_image(image, predictor), image.shape[:2]
    if image.ndim == 2:
        image = image[..., None]
    scale, shape = scale_and_shape(image.shape[:2], image_mpp, model_mpp)
    probs = predict_image(to_uint8(resample_array(image, shape, scale)), predictor)
    return resample_probabilities(probs, image.shape[:2], 1.0 / scale), shape


@dataclass(frozen=True, slots=True, eq=False)
class Example:
    """One scored image kept for a figure."""

    image: np.ndarray
    """(H, W, C) uint8 pixels as the model received them (before any resampling)."""
    truth: np.ndarray
    """(H, W) true labels (instances: object ids; classes: class ids; binary: 0/1)."""
    pred: np.ndarray
    """(H, W) predicted labels of the same kind, on the image's grid."""


@dataclass(slots=True)
class Report:
    """Metrics of one model on a list of images."""

    kind: str
    per_image: list[dict[str, Any]] = field(default_factory=list)
    """One dict per image: ``name``, ``shape`` (the image's (h, w)), ``predicted_shape`` (the
    (h, w) the model saw) and every metric of :func:`evaluate_pair`."""
    loss: float = math.nan
    """Weighted cross-entropy over all images (NaN when not computed)."""
    class_names: tuple[str, ...] = ()
    """The model's class names (per-class columns of the table)."""
    mpp: dict[str, float | None] = field(default_factory=dict)
    """``image`` and ``model`` µm/px (None when unknown)."""
    examples: dict[str, Example] = field(default_factory=dict, repr=False)
    """Image, truth and prediction by name, when kept for a figure."""
    instance_method: str | None = None
    """Instance labels only: what made the scored instances, ``"seeded"`` (the model's
    :class:`InstanceSpec`, as ``run`` makes them) or ``"components"`` (the components of class
    1, boundary pixels given back); None for the other kinds."""

    @property
    def headline(self) -> str:
        """The metric that ranks images (higher is better)."""
        return HEADLINE_METRIC[self.kind]

    @property
    def mean(self) -> dict[str, float]:
        """Mean of every scalar metric over the images (NaN values skipped); the per-class
        means are in :meth:`to_json`."""
        return {k: v for k, v in mean_scores(self.per_image).items() if not isinstance(v, list)}

    @property
    def pooled(self) -> dict[str, Any]:
        """Dataset-level scores (aggregated AJI and AJI+, pooled F1, pooled class IoU/Dice)."""
        return pooled_scores(self.per_image, self.kind)

    def ranked(self) -> list[dict[str, Any]]:
        """Per-image rows from worst to best by :attr:`headline` (NaN first, then by name)."""
        key = self.headline

        def order(row: dict[str, Any]) -> tuple[bool, float, str]:
            value = row.get(key)
            finite = value is not None and math.isfinite(value)
            return (finite, value if finite else 0.0, row["name"])

        return sorted(self.per_image, key=order)

    def to_json(self) -> dict[str, Any]:
        """Every number, JSON-safe (NaN as None); ``instances``: the :attr:`instance_method`,
        for instance labels only."""
        doc = {
            "kind": self.kind,
            "headline": self.headline,
            "class_names": list(self.class_names),
            "mpp": self.mpp,
            "loss": _finite_or_none(self.loss),
            "mean": _json_values(mean_scores(self.per_image)),
            "aggregate": _json_values(self.pooled),
            "images": [_json_values(row) for row in self.per_image],
        }
        if self.instance_method is not None:
            doc["instances"] = self.instance_method
        return doc

    def table(self) -> str:
        """A fixed-width text table: one row per image, the mean, and the pooled scores."""
        columns = _table_columns(self.kind, self.class_names)
        width = max([len("all (pooled)"), *(len(r["name"]) for r in self.per_image)])
        cell = max(8, *(len(h) for _, h in columns))
        head = f"{'image':<{width}}  " + "  ".join(f"{h:>{cell}}" for _, h in columns)
        rows = [*self.per_image, {"name": "mean", **mean_scores(self.per_image)}]
        rows.append({"name": "all (pooled)", **self.pooled})
        lines = [head, "-" * len(head)]
        for i, row in enumerate(rows):
            if i == len(self.per_image):
                lines.append("-" * len(head))
            cells = "  ".join(f"{_fmt(_column(row, c)):>{cell}}" for c, _ in columns)
            lines.append(f"{row['name']:<{width}}  {cells}")
        if math.isfinite(self.loss):
            lines.append(f"weighted cross-entropy: {self.loss:.4f}")
        return "\n".join(lines)


def _table_columns(kind: str, class_names: Sequence[str]) -> list[tuple[str, str]]:
    """(metric, header) of the table; masks get a Dice and an IoU column per class."""
    columns = list(TABLE_COLUMNS[kind])
    if kind == "instances":
        return columns
    per_class = [
        (f"{metric}_per_class[{i}]", f"{label} {name}")
        for metric, label in (("dice", "Dice"), ("iou", "IoU"))
        for i, name in enumerate(class_names)
    ]
    if kind == "binary" and len(class_names) == 2:
        # foreground Dice/IoU are the second class's; the per-class columns come first
        return per_class + columns[2:]
    return columns + per_class


def _column(row: dict[str, Any], column: str) -> Any:
    """``row[column]``, or element i of a list for ``key[i]``; None when absent."""
    if column.endswith("]"):
        key, index = column[:-1].split("[")
        values = row.get(key) or []
        return values[int(index)] if int(index) < len(values) else None
    return row.get(column)


def _fmt(value: Any) -> str:
    if value is None or not math.isfinite(value):
        return "-" if value is None else "nan"
    return f"{value:.4f}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_values(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as None, also inside lists (JSON has no NaN)."""
    return {
        k: [_finite_or_none(x) for x in v] if isinstance(v, list) else _finite_or_none(v)
        for k, v in row.items()
    }


def evaluate_items(
    items: Sequence[Any],
    predictor: Any,
    kind: LabelKind,
    *,
    min_object_size: int = 0,
    with_loss: bool = True,
    image_mpp: float | None = None,
    keep_examples: bool = False,
    seeded: bool = True,
) -> Report:
    """Whole-image prediction and metrics for prepared items.

    Parameters
    ----------
    items : sequence of :class:`tilesegment.train.data.TrainItem`
    predictor : :class:`tilesegment.infer.predict.Predictor`
    kind : {"binary", "classes", "instances"}
    min_object_size : int
        Instances only: predicted objects below this many px (at the model's µm/px or
        downsample; scaled by the area ratio onto the image's grid) are dropped.
    with_loss : bool
        Also compute the weighted cross-entropy (needs matching class counts).
    image_mpp : float, optional
        µm/px of the images: predicted at the model's µm/px, scored on the image's grid
        (:func:`predict_at_mpp`).
    keep_examples : bool
        Keep every image, truth and prediction in :attr:`Report.examples` (for a figure).
    seeded : bool
        Instances as the model declares (its :class:`InstanceSpec`, as ``run`` makes them);
        False: components of class 1 (boundary pixels given back), to compare.
    """
    spec = predictor.spec
    report = Report(kind=kind, class_names=tuple(spec.class_names))
    report.mpp = {"image": image_mpp, "model": spec.mpp}
    if spec.downsample is not None:  # predicted on images shrunk by it, scored on their grid
        report.mpp["downsample"] = spec.downsample
        min_object_size = round(min_object_size * spec.downsample**2)
    instance_spec = spec.instances if seeded else None
    if kind == "instances":
        report.instance_method = "components" if instance_spec is None else "seeded"
    num_classes = spec.unet.classes if kind == "classes" else None
    if image_mpp is not None and spec.mpp is not None:
        min_object_size = round(min_object_size * (spec.mpp / image_mpp) ** 2)
    loss_sum = weight_sum = 0.0
    for it in items:
        probs, seen = predict_at_mpp(it.image, predictor, image_mpp)
        pred = labels_from_probabilities(
            probs, kind, min_object_size=min_object_size, seeded=instance_spec
        )
        metrics = evaluate_pair(pred, it.truth, kind, num_classes=num_classes)
        metrics.pop("kind", None)
        shapes = {"shape": list(pred.shape), "predicted_shape": list(seen)}
        report.per_image.append({"name": it.name, **shapes, **metrics})
        if keep_examples:
            report.examples[it.name] = Example(it.image, it.truth, pred)
        if with_loss:
            s, w = weighted_loss_terms(probs, it.target, it.weights)
            loss_sum += s
            weight_sum += w
    if with_loss and weight_sum > 0:
        report.loss = loss_sum / weight_sum
    return report


def _select_pairs(
    images: Path | None,
    labels: Path | None,
    label_pattern: str | None,
    name_list: Path | None,
    names: Sequence[str] | None,
) -> list[Any]:
    """The image/label pairs to score: found, then narrowed to ``names`` or the ``--list``."""
    from tilesegment.errors import ConfigError
    from tilesegment.train import data as D

    pairs, (listed,) = D.load_data(
        images,
        labels,
        label_pattern=label_pattern,
        lists=(name_list,),
        only_listed=name_list is not None,
    )
    names = listed if names is None else names
    if names is None:
        return pairs
    wanted = set(names)
    unknown = sorted(wanted - {p.name for p in pairs})
    if unknown:
        raise ConfigError(f"--list: {len(unknown)} name(s) not in the data, e.g. {unknown[:3]}")
    return [p for p in pairs if p.name in wanted]


def evaluate_model(
    model: str | Path,
    images: Path | None,
    labels: Path | None = None,
    *,
    label_pattern: str | None = None,
    name_list: Path | None = None,
    label_kind: LabelKind | None = None,
    names: Sequence[str] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    min_object_size: int | None = None,
    image_mpp: float | None = None,
    keep_examples: bool = False,
    seeded: bool = True,
    tta: str = "none",
) -> tuple[Report, Any]:
    """Score the checkpoint ``model`` on image/label pairs (stacks or folders).

    Parameters
    ----------
    model : path
        Checkpoint ``NAME`` (``NAME.json`` + ``NAME.safetensors``).
    images, labels : Path or None
        As for :func:`tilesegment.train.data.load_pairs` (``labels`` None: the same tree).
    label_pattern : str, optional
        ``--label-pattern`` (``'{stem}_GT.png'``).
    name_list : Path, optional
        ``--list``: a file of names (only those pairs) or of ``image<TAB>label`` pairs (the
        data, without ``images``).
    label_kind : {"binary", "classes", "instances"}, optional
        Default: the kind the model was trained on (from its provenance), else detected.
    names : sequence of str, optional
        Only these pairs (stems, or ``stem:i`` slices).
    min_object_size : int, optional
        Default: the training run's value, else 10.
    image_mpp : float, optional
        µm/px of the images (``--mpp``); see :func:`predict_at_mpp`.
    keep_examples : bool
        Keep images and predictions for a figure (:attr:`Report.examples`).
    seeded : bool
        See :func:`evaluate_items`.
    tta : {"none", "flips", "d4"}
        Test-time augmentation of every whole-image prediction, as ``run --tta`` applies it
        (:data:`tilesegment.geometry.TTA_MODES`), so the scores are those of a run's output.

    Returns
    -------
    (Report, ModelSpec)
    """
    from tilesegment.errors import ConfigError
    from tilesegment.infer.predict import Predictor
    from tilesegment.model.checkpoint import load_checkpoint
    from tilesegment.train import data as D

    net, spec = load_checkpoint(model, device=device)
    if image_mpp is not None and spec.mpp is None:
        how = "" if spec.downsample is None else f" (it shrinks images by {spec.downsample:g})"
        raise ConfigError(
            f"--mpp {image_mpp}: model {spec.name!r} declares no µm/px{how}, so there is "
            "nothing to resample to; drop --mpp (or train the model with --mpp)"
        )
    trained = spec.training or {}
    config = trained.get("config") or {}
    pairs = _select_pairs(images, labels, label_pattern, name_list, names)
    kind = label_kind or trained.get("label_kind")
    kind = D.resolve_label_kind(pairs, kind)
    n = spec.unet.classes
    boundary = kind == "instances" and n == 3
    if kind != "classes" and n != 2 and not boundary:
        raise ConfigError(
            f"model {spec.name!r} has {n} classes; {kind} labels need a 2-class model "
            "(or 3 classes with a boundary class for instances)"
        )
    weights = D.WeightOptions(
        w0=float(config.get("w0", 10.0)), sigma=float(config.get("sigma", 5.0))
    )
    items = D.prepare_items(
        pairs,
        kind,
        num_classes=n,
        channels=spec.unet.in_channels,
        boundary_class=boundary,
        weights=weights,
        role="evaluation",
    )
    if not items:
        raise ConfigError(
            f"no image with foreground to evaluate in {labels or images or name_list}"
        )
    if min_object_size is None:
        min_object_size = int(config.get("min_object_size", 10))
    predictor = Predictor(
        net,
        spec,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        tta=tta,
    )
    report = evaluate_items(
        items,
        predictor,
        kind,
        min_object_size=min_object_size,
        image_mpp=image_mpp,
        keep_examples=keep_examples,
        seeded=seeded,
    )
    return report, spec
