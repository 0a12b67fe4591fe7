"""Comparing instance labelings that come from slightly different class maps.

fp32 convolutions of different tile sizes round differently, so an argmax near a class tie
can flip (a few px in a million); instances far from such pixels must still be the very same
pixel sets, whatever their ids.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def instances_agree_away_from(
    ref: np.ndarray, got: np.ndarray, differ: np.ndarray, margin_px: int
) -> tuple[bool, int]:
    """Whether every instance farther than ``margin_px`` from a ``differ`` pixel is the same
    pixel set in ``ref`` and ``got`` (up to renumbering), and how many such instances there are.

    Parameters
    ----------
    ref, got : (H, W) integer ndarray
        Instance ids, 0 for background.
    differ : (H, W) bool ndarray
        Pixels where the class maps the labelings were made from differ.
    margin_px : int
        How far a differing pixel can change instances (the instance method's halo).

    Returns
    -------
    (agree, matched)
        ``agree``: the instances that touch no pixel within ``margin_px`` of ``differ`` (in
        either labeling) pair one to one, with equal areas; ``matched``: how many pairs.
    """
    near = ndimage.binary_dilation(differ, iterations=margin_px) if differ.any() else differ
    touched = np.unique(np.concatenate([ref[near], got[near]]))
    keep = ~np.isin(ref, touched) & (ref > 0)
    pairs = np.unique(np.stack([ref[keep], got[keep]]), axis=1)
    one_to_one = len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    # Every kept pixel of a ref instance lies in its partner; equal areas make them equal sets.
    areas = np.bincount(ref.ravel())[pairs[0]], np.bincount(got.ravel())[pairs[1]]
    return bool(one_to_one and np.array_equal(*areas)), int(pairs.shape[1])
