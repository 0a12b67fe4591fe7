"""tilesegment: seamless valid-convolution U-Net segmentation of images too large for memory.

Importing the package changes nothing in the host program (no environment variables, no
logging setup); the command line and worker processes set what they need themselves
(:data:`tilesegment.infer.devices.WORKER_ENV`).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
