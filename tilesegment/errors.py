"""The exception hierarchy of tilesegment.

Every error the package raises on purpose derives from :class:`TilesegmentError` and from the
built-in exception it specialises, so generic handlers (``except OSError``) keep working.
Only :mod:`tilesegment.cli` turns these into exit codes.
"""

from __future__ import annotations


class TilesegmentError(Exception):
    """Root of all errors raised by tilesegment."""


class ConfigError(TilesegmentError, ValueError):
    """An argument or configuration value is invalid (bad tile size, bad option combination)."""


class SlideReadError(TilesegmentError, OSError):
    """A slide or image cannot be opened or a region of it cannot be read."""


class ModelError(TilesegmentError, ValueError):
    """A model checkpoint is missing, malformed or incompatible with the input."""


class StoreError(TilesegmentError, OSError):
    """The output store cannot be created, written or resumed."""


class WorkerError(TilesegmentError, RuntimeError):
    """A device worker failed and its tiles could not be completed."""
