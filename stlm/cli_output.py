"""What the CLI draws on stderr besides errors: progress lines and notes, both off with ``-q``
(given before or after the command name; the state lives on the root context)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterable
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


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    sys.stdout = open(os.devnull, "w")


def run_guarding_stdout(command: Callable[[], object]) -> None:
    """Run ``command`` (the CLI); a write error on stdout (``> /dev/full``: ENOSPC, a closed pipe:
    EPIPE, EIO) ends it with ``error: …`` on stderr and exit status 2, never a traceback."""
    try:
        try:
            command()
        finally:
            sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        reason = exc.strerror or type(exc).__name__
        try:
            click.echo(f"error: could not write the output to stdout: {reason}", err=True)
            click.echo("  fix: write to a file or pipe that can take it (free disk space)", err=True)
        except OSError:
            pass
        sys.exit(2)


def read_prompt(prompt: str, context_length: int) -> str:
    """``--prompt``: the text, or stdin (bounded by the context length) for ``-``."""
    if prompt != "-":
        return prompt
    from stlm.runtime.text_limits import read_prompt_stream

    stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else io.BytesIO(sys.stdin.read().encode())
    return read_prompt_stream(stream, context_length)


def print_generation(pieces: Iterable[str], *, stream: bool) -> None:
    """The continuation on stdout: each piece as it comes with --stream, else all at the end, or what
    was generated when Ctrl-C stops it. A newline follows only on a terminal (piped stdout gets exactly
    the continuation)."""
    produced: list[str] = []
    try:
        for piece in pieces:
            if stream:
                click.echo(piece, nl=False)
            else:
                produced.append(piece)
    except KeyboardInterrupt:  # the text so far is not lost
        click.echo("".join(produced), nl=sys.stdout.isatty())
        raise
    click.echo("".join(produced), nl=sys.stdout.isatty())
