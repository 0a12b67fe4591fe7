"""``evaluate --figure``: where a model fails, as a grid of the worst and best images.

One row per image, four panels: the image, the ground truth, the prediction, and an error
overlay on the image in gray (true positives green, false positives magenta, false negatives
cyan; with several classes, pixels of the wrong class yellow; for instances whole objects,
matched or not at IoU 0.5 as the object F1 counts them, and unmatched objects that overlap
each other, merges and splits, yellow). The rows
are the ``n`` worst images by the report's headline metric (AJI for instances, Dice for
binary masks, mean Dice for classes), worst first, then the ``n`` best, best first; each row
is titled with its rank, the image name and the metrics. Instances are shown in distinct
colours (touching objects differ), classes in the model's colours.

Every panel is ``PANEL_PX`` square in the PNG (images are fitted inside, aspect kept), so the
file's size follows from the number of rows (:func:`figure_size_px`). Drawn with matplotlib's
object API on an Agg canvas (no pyplot state, no display needed); written to a temporary file
and renamed, so a failed run never leaves a partial PNG.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilesegment.errors import ConfigError
from tilesegment.train.evaluate import Example, Report

log = logging.getLogger(__name__)

__all__ = [
    "PANEL_PX",
    "check_figure_path",
    "error_overlay",
    "figure_size_px",
    "label_colours",
    "pick_rows",
    "write_figure",
]

#: Edge of one panel in the PNG (px).
PANEL_PX = 320
#: Height of a row's title band, and of the column header (px).
TITLE_PX = 28
#: Gap around panels (px).
GAP_PX = 8
_DPI = 100
_COLUMNS = ("image", "ground truth", "prediction", "errors")
#: The error column's header per label kind (its colours).
_ERROR_LEGEND = {
    "instances": "FP magenta, FN cyan, merge/split yellow",
    "binary": "errors: FP magenta, FN cyan, TP green",
    "classes": "FP magenta, FN cyan, wrong class yellow",
}

TP_RGB = (60, 200, 60)
FP_RGB = (255, 0, 255)
FN_RGB = (0, 230, 255)
#: Yellow: pixels of the wrong class (classes), or of a merge or split (instances).
MIXED_RGB = (255, 220, 0)
_METRIC_NAMES = {"aji": "AJI", "foreground_dice": "Dice", "mean_dice": "mean Dice"}
#: Further metrics in a row's title, per label kind (after the headline).
_TITLE_EXTRA = {
    "instances": (("pq", "PQ"), ("object_f1", "F1"), ("foreground_dice", "Dice")),
    "binary": (("foreground_iou", "IoU"),),
    "classes": (("mean_iou", "mean IoU"),),
}


def figure_size_px(rows: int) -> tuple[int, int]:
    """(width, height) in px of a grid with ``rows`` rows.

    >>> figure_size_px(8)
    (1320, 2876)
    """
    width = len(_COLUMNS) * (PANEL_PX + GAP_PX) + GAP_PX
    height = TITLE_PX + rows * (TITLE_PX + PANEL_PX + GAP_PX)
    return width, height


def label_colours(count: int) -> np.ndarray:
    """(count + 1, 3) uint8 colours for ids 0..count: 0 black, then hues spaced by the golden
    ratio (neighbouring ids differ strongly), bright and saturated.

    >>> label_colours(2)[0].tolist(), label_colours(2).shape
    ([0, 0, 0], (3, 3))
    """
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 1.0) for i, h in enumerate(hues)]
    table = np.zeros((count + 1, 3), dtype=np.uint8)
    if count:
        table[1:] = np.rint(np.array(rgb) * 255).astype(np.uint8)
    return table


def _label_rgb(labels: np.ndarray, kind: str, palette: np.ndarray | None) -> np.ndarray:
    """(H, W, 3) uint8 picture of a label image."""
    if kind == "binary":
        return np.repeat(((labels != 0) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    if kind == "classes" and palette is not None and int(labels.max(initial=0)) < len(palette):
        return palette[labels]
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids[0] != 0:  # no background: every id gets a colour
        inverse = inverse + 1
    return label_colours(len(ids))[inverse]


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 mean of the channels."""
    pixels = image.astype(np.float32)
    return pixels.mean(axis=-1) if pixels.ndim == 3 else pixels


