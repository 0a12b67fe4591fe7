"""One-to-one pairing of true and predicted objects with the largest summed IoU (the maximal
unique pairing of AJI+, Graham et al. 2019), on the sparse table of overlapping pairs.

Only objects that overlap can be paired, so the assignment problem splits into the connected
groups of the overlap graph (true and predicted objects as nodes, overlapping pairs as edges).
In a nucleus map almost every group is one pair, taken as it is; a larger group (a merge, a
split) is solved by ``scipy.optimize.linear_sum_assignment`` on its small dense IoU matrix.
No dense (objects x objects) matrix of the whole image is built.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["max_iou_pairing"]


def _groups(pair_true: np.ndarray, pair_pred: np.ndarray) -> list[np.ndarray]:
    """Pair indices of each connected group of the overlap graph."""
    true_nodes, t_index = np.unique(pair_true, return_inverse=True)
    pred_nodes, p_index = np.unique(pair_pred, return_inverse=True)
    size = true_nodes.size + pred_nodes.size
    edges = coo_matrix(
        (np.ones(pair_true.size), (t_index, true_nodes.size + p_index)), shape=(size, size)
    )
    _, component = connected_components(edges, directed=False)
    group = component[t_index]
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(group[order][1:] != group[order][:-1]) + 1
    return np.split(order, starts)


def max_iou_pairing(
    pair_true: np.ndarray,
    pair_pred: np.ndarray,
    iou: np.ndarray,
    *,
    ranks: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Indices of the pairs in a one-to-one pairing with the largest summed IoU.

    Parameters
    ----------
    pair_true, pair_pred : (P,) int ndarray
        True and predicted id of each overlapping pair (each (true, pred) pair once).
    iou : (P,) float ndarray
        IoU of each pair, > 0.
    ranks : ((P,) int ndarray, (P,) int ndarray)
        A sort key of each pair's true and predicted object (the raster index of its first
        pixel): the rows and columns of a group's IoU matrix follow it, so among pairings of
        equal summed IoU the one ``linear_sum_assignment`` returns does not depend on the ids.

    Returns
    -------
    (M,) int64 ndarray
        Indices into the pair arrays, each true and each predicted id at most once.

    Examples
    --------
    One prediction over two true objects (IoU 0.6 and 0.3) and a second prediction that
    overlaps only the second one (IoU 0.25): pairing each true object with a different
    prediction sums 0.85, more than the 0.6 of the best pair alone.

    >>> max_iou_pairing(np.array([1, 2, 2]), np.array([5, 5, 6]), np.array([0.6, 0.3, 0.25]),
    ...                 ranks=(np.array([0, 3, 3]), np.array([0, 0, 5]))).tolist()
    [0, 2]
    """
    if pair_true.size == 0:
        return np.zeros(0, dtype=np.int64)
    true_rank, pred_rank = ranks
    chosen = []
    for rows in _groups(pair_true, pair_pred):
        if rows.size == 1:
            chosen.append(rows)
            continue
        _, t_at = np.unique(true_rank[rows], return_inverse=True)
        _, p_at = np.unique(pred_rank[rows], return_inverse=True)
        shape = (int(t_at.max()) + 1, int(p_at.max()) + 1)
        matrix = np.zeros(shape)
        matrix[t_at, p_at] = iou[rows]
        pair_at = np.full(shape, -1, dtype=np.int64)
        pair_at[t_at, p_at] = rows
        picked = pair_at[linear_sum_assignment(matrix, maximize=True)]
        chosen.append(picked[picked >= 0])  # an assignment of IoU 0 is no pair
    return np.sort(np.concatenate(chosen)).astype(np.int64)
