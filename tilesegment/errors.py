"""The exception hierarchy of tilesegment.

Every error the package raises on purpose derives from :class:`TilesegmentError` and from the
built-in exception it specialises, so generic handlers (``except OSError``) keep working.
:class:`InputError` marks the errors about what the caller passed in: retrying cannot help
(executors stop at once instead of retrying) and the command line exits with code 2. Only
:mod:`tilesegment.cli` turns errors into exit codes.
"""

from __future__ import annotations


class TilesegmentError(Exception):
    """Root of all errors raised by tilesegment."""


class InputError(TilesegmentError):
    """Bad input (a slide, a model, an option, an output path): exit code 2, never retried."""


class ConfigError(InputError, ValueError):
    """An argument or configuration value is invalid (bad tile size, bad option combination)."""


class SlideReadError(InputError, OSError):
    """A slide or image cannot be opened or a region of it cannot be read."""


class ModelError(InputError, ValueError):
    """A model checkpoint is missing, malformed or incompatible with the input."""


class StoreError(InputError, OSError):
    """The output store cannot be created, written or resumed."""


class WorkerError(TilesegmentError, RuntimeError):
    """A device worker failed and its tiles could not be completed."""
