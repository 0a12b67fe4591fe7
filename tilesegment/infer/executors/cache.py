"""One predictor per process and checkpoint, for engines that run many small tasks in the same
long-lived process (dask workers, a notebook calling :func:`tilesegment.dask.segment`).

Tasks carry the checkpoint *path* (a short string), never a pickled module; the first task in a
process loads the weights (verifying their SHA-256), later tasks find them here. A
:class:`Predictor` is not thread-safe, so each cached entry has a lock: a dask worker with
several threads runs its forward passes one at a time on the one model copy (the forward pass
itself is multi-threaded by torch).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilesegment.infer.devices import resolve_precision, tune_malloc
from tilesegment.infer.predict import Predictor, make_predictor
from tilesegment.model.checkpoint import ModelSpec, checkpoint_paths, load_checkpoint
from tilesegment.model.registry import resolve_model


@dataclass
class CachedPredictor:
    """A predictor and the lock that serialises calls to it."""

    predictor: Predictor
    spec: ModelSpec
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.predictor(batch)


_CACHE: dict[tuple, CachedPredictor] = {}
_CACHE_LOCK = threading.Lock()
_LOADS = 0


def _weights_key(model: str | Path) -> tuple[str, int, int]:
    """Identity of the weights file on disk: a changed file is loaded again."""
    weights, _ = checkpoint_paths(model)
    st = os.stat(weights)
    return str(weights.resolve()), st.st_mtime_ns, st.st_size


def cached_predictor(
    model: str | Path,
    device: str = "cpu",
    precision: str = "auto",
    *,
    compile: bool = False,
    tta: str = "none",
) -> CachedPredictor:
    """The process's predictor for checkpoint ``model`` on ``device``, loaded on first use.

    ``model`` is a checkpoint path or a shipped model name; ``precision`` is resolved per
    device as in ``tilesegment run``; ``tta`` is the test-time augmentation (``--tta``).
    """
    global _LOADS
    path = resolve_model(model)
    resolved = resolve_precision(precision, device)
    key = (_weights_key(path), device, resolved, compile, tta)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            tune_malloc()  # once per process; undoes dask's malloc trimming (see the function)
            net, spec = load_checkpoint(path, device="cpu")
            predictor = make_predictor(net, spec, device, resolved, compile=compile, tta=tta)
            entry = CachedPredictor(predictor, spec)
            _CACHE[key] = entry
            _LOADS += 1
        return entry


def loads() -> int:
    """How many checkpoints this process has loaded through the cache (for tests)."""
    return _LOADS


def clear() -> None:
    """Forget every cached predictor (frees their memory once no task holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = ["CachedPredictor", "cached_predictor", "clear", "loads"]
