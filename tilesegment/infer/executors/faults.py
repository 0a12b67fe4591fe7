"""The test-only fault hook of the worker pool.

``TILESEGMENT_FAULT_INJECT="worker=0,after=3,mode=exit"`` (read only inside workers, never by
the parent or the in-process path) makes worker slot 0 fail after writing 3 chunks. Keys:
``worker`` (slot; default any), ``after`` (chunks written first; 0 = at the first tile),
``tile=ROW.COL`` (fail when that tile is about to be predicted, whatever the worker),
``mode`` = ``exit`` (``os._exit(86)``), ``kill`` (SIGKILL itself), ``raise``
(``RuntimeError``) or ``hang`` (sleep for good, sending nothing: a hung GPU), ``gen`` =
``first`` (default: only the first process of the slot, so the respawned worker succeeds) or
``all``; ``startup=SECONDS`` makes the worker sleep that long
before loading the model (a slow start-up, to test signals during it; no fault then unless
``after``, ``tile`` or ``mode`` is also given); ``at=start`` fails at start-up instead, once the
worker has asked the parent for its start-up arguments and before it reads them (a worker that
dies while its parent sends it the run); ``at=exit`` fails once the worker has said goodbye
(every chunk written and reported: a worker whose exit alone says something went wrong). It
exists to test fault tolerance and is not a feature.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from tilesegment.errors import ConfigError

log = logging.getLogger(__name__)

FAULT_ENV = "TILESEGMENT_FAULT_INJECT"


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """A parsed ``TILESEGMENT_FAULT_INJECT`` value (see the module docstring)."""

    worker: int | None = None
    after: int = 1
    tile: tuple[int, int] | None = None
    mode: str = "exit"
    every_generation: bool = False
    startup_s: float = 0.0
    at_start: bool = False
    """Fail before reading the start-up arguments (``at=start``), not at a tile or chunk."""
    at_exit: bool = False
    """Fail after the goodbye message (``at=exit``), not at a tile or chunk."""
    fails: bool = True
    """False when the spec only slows the start-up down."""

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        values: dict[str, Any] = {}
        try:
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, _, value = part.partition("=")
                if key == "worker":
                    values["worker"] = int(value)
                elif key == "after":
                    values["after"] = int(value)
                elif key == "tile":
                    row, col = value.split(".")
                    values["tile"] = (int(row), int(col))
                elif key == "mode" and value in ("exit", "kill", "raise", "hang"):
                    values["mode"] = value
                elif key == "gen" and value in ("first", "all"):
                    values["every_generation"] = value == "all"
                elif key == "startup":
                    values["startup_s"] = float(value)
                elif key == "at" and value in ("start", "exit"):
                    values[f"at_{value}"] = True
                else:
                    raise ValueError(part)
        except ValueError as exc:
            raise ConfigError(f"{FAULT_ENV}={text!r}: cannot parse {exc}") from exc
        fault = {"after", "tile", "mode", "at_start", "at_exit"}
        values["fails"] = bool(set(values) & fault) or "startup_s" not in values
        return cls(**values)


class FaultInjector:
    """Fires the configured fault in a worker; inert unless ``TILESEGMENT_FAULT_INJECT`` is set."""

    def __init__(self, spec: FaultSpec | None, slot: int, generation: int) -> None:
        self.spec = spec
        self.active = (
            spec is not None
            and spec.worker in (None, slot)
            and (spec.every_generation or generation == 0)
        )
        self._in_stream = self.active and spec.fails and not (spec.at_start or spec.at_exit)
        """Whether the fault fires at a tile or after chunks (not at start-up, not never)."""
        self._chunks = 0
        self._where = f"worker {slot} generation {generation}"

    @classmethod
    def from_env(cls, slot: int, generation: int) -> FaultInjector:
        text = os.environ.get(FAULT_ENV, "")
        return cls(FaultSpec.parse(text) if text else None, slot, generation)

    def starting(self) -> None:
        """Sleep for the configured start-up delay, if any."""
        if self.active and self.spec.startup_s > 0:
            log.warning("slowing the start-up of %s by %g s", self._where, self.spec.startup_s)
            time.sleep(self.spec.startup_s)

    def arguments_requested(self) -> None:
        """Fire an ``at=start`` fault: the worker has asked for its arguments, not read them."""
        if self.active and self.spec.at_start:
            self._fire("before reading its start-up arguments")

    def finished(self) -> None:
        """Fire an ``at=exit`` fault: the worker has reported every chunk and said goodbye."""
        if self.active and self.spec.at_exit:
            self._fire("after its goodbye")

    def tile_started(self, tile) -> None:
        if not self._in_stream:
            return
        if self.spec.tile == tile.index or (self.spec.tile is None and self.spec.after == 0):
            self._fire(f"at tile {tile.index}")

    def chunk_written(self) -> None:
        if not self._in_stream or self.spec.tile is not None:
            return
        self._chunks += 1
        if self._chunks == self.spec.after:
            self._fire(f"after {self._chunks} chunks")

    def _fire(self, when: str) -> None:
        log.warning("injecting a fault (%s) in %s %s", self.spec.mode, self._where, when)
        if self.spec.mode == "exit":
            os._exit(86)
        if self.spec.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.spec.mode == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected fault in {self._where} {when}")
