"""The host inputs of one step, per KV variant (pure functions of the feed and the cache state).

``concat`` (ONNX Runtime and TensorRT): one call; rows left-padded to the longest feed, the
attention mask extended by this step, positions from each row's length.

``inplace``: GroupQueryAttention without ``query_seqlens`` (which only onnxruntime ≥ 1.32 has)
accepts a batch > 1 only when every row brings one token, or when no row has a past (the first
prompt: right-padded, ``seqlens_k = count - 1``, ``total_sequence_length`` = the width). So a step
is planned as (:func:`plan_inplace_step`):

a. every fed row has one token, or every row's past is empty: one batched call. An idle row
   takes a dummy token written at slot ``length`` of its buffer (its length does not grow, so the
   slot is overwritten later; the buffers have one slot of slack for a full row);
b. otherwise: one batched one-token call for the rows that decode (the other rows idle in it, as
   in a), then one call per multi-token row with batch 1 over that row's slice of the buffers.

``logits_index`` asks each call for the last position of each row (``forward``) or for every
position (``forward_all``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.package.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS_INDEX,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)

#: Token fed to idle rows (its key/value land in a slot the row does not count).
DUMMY_TOKEN = 0


def check_feed(tokens: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """``tokens`` as one list of ints per cache row, or :class:`InvalidArgumentError`."""
    if len(tokens) != batch:
        raise InvalidArgumentError(
            f"{len(tokens)} token lists for a cache of {batch} rows",
            fix="pass one (possibly empty) token list per cache row",
        )
    return [[int(t) for t in row] for row in tokens]


def check_capacity(lengths: np.ndarray, counts: np.ndarray, capacity: int) -> None:
    """:class:`InvalidArgumentError` unless every row still fits ``capacity`` after this step."""
    after = int((lengths + counts).max(initial=0))
    if after > capacity:
        raise InvalidArgumentError(
            f"a row would hold {after} tokens; this cache holds {capacity}",
            fix="create the cache with a larger capacity",
        )


def ragged(rows: Sequence[Sequence[int]], *, right: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pad per-row token lists into (batch, longest) ids and a 0/1 validity mask."""
    width = max(max((len(r) for r in rows), default=0), 1)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        if row:
            cols = slice(0, len(row)) if right else slice(width - len(row), width)
            ids[b, cols] = row
            valid[b, cols] = 1
    return ids, valid


def logits_index(batch: int, width: int, last: np.ndarray | None) -> np.ndarray:
    """(batch, 1) ``last`` positions, or (batch, width) every position when ``last`` is None."""
    if last is None:
        return np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width)).copy()
    return np.asarray(last, dtype=np.int64).reshape(batch, 1)


def concat_step(
    tokens: Sequence[Sequence[int]], lengths: np.ndarray, mask: np.ndarray, *, every_position: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The host inputs of a concat step (left-padded) and each row's new-token count."""
    ids, valid = ragged(tokens, right=False)
    batch, width = ids.shape
    positions = np.maximum(lengths[:, None] + np.cumsum(valid, axis=1) - 1, 0)
    feeds = {
        INPUT_IDS: ids,
        ATTENTION_MASK: np.concatenate([mask, valid], axis=1),
        POSITION_IDS: positions,
        LOGITS_INDEX: logits_index(batch, width, None if every_position else np.full(batch, width - 1)),
    }
    return feeds, valid.sum(axis=1)


@dataclass(frozen=True)
class InplaceCall:
    """One GroupQueryAttention call over cache rows ``first_row .. first_row + batch - 1``.

    ``feeds``: its host inputs; ``results``: the cache rows whose tokens it really feeds (their
    logits come from this call, at local row ``row - first_row``).
    """

    first_row: int
    batch: int
    feeds: dict[str, np.ndarray]
    results: tuple[int, ...]


def _call(
    first_row: int, rows: Sequence[Sequence[int]], lengths: np.ndarray, results: Sequence[int], every_position: bool
) -> InplaceCall:
    """A call feeding ``rows`` (right-padded; an empty row gets the dummy token) after ``lengths``."""
    filled = [list(r) if r else [DUMMY_TOKEN] for r in rows]
    ids, _ = ragged(filled, right=True)
    counts = np.array([len(r) for r in filled], dtype=np.int64)
    seqlens_k = (lengths + counts - 1).astype(np.int32)
    first_prompt = not lengths.any()
    total = ids.shape[1] if first_prompt else int(seqlens_k.max()) + 1
    last = None if every_position else counts - 1
    feeds = {
        INPUT_IDS: ids,
        SEQLENS_K: seqlens_k,
        TOTAL_SEQUENCE_LENGTH: np.array(total, dtype=np.int32),
        LOGITS_INDEX: logits_index(len(rows), ids.shape[1], last),
    }
    if every_position:  # positions past a row's tokens repeat its last one (never read)
        feeds[LOGITS_INDEX] = np.minimum(feeds[LOGITS_INDEX], (counts - 1)[:, None])
    return InplaceCall(first_row, len(rows), feeds, tuple(results))


def plan_inplace_step(
    tokens: Sequence[Sequence[int]], lengths: np.ndarray, *, every_position: bool = False
) -> list[InplaceCall]:
    """The calls of one in-place step (see the module docstring); ``lengths`` before the step."""
    counts = [len(t) for t in tokens]
    fed = [r for r, c in enumerate(counts) if c]
    if all(c <= 1 for c in counts) or not lengths.any():
        return [_call(0, tokens, lengths, fed, every_position)]
    calls = []
    decoding = [r for r, c in enumerate(counts) if c == 1]
    if decoding:
        single = [t if len(t) == 1 else [] for t in tokens]
        calls.append(_call(0, single, lengths, decoding, every_position))
    for r, c in enumerate(counts):
        if c > 1:
            calls.append(_call(r, [tokens[r]], lengths[r : r + 1], [r], every_position))
    return calls
