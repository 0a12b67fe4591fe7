"""tilesegment: seamless valid-convolution U-Net segmentation of images too large for memory."""

from __future__ import annotations

import os

__version__ = "0.1.0"

# torch's CPU build parallelises with OpenMP, whose threads spin at every barrier by default.
# When any other thread wants a core (our tile readers, a second worker, a neighbour on a shared
# node) the spinning turns into 10-20x slowdowns of small convolutions (measured: a 252 px tile
# 0.008 s passive vs 0.13 s active on 2 busy cores). Passive waiting costs nothing measurable
# on an idle machine. It only takes effect if set before torch is first imported; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["__version__"]
