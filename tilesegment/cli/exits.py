"""The only place that turns tilesegment's errors into one-line messages and exit codes.

Exit codes (the README states the same contract):

* 0 success;
* 1 a failure during the run that running again can fix: a worker that kept failing, a full
  disk (free space, then ``--resume``);
* 2 bad input or usage (:class:`~tilesegment.errors.InputError` and click's usage errors), which
  running the same command again cannot fix: an unreadable slide (also when a tile turns out
  unreadable half-way through the run), an invalid option, a missing or broken model, an output
  that exists without --overwrite or cannot be written (read-only filesystem, a path under a
  regular file);
* 130 (SIGINT) or 143 (SIGTERM) interrupted; finished chunks are recorded: ``--resume``.

Every command uses :class:`Command` (and the group :class:`Group`), so a command invoked on its
own maps errors exactly as inside the ``tilesegment`` group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from tilesegment.errors import InputError, TilesegmentError


class BadInput(click.ClickException):
    """A one-line error about the user's input; exit code 2."""

    exit_code = 2


class RunFailed(click.ClickException):
    """A one-line error about a failure during a run; exit code 1."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line."""
    return " ".join(str(exc).split())


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """Turn tilesegment's errors raised inside the block into click exceptions."""
    try:
        yield
    except InputError as exc:
        raise BadInput(one_line(exc)) from exc
    except TilesegmentError as exc:
        raise RunFailed(one_line(exc)) from exc


@contextlib.contextmanager
def writing(destination: Path, *, then: str) -> Iterator[None]:
    """Turn a full or unwritable filesystem met while writing ``destination`` into one line.

    A full disk is a failure during the run (exit 1: "free space, then ``then``"); a read-only
    or forbidden destination is an input error (exit 2: "choose a writable folder"). Any other
    error passes through unchanged.
    """
    from tilesegment.store.destinations import write_failure

    try:
        yield
    except (TilesegmentError, OSError) as exc:
        failure = write_failure(exc, destination)
        if failure is None:
            raise
        kind, message = failure
        if kind == "no space":
            raise RunFailed(f"{message}; free space, then {then}") from exc
        raise BadInput(f"{message}; choose a writable folder") from exc


class Command(click.Command):
    """A click command whose tilesegment errors become one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        with exit_codes():
            return super().invoke(ctx)


class Group(click.Group):
    """A click group whose commands are :class:`Command` by default."""

    command_class = Command

    def invoke(self, ctx: click.Context) -> Any:
        with exit_codes():
            return super().invoke(ctx)


Group.group_class = Group