def _paint(image: np.ndarray, layers: Sequence[tuple[np.ndarray, tuple[int, int, int], float]]):
    """The image in dimmed gray with each (mask, colour, opacity) layer blended on, in order."""
    base = np.repeat((0.6 * _gray(image))[..., None], 3, axis=-1)
    for mask, rgb, alpha in layers:
        base[mask] = (1 - alpha) * base[mask] + alpha * np.array(rgb, dtype=np.float32)
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def error_overlay(
    image: np.ndarray, truth: np.ndarray, pred: np.ndarray, *, kind: str = "binary"
) -> np.ndarray:
    """(H, W, 3) uint8: the image in dimmed gray with the errors coloured.

    Binary and classes (pixels): a false positive is predicted foreground (non-zero) on true
    background, a false negative true foreground predicted as background, a true positive
    foreground in both; for classes, foreground in both but of different classes is
    wrong-class. Instances (objects, as the object F1 at IoU 0.5 counts them): predicted
    objects matched to a true object are true positives; where an unmatched predicted object
    overlaps an unmatched true object (a merge, a split, a poor outline) the pixels are
    yellow; the rest of the unmatched predicted objects are false positives and of the
    unmatched true objects false negatives.

    >>> out = error_overlay(np.zeros((1, 3, 3), np.uint8), np.array([[1, 0, 1]]),
    ...                     np.array([[1, 1, 0]]))
    >>> out[0, 1].tolist() == list(FP_RGB), out[0, 2].tolist() == list(FN_RGB)
    (True, True)
    """
    from tilesegment.train.metrics import matched_objects

    t, p = truth != 0, pred != 0
    if kind == "instances":
        pred_matched, true_matched = matched_objects(pred, truth)
        fp, fn = p & ~pred_matched, t & ~true_matched
        return _paint(
            image,
            [
                (pred_matched, TP_RGB, 0.5),
                (fp & ~fn, FP_RGB, 1.0),
                (fn & ~fp, FN_RGB, 1.0),
                (fp & fn, MIXED_RGB, 1.0),
            ],
        )
    both = t & p
    wrong = both & (truth != pred) if kind == "classes" else np.zeros_like(both)
    return _paint(
        image,
        [
            (both & ~wrong, TP_RGB, 0.5),
            (p & ~t, FP_RGB, 1.0),
            (t & ~p, FN_RGB, 1.0),
            (wrong, MIXED_RGB, 1.0),
        ],
    )


def pick_rows(report: Report, n: int) -> list[tuple[str, dict[str, Any]]]:
    """(row title prefix, per-image row): the ``n`` worst (worst first), then the ``n`` best
    (best first); every image once when there are at most ``2 n``."""
    ranked = report.ranked()
    if len(ranked) <= 2 * n:
        return [(f"{i + 1}/{len(ranked)}", row) for i, row in enumerate(ranked)]
    worst = [(f"worst {i + 1}", row) for i, row in enumerate(ranked[:n])]
    best = [(f"best {i + 1}", row) for i, row in enumerate(reversed(ranked[-n:]))]
    return worst + best


def _shown(value: Any) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _row_title(prefix: str, row: dict[str, Any], kind: str, metric: str) -> str:
    extra = ", ".join(f"{label} {_shown(row.get(key))}" for key, label in _TITLE_EXTRA[kind])
    headline = f"{_METRIC_NAMES.get(metric, metric)} {_shown(row.get(metric))}"
    return f"{prefix}: {row['name']}    {headline}    ({extra})"


def _panels(example: Example, kind: str, palette: np.ndarray | None) -> list[np.ndarray]:
    image = example.image
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    truth, pred = example.truth, example.pred
    overlay = error_overlay(image, truth, pred, kind=kind)
    return [image, _label_rgb(truth, kind, palette), _label_rgb(pred, kind, palette), overlay]


def write_figure(
    report: Report,
    path: Path,
    *,
    n: int = 4,
    colours: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Draw the worst/best grid of ``report`` (which must hold its examples) into a PNG.

    Parameters
    ----------
    report : Report
        From :func:`~tilesegment.train.evaluate.evaluate_model` with ``keep_examples=True``.
    path : Path
        The PNG to write (replaced atomically).
    n : int
        Rows of worst and of best images.
    colours : sequence of RGB(A), optional
        Class colours of the model (classes kind; background drawn black).

    Returns
    -------
    list of str
        The image names, one per row, top to bottom.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if n < 1:
        raise ConfigError(f"--figure-n ({n}) must be >= 1")
    rows = pick_rows(report, n)
    missing = [row["name"] for _, row in rows if row["name"] not in report.examples]
    if not rows or missing:
        raise ConfigError(f"no images to draw in {path.name} (missing: {missing[:3]})")
    palette = _palette(colours)
    width, height = figure_size_px(len(rows))
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    for c, name in enumerate((*_COLUMNS[:-1], _ERROR_LEGEND[report.kind])):
        x = (GAP_PX + c * (PANEL_PX + GAP_PX) + PANEL_PX / 2) / width
        fig.text(x, 1 - TITLE_PX / 2 / height, name, ha="center", va="center", fontsize=11)
    for r, (prefix, row) in enumerate(rows):
        top = TITLE_PX + r * (TITLE_PX + PANEL_PX + GAP_PX)
        title = _row_title(prefix, row, report.kind, report.headline)
        fig.text(GAP_PX / width, 1 - (top + TITLE_PX * 0.55) / height, title, fontsize=12,
                 va="center", fontweight="bold")  # fmt: skip
        example = report.examples[row["name"]]
        for c, panel in enumerate(_panels(example, report.kind, palette)):
            left = (GAP_PX + c * (PANEL_PX + GAP_PX)) / width
            bottom = 1 - (top + TITLE_PX + PANEL_PX) / height
            ax = fig.add_axes((left, bottom, PANEL_PX / width, PANEL_PX / height))
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="antialiased")
            ax.set_axis_off()
    _save(fig, path)
    return [row["name"] for _, row in rows]


def _palette(colours: Sequence[Sequence[int]] | None) -> np.ndarray | None:
    if not colours:
        return None
    table = np.array([list(c)[:3] for c in colours], dtype=np.uint8)
    table[0] = 0
    return table


def check_figure_path(path: Path) -> None:
    """Refuse a figure path that cannot be written (ConfigError naming it and the fix)."""
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--figure {path}: the figure is a PNG; name it with .png")
    if not path.parent.is_dir():
        raise ConfigError(f"--figure {path}: folder {path.parent} does not exist; create it")


def _save(fig: Any, path: Path) -> None:
    path = Path(path)
    check_figure_path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=_DPI, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
