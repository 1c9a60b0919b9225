"""What the CLI draws on stderr besides errors: progress lines (off with ``-q``)."""

from __future__ import annotations

import sys

import click


def progress(stage: str, done: int, total: int) -> None:
    """Progress on stderr (a single updating line when stderr is a terminal)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("quiet"):
        return
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    click.echo(f"\r  {stage}: {done}/{total}", err=True, nl=False)
    if end:
        click.echo("", err=True)
