"""The forward calls of an engine step: a batched call whose failure is retried row by row, and
every fed position's logits (for prompts that are scored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stlm.runtime.backend import Backend

__all__ = ["by_row", "forward_all"]

log = logging.getLogger("stlm.runtime.engine")


def by_row(
    call: Callable[[list[list[int]]], Sequence[np.ndarray] | np.ndarray],
    feed: list[list[int]],
    rows: list[int],
) -> tuple[dict[int, np.ndarray], dict[int, Exception]]:
    """``call`` on the feeds of ``rows`` (the other rows idle): its output per row. If the batched
    call fails, each row is retried alone, so only the rows that fail alone are failed."""
    try:
        out = call([tokens if r in rows else [] for r, tokens in enumerate(feed)])
        return {row: out[row] for row in rows}, {}
    except Exception as exc:
        if len(rows) == 1:
            log.exception("forward failed for row %d", rows[0])
            return {}, {rows[0]: exc}
        log.warning(
            "a batched forward failed (%s: %s); retrying its %d rows one by one", type(exc).__name__, exc, len(rows)
        )
    done: dict[int, np.ndarray] = {}
    failures: dict[int, Exception] = {}
    for row in rows:
        try:
            done[row] = call([tokens if r == row else [] for r, tokens in enumerate(feed)])[row]
        except Exception as exc:
            log.exception("forward failed for row %d", row)
            failures[row] = exc
    return done, failures


def forward_all(backend: Backend[Any], cache: Any, feed: list[list[int]]) -> list[np.ndarray]:
    """The float32 logits of every fed position, (tokens, vocab) per row (``backend.forward_all``)."""
    return [np.asarray(x, dtype=np.float32) for x in backend.forward_all(cache, feed)]
