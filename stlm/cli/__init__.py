"""The ``stlm`` command (click): the top layer, the only one that may import every other."""

from stlm.cli.commands import cli, main

__all__ = ["cli", "main"]
