"""The only place that turns tilesegment's errors into one-line messages and exit codes.

Exit codes: 0 success; 1 runtime failure (a worker or the store failed mid-run); 2 bad input or
usage (:class:`~tilesegment.errors.InputError`: unreadable slide, invalid tile size, missing
model, existing output without --overwrite; and click's usage errors); 130 / 143 after SIGINT /
SIGTERM. Every command uses :class:`Command` (and the group :class:`Group`), so a command
invoked on its own maps errors exactly as inside the ``tilesegment`` group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
