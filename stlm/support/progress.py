"""The progress callback long stages take: ``progress(stage, done, total)`` (the CLI draws it on stderr)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
