"""Log-probabilities as the OpenAI API reports them: a token's and its top-N alternatives'.

Pure functions of a row (or rows) of logits. By default the logits are the model's own (raw), so
the values are the model's log-probabilities before any sampling transform (temperature, top-k,
top-p, min-p, penalties, logit bias): OpenAI's and vLLM's definition. Everything is computed in
float64 from the float32 logits (``logprob = x[id] - max - log(sum(exp(x - max)))``), as a
float64 log-softmax of them would give it.

Alternatives are ranked by logit, most likely first, lowest id first among equal logits (the
greedy token is always the first alternative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.support.numbers import check_int

__all__ = [
    "LOGPROBS_MODES",
    "MAX_TOP_LOGPROBS",
    "TokenLogprob",
    "check_top_logprobs",
    "mean_logprob",
    "prompt_logprobs",
    "token_logprob",
    "top_alternatives",
]

#: What reported log-probabilities are taken from: the model's own logits ("raw", the default and
#: OpenAI's definition) or the logits after logit_bias, penalties and temperature ("processed",
#: vLLM's processed_logprobs: before top-k/top-p/min-p truncation).
LOGPROBS_MODES = ("raw", "processed")
#: Most alternatives per position (vLLM's default --max-logprobs; OpenAI's chat top_logprobs limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the chosen (or given) token's log-probability and the ``top`` alternatives
    ``(token_id, logprob)``, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _rows(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise InvalidArgumentError(
            f"logits have shape {x.shape} and dtype {x.dtype}, expected (vocab,) or (positions, vocab) floats",
            fix="pass the float logits of one or more positions",
        )
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _max_and_lse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the max logit and ``log(sum(exp(x - max)))`` (float64); both must be finite."""
    m = x.max(axis=1)
    if not np.all(np.isfinite(m)):
        raise InvalidArgumentError(
            "logits have a NaN, +inf or all -inf row, expected finite logits",
            fix="check the model outputs: NaN/inf logits usually mean an overflow in fp16",
        )
    m64 = m.astype(np.float64)
    lse = np.empty(x.shape[0], dtype=np.float64)
    for i in range(x.shape[0]):  # one float64 row at a time: a (positions, vocab) float64 copy would be large
        shifted = x[i].astype(np.float64)
        shifted -= m64[i]
        np.exp(shifted, out=shifted)
        lse[i] = math.log(float(shifted.sum()))
    return m64, lse


def top_alternatives(row: np.ndarray, n: int) -> np.ndarray:
    """Ids of the ``n`` highest entries of ``row``: value descending, lowest id first among equals."""
    size = row.shape[0]
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n >= size:
        return np.lexsort((np.arange(size), -row.astype(np.float64)))
    part = np.argpartition(row, size - n)[size - n :]
    boundary = row[part].min()
    pool = np.flatnonzero(row >= boundary)  # every tie of the n-th value, ascending ids
    order = np.lexsort((pool, -row[pool].astype(np.float64)))
    return pool[order[:n]]


def _entry(x: np.ndarray, m: float, lse: float, token: int, n: int) -> TokenLogprob:
    def lp(i: int) -> float:
        return float(x[i]) - m - lse

    top = tuple((int(i), lp(int(i))) for i in top_alternatives(x, n))
    return TokenLogprob(int(token), lp(token), top)


def check_top_logprobs(value: object) -> int:
    """``value`` as an int in ``0..MAX_TOP_LOGPROBS``, or an :class:`InvalidArgumentError`."""
    return check_int(
        "top_logprobs",
        value,
        0,
        MAX_TOP_LOGPROBS,
        expected=f"an int from 0 to {MAX_TOP_LOGPROBS}",
        fix="pass e.g. top_logprobs=5",
    )


def _check_n(top_n: int) -> int:
    if isinstance(top_n, bool) or not isinstance(top_n, int | np.integer) or top_n < 0:
        raise InvalidArgumentError(f"top_n={top_n!r} is invalid: expected an int >= 0", fix="pass e.g. top_n=5")
    return int(top_n)


def _check_token(token: int, vocab: int) -> int:
    if isinstance(token, bool) or not isinstance(token, int | np.integer) or not 0 <= token < vocab:
        raise InvalidArgumentError(
            f"token id {token!r} is invalid: expected an int in [0, {vocab})", fix="pass ids of this vocabulary"
        )
    return int(token)


def token_logprob(logits: np.ndarray, token_id: int, top_n: int = 0) -> TokenLogprob:
    """The log-probability of ``token_id`` under ``softmax(logits)`` (one row) and the ``top_n``
    most likely alternatives."""
    x = _rows(logits)
    if x.shape[0] != 1:
        raise InvalidArgumentError(f"logits have shape {x.shape}, expected one row", fix="pass shape (vocab,)")
    m, lse = _max_and_lse(x)
    return _entry(x[0], float(m[0]), float(lse[0]), _check_token(token_id, x.shape[1]), _check_n(top_n))


def prompt_logprobs(logits: np.ndarray, next_ids: Sequence[int], top_n: int = 0) -> list[TokenLogprob]:
    """Teacher-forced log-probabilities: row ``i`` of ``logits`` (positions, vocab) scores ``next_ids[i]``.

    For echoed prompts, ``logits`` are the rows after prompt tokens ``0..T-2`` and ``next_ids`` the
    prompt tokens ``1..T-1``; the first prompt token has no log-probability (the API sends null).
    """
    x = _rows(logits)
    ids = list(next_ids)
    if len(ids) != x.shape[0]:
        raise InvalidArgumentError(
            f"{x.shape[0]} rows of logits for {len(ids)} tokens", fix="pass one row of logits per scored token"
        )
    n = _check_n(top_n)
    if not ids:
        return []
    m, lse = _max_and_lse(x)
    vocab = x.shape[1]
    return [_entry(x[i], float(m[i]), float(lse[i]), _check_token(t, vocab), n) for i, t in enumerate(ids)]


def mean_logprob(values: Sequence[float]) -> float:
    """The mean of ``values`` (``-inf`` for none): how ``best_of`` ranks candidates."""
    return math.fsum(values) / len(values) if values else -math.inf
