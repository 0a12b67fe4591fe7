"""Score a model on labelled images: whole-image predictions, labels from them, metrics.

Used by the training loop (validation every epoch) and by ``tilesegment evaluate``. Both read
data with :func:`tilesegment.train.data.load_pairs`, so ISBI stacks and folders both work.

From probabilities ``(K, H, W)`` to a label image comparable with the truth
(:func:`labels_from_probabilities`): the class map is the arg-max;

* ``binary``: foreground = class 1 (ISBI: cell interior); metrics of
  :func:`tilesegment.train.metrics.evaluate_pair` with kind ``"binary"`` (Rand error of the
  4-connected components, pixel error, foreground IoU/Dice);
* ``instances``: the 4-connected components of class 1, objects smaller than
  ``min_object_size`` px removed; with a boundary class (3 classes) the instances ``run``
  makes when the model declares them (``instances`` in its config: interior seeds grown into
  the nucleus region, :mod:`tilesegment.postprocess.seeded`), else the components of the
  interior class grown back over the boundary pixels by up to 2 px. Metrics: AJI, object
  F1, foreground Dice, Rand scores;
* ``classes``: the class map itself; pixel error, per-class and mean IoU/Dice.

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
from tilesegment.train.metrics import evaluate_pair

log = logging.getLogger(__name__)

#: The metric that picks the best checkpoint, per label kind, and whether lower is better.
SELECTION_METRIC: dict[str, tuple[str, bool]] = {
    "binary": ("rand_error", True),
    "instances": ("aji", False),
    "classes": ("mean_iou", False),
}

#: Metrics shown in tables and logs, per label kind (all of them go to JSON).
SUMMARY_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("rand_error", "pixel_error", "foreground_dice", "info_fscore"),
    "instances": ("aji", "object_f1", "foreground_dice", "rand_error"),
    "classes": ("pixel_error", "mean_iou", "mean_dice"),
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


@dataclass(slots=True)
class Report:
    """Metrics of one model on a list of images."""

    kind: str
    per_image: list[dict[str, Any]] = field(default_factory=list)
    """One dict per image: ``name`` and every metric of :func:`evaluate_pair`."""
    loss: float = math.nan
    """Weighted cross-entropy over all images (NaN when not computed)."""

    @property
    def mean(self) -> dict[str, float]:
        """Mean of every scalar metric over the images (NaN values skipped)."""
        out: dict[str, float] = {}
        if not self.per_image:
            return out
        for key, value in self.per_image[0].items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            values = np.array([row[key] for row in self.per_image], dtype=np.float64)
            out[key] = float(np.nanmean(values)) if np.any(np.isfinite(values)) else math.nan
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "loss": _finite_or_none(self.loss),
            "mean": {k: _finite_or_none(v) for k, v in self.mean.items()},
            "images": [
                {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in self.per_image
            ],
        }

    def table(self) -> str:
        """A fixed-width text table: one row per image and a mean row."""
        keys = SUMMARY_METRICS[self.kind]
        width = max([len("mean"), *(len(r["name"]) for r in self.per_image)])
        head = f"{'image':<{width}}  " + "  ".join(f"{k:>15}" for k in keys)
        lines = [head, "-" * len(head)]
        rows = [*self.per_image, {"name": "mean", **self.mean}]
        for i, row in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(head))
            cells = "  ".join(f"{_fmt(row.get(k)):>15}" for k in keys)
            lines.append(f"{row['name']:<{width}}  {cells}")
        if math.isfinite(self.loss):
            lines.append(f"weighted cross-entropy: {self.loss:.4f}")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_items(
    items: Sequence[Any],
    predictor: Any,
    kind: LabelKind,
    *,
    min_object_size: int = 0,
    with_loss: bool = True,
) -> Report:
    """Whole-image prediction and metrics for prepared items.

    Parameters
    ----------
    items : sequence of :class:`tilesegment.train.data.TrainItem`
    predictor : :class:`tilesegment.infer.predict.Predictor`
    kind : {"binary", "classes", "instances"}
    min_object_size : int
        Instances only: predicted objects below this many px are dropped.
    with_loss : bool
        Also compute the weighted cross-entropy (needs matching class counts).
    """
    from tilesegment.infer.predict import predict_image

    report = Report(kind=kind)
    loss_sum = weight_sum = 0.0
    for it in items:
        probs = predict_image(it.image, predictor)
        pred = labels_from_probabilities(
            probs, kind, min_object_size=min_object_size, seeded=predictor.spec.instances
        )
        metrics = evaluate_pair(pred, it.truth, kind)
        metrics.pop("kind", None)
        report.per_image.append({"name": it.name, **metrics})
        if with_loss:
            s, w = weighted_loss_terms(probs, it.target, it.weights)
            loss_sum += s
            weight_sum += w
    if with_loss and weight_sum > 0:
        report.loss = loss_sum / weight_sum
    return report


def evaluate_model(
    model: str | Path,
    images: Path,
    labels: Path,
    *,
    label_kind: LabelKind | None = None,
    names: Sequence[str] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    min_object_size: int | None = None,
) -> tuple[Report, Any]:
    """Score the checkpoint ``model`` on image/label pairs (stacks or folders).

    Parameters
    ----------
    model : path
        Checkpoint ``NAME`` (``NAME.json`` + ``NAME.safetensors``).
    images, labels : Path
        As for :func:`tilesegment.train.data.load_pairs`.
    label_kind : {"binary", "classes", "instances"}, optional
        Default: the kind the model was trained on (from its provenance), else detected.
    names : sequence of str, optional
        Only these pairs (stems, or ``stem:i`` slices).
    min_object_size : int, optional
        Default: the training run's value, else 10.

    Returns
    -------
    (Report, ModelSpec)
    """
    from tilesegment.errors import ConfigError
    from tilesegment.infer.predict import Predictor
    from tilesegment.model.checkpoint import load_checkpoint
    from tilesegment.train import data as D

    net, spec = load_checkpoint(model, device=device)
    trained = spec.training or {}
    config = trained.get("config") or {}
    pairs = D.load_pairs(images, labels)
    if names is not None:
        wanted = set(names)
        unknown = sorted(wanted - {p.name for p in pairs})
        if unknown:
            raise ConfigError(f"--list: {len(unknown)} name(s) not in the data, e.g. {unknown[:3]}")
        pairs = [p for p in pairs if p.name in wanted]
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
        raise ConfigError(f"no image with foreground to evaluate in {labels}")
    if min_object_size is None:
        min_object_size = int(config.get("min_object_size", 10))
    predictor = Predictor(net, spec, device=device, precision=precision)  # type: ignore[arg-type]
    report = evaluate_items(items, predictor, kind, min_object_size=min_object_size)
    return report, spec
