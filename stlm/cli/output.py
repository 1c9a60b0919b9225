"""What the CLI draws on stderr besides errors: progress lines and notes, both off with ``-q``
(given before or after the command name; the state lives on the root context)."""

from __future__ import annotations

import sys
from typing import Final

import click

VERBOSITY: Final = "stlm.verbosity"


def verbosity(ctx: click.Context) -> dict[str, bool]:
    """The ``{"verbose": ..., "quiet": ...}`` of this invocation (kept on the root context)."""
    state: dict[str, bool] = ctx.find_root().meta.setdefault(VERBOSITY, {"verbose": False, "quiet": False})
    return state


def quiet() -> bool:
    """Whether ``-q`` was given (before or after the command name)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and verbosity(ctx)["quiet"]


def note(message: str) -> None:
    """A line for the user on stderr (what a command is doing), unless ``-q``."""
    if not quiet():
        click.echo(message, err=True)


def progress(stage: str, done: int, total: int) -> None:
    """Progress on stderr (a single updating line when stderr is a terminal), unless ``-q``."""
    if quiet():
        return
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    click.echo(f"\r  {stage}: {done}/{total}", err=True, nl=False)
    if end:
        click.echo("", err=True)
