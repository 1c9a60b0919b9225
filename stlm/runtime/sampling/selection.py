"""Choosing the next token from one row of logits: logits processors and the fast sampler.

Everything here is a pure function of its arguments; randomness comes only from an explicit
``numpy.random.Generator`` (see :func:`make_rng`).

Order of operations in :func:`sample_token` (the transformers order):

1. repetition penalty on the raw logits (:func:`apply_repetition_penalty`);
2. ``temperature == 0``: greedy — the argmax, lowest id on ties; stop here;
3. temperature (:func:`apply_temperature`);
4. top-k (:func:`top_k_mask`): exactly ``k`` tokens; at the boundary, equal logits are kept
   lowest id first, so ``top_k=1`` picks the greedy token;
5. top-p (:func:`top_p_mask`) on the distribution renormalised over the top-k survivors: the
   smallest set of most probable tokens (lowest id first among equals) whose mass reaches
   ``top_p``;
6. min-p (:func:`min_p_mask`): keep tokens with ``p >= min_p * p_max``;
7. draw from the survivors, renormalised.

Log-probabilities: for a sampled token, the log-probability under that final renormalised
distribution (the one actually drawn from); for greedy, the log-softmax of the penalised logits
(temperature 1, no truncation), i.e. the model's own confidence after the penalty.

Cost (vocab 50304): the vocabulary's ids are never sorted; top-k and top-p select candidates
with a prefilter / ``argpartition`` and stay exact (:func:`_ranked_top`, :func:`_nucleus`);
only top-p without top-k takes a float64 copy (its exact normaliser); plain sampling draws by
a two-level inverse CDF (:func:`_draw_full`). Cumulative masses within 1e-9 (relative) of
``top_p`` count as reaching it, so exact ties with the boundary do not depend on rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.runtime.processors import check_logits
from stlm.runtime.sampling.params import SamplingParams, checked

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "log_softmax",
    "min_p_mask",
    "sample_token",
    "top_k_mask",
    "top_p_mask",
]

# Candidates top-p without top-k ranks before falling back to sorting the whole vocabulary.
_TOP_P_FIRST = 64
# A cumulative mass within this relative distance of top_p counts as reaching it, so that exact
# ties with the boundary (10 equal tokens, top_p=0.3 -> 3 tokens) do not depend on rounding.
_TOP_P_RTOL = 1e-9
# Stride of the sample that sets the top-k prefilter threshold.
_STRIDE = 16
# Block size of the two-level (block sums, then one block) cumulative sums.
_BLOCK = 512
# min-p preselects with a threshold this much looser (in log space) than the exact float64 test.
_MIN_P_SLACK = 1e-3
# 1/temperature is clamped to [1/_INV_T_LIMIT, _INV_T_LIMIT]: beyond it float32 products overflow
# (0 * inf = NaN). A temperature below 1e-30 samples like 1e-30 (the top logit; equal top logits
# drawn at random), one above 1e30 like 1e30 (uniform over every finite logit).
_INV_T_LIMIT = 1e30
# Penalised logits are clipped to the finite float32 range, so no penalty makes them inf.
_F32_MAX = float(np.finfo(np.float32).max)


def _finite_max(x: np.ndarray) -> float:
    m = float(x.max())  # NaN propagates through max
    if not math.isfinite(m):
        raise InvalidArgumentError(
            f"logits have maximum {m} (NaN, +inf, or every entry -inf), expected finite logits",
            fix="check the model outputs: NaN/inf logits usually mean an overflow in fp16",
        )
    return m


def _check_previous(previous_ids: Any, vocab: int) -> np.ndarray:
    ids = np.asarray(previous_ids)
    if ids.size == 0:
        return ids.reshape(0).astype(np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(
            f"previous_ids have shape {ids.shape} and dtype {ids.dtype}, expected a 1-D integer array",
            fix="pass the prompt + generated ids as one 1-D int array",
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InvalidArgumentError(
            f"previous_ids contain the id {lo if lo < 0 else hi}, expected ids in [0, {vocab})",
            fix="pass token ids of this model's vocabulary",
        )
    return ids


def apply_repetition_penalty(
    logits: np.ndarray, previous_ids: np.ndarray | Sequence[int] | None, penalty: float
) -> np.ndarray:
    """The CTRL / transformers repetition penalty (the input array is never modified).

    For every distinct id in ``previous_ids`` (prompt and generated tokens): ``logit / penalty``
    if the logit is > 0, else ``logit * penalty``; penalised once however often the id occurs.
    """
    x = check_logits(logits)
    penalty = checked("repetition_penalty", penalty)
    if previous_ids is None or penalty == 1.0:
        return x
    ids = _check_previous(previous_ids, x.shape[0])
    if ids.size == 0:
        return x
    out = x.copy()
    seen = x[ids].astype(np.float64)  # duplicates read the original value, so repeats are penalised once
    # float64 with the float32-rounded penalty gives the float32 result exactly (as transformers);
    # a penalty float32 cannot hold (beyond ~1e±38) is used as is, and the result clipped
    with np.errstate(over="ignore", under="ignore"):
        p32 = float(np.float32(penalty))
        p = p32 if 0.0 < p32 < math.inf else penalty
        penalised = np.where(seen > 0, seen / p, seen * p)
    finite = np.isfinite(seen)
    out[ids] = np.where(finite, np.clip(penalised, -_F32_MAX, _F32_MAX), penalised)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` (temperature > 0; greedy is handled by :func:`sample_token`)."""
    x = check_logits(logits)
    t = checked("temperature", temperature)
    if t == 0.0:
        raise InvalidArgumentError(
            "temperature=0 is invalid here: expected a float > 0",
            fix="greedy decoding (temperature=0) needs no scaling",
        )
    return x if t == 1.0 else x / np.float32(t)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities (float32) of ``logits``; the normaliser is accumulated in float64."""
    x = check_logits(logits)
    m = _finite_max(x)
    shifted = x - np.float32(m)
    lse = math.log(float(np.exp(shifted).sum(dtype=np.float64)))
    shifted -= np.float32(lse)
    return shifted


def _prefilter(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending ids holding the ``k`` largest entries of ``x`` and every tie of the k-th.

    A threshold taken from a strided sample usually leaves a few dozen ids above ``k`` (one
    cheap comparison pass instead of a partition of the whole vocabulary). The result is exact
    whatever the data: with at least ``k`` entries ``>= t``, the k-th largest value is ``>= t``;
    when the sample misleads, every id is returned.
    """
    n = x.shape[0]
    j = k // _STRIDE + 4
    if n < 4 * _STRIDE * j:
        return np.arange(n)
    sample = x[::_STRIDE]
    t = np.partition(sample, sample.shape[0] - j)[sample.shape[0] - j]
    ids = np.flatnonzero(x >= t)
    return ids if ids.shape[0] >= k else np.arange(n)


def _ranked_top(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest entries of ``x``, ordered by value desc then id asc (exact)."""
    pool = _prefilter(x, k)  # callers guarantee 0 < k < len(x)
    y = x[pool]  # ``pool`` is ascending, so lower positions in ``y`` are lower ids
    part = np.argpartition(y, y.shape[0] - k)[y.shape[0] - k :]
    vals = y[part]
    v = vals.min()
    if int(np.count_nonzero(vals == v)) < int(np.count_nonzero(y == v)):
        # more entries equal the boundary value than fit: keep the lowest ids among them
        above = part[vals > v]
        part = np.concatenate([above, np.flatnonzero(y == v)[: k - above.shape[0]]])
        vals = y[part]
    return pool[part[np.lexsort((part, -vals))]]


def _mask_from(ids: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[ids] = True
    return mask


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask of the ``k`` highest logits (``k=0`` or ``k >= vocab``: all).

    Exactly ``min(k, vocab)`` entries are kept; among equal logits at the boundary the lowest
    ids are kept, so ``k=1`` keeps the greedy token.
    """
    x = check_logits(logits)
    k = checked("top_k", k)
    n = x.shape[0]
    if k == 0 or k >= n:
        return np.ones(n, dtype=bool)
    _finite_max(x)
    return _mask_from(_ranked_top(x, k), n)


def _nucleus(x: np.ndarray, m: float, inv_t: float, top_p: float) -> np.ndarray:
    """Ids of the nucleus of ``softmax(x * inv_t)`` (``m`` is the max of ``x``).

    Where the nucleus ends depends only on the cumulative mass of the sorted *values*, which is
    the same however ties are ordered, so no ids are sorted: first the values of the top
    ``_TOP_P_FIRST`` candidates are tried, and only if their mass falls short all values are
    sorted (then the cut is found with block sums). Probabilities are float64, as in the
    definition. With ``v`` the value where the mass reaches ``top_p`` and ``c`` the nucleus size, the
    nucleus is every id above ``v`` plus the lowest ids equal to ``v``, ``c`` ids in all.
    """
    n = x.shape[0]
    w = x.astype(np.float64)
    w -= m
    w *= inv_t
    np.exp(w, out=w)
    target = top_p * float(w.sum()) * (1.0 - _TOP_P_RTOL)
    cut = n
    if _TOP_P_FIRST < n:
        y = x[_prefilter(x, _TOP_P_FIRST)]
        vals = np.sort(np.partition(y, y.shape[0] - _TOP_P_FIRST)[-_TOP_P_FIRST:])[::-1]
        q = np.exp((vals.astype(np.float64) - m) * inv_t)
        cut = int(np.searchsorted(np.cumsum(q), target, side="left"))
    if cut >= min(_TOP_P_FIRST, n):
        vals = np.sort(x)[::-1]
        cut = _cumsum_reaches(np.exp((vals.astype(np.float64) - m) * inv_t), target)
    v = vals[cut]
    above = np.flatnonzero(x > v)
    return np.concatenate([above, np.flatnonzero(x == v)[: cut + 1 - above.shape[0]]])


def _block_sums(w: np.ndarray, block: int) -> np.ndarray:
    """float64 sums of consecutive ``block``-entry slices of ``w`` (pairwise inside a block)."""
    n = w.shape[0]
    full = n - n % block
    sums = w[:full].reshape(-1, block).sum(axis=1).astype(np.float64)
    return np.append(sums, float(w[full:].sum())) if full < n else sums


def _cumsum_reaches(w: np.ndarray, target: float, block: int = _BLOCK) -> int:
    """First index where ``cumsum(w)`` (float64) reaches ``target``; the last w > 0 if never."""
    sums = _block_sums(w, block)
    cum = np.cumsum(sums)
    b = int(np.searchsorted(cum, target, side="left"))
    if b >= sums.shape[0]:  # rounding kept the total just below the target: keep all p > 0
        return max(0, int(np.count_nonzero(w > 0)) - 1)  # ``w`` is sorted descending
    base = float(cum[b - 1]) if b else 0.0
    inside = np.cumsum(w[b * block : (b + 1) * block], dtype=np.float64) + base
    return b * block + min(int(np.searchsorted(inside, target, side="left")), inside.shape[0] - 1)


def top_p_mask(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean keep-mask of the nucleus of ``softmax(logits)``.

    Keeps the smallest set of highest-probability tokens (lowest id first among equal
    probabilities) whose cumulative probability is >= ``top_p``; always at least one token;
    ``top_p=1`` keeps everything.
    """
    x = check_logits(logits)
    p = checked("top_p", top_p)
    if p == 1.0:
        return np.ones(x.shape[0], dtype=bool)
    return _mask_from(_nucleus(x, _finite_max(x), 1.0, p), x.shape[0])


def min_p_mask(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Boolean keep-mask of tokens with ``softmax(logits) >= min_p * max(softmax(logits))``.

    The ratio ``p / p_max = exp(logit - max_logit)`` is evaluated in float64.
    """
    x = check_logits(logits)
    mp = checked("min_p", min_p)
    if mp == 0.0:
        return np.ones(x.shape[0], dtype=bool)
    return _mask_from(_min_p_candidates(x, _finite_max(x), 1.0, mp), x.shape[0])


def _min_p_candidates(x: np.ndarray, m: float, inv_t: float, min_p: float) -> np.ndarray:
    """Ids (ascending) with ``exp((x - m) * inv_t) >= min_p``, exact in float64."""
    loose = m + (math.log(min_p) - _MIN_P_SLACK) / inv_t
    threshold = np.float32(loose)
    if float(threshold) > loose:  # rounded up: could drop a candidate the float64 test keeps
        with np.errstate(over="ignore"):  # below -FLT_MAX it becomes -inf: every id is a candidate
            threshold = np.nextafter(threshold, np.float32(-np.inf))
    ids = np.flatnonzero(x >= threshold)
    ratio = np.exp((x[ids].astype(np.float64) - m) * inv_t)
    return ids[ratio >= min_p]


def _draw(weights: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
    """Index drawn with probability ``weights / weights.sum()`` (float64), and that probability."""
    cdf = np.cumsum(weights)
    total = float(cdf[-1])
    i = int(np.searchsorted(cdf, rng.random() * total, side="right"))
    i = min(i, weights.shape[0] - 1)
    while weights[i] <= 0:  # never land on a zero-weight entry (only reachable via rounding)
        i -= 1
    return i, float(weights[i]) / total


def _draw_full(x: np.ndarray, m: float, inv_t: float, rng: np.random.Generator) -> tuple[int, float]:
    """Draw from ``softmax(x * inv_t)`` over the whole vocabulary; return (id, logprob).

    No float64 copy of the vocabulary: a two-level inverse CDF over the sums of 512-entry
    blocks, then a float64 cumsum inside the chosen block only.
    """
    w = x - np.float32(m)
    if inv_t != 1.0:
        with np.errstate(over="ignore"):  # -> -inf, whose exp is the 0 it stands for
            w *= np.float32(inv_t)
    np.exp(w, out=w)
    sums = _block_sums(w, _BLOCK)
    block, _ = _draw(sums, rng)
    lo = block * _BLOCK
    i, p_in_block = _draw(w[lo : lo + _BLOCK].astype(np.float64), rng)
    return lo + i, math.log(p_in_block * float(sums[block]) / float(sums.sum()))


def sample_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    previous_ids: np.ndarray | None = None,
) -> tuple[int, float]:
    """Pick the next token from one row of logits; return ``(token_id, logprob)``.

    ``logits`` has shape ``(vocab,)`` (float32 preferred; other floats are converted).
    ``previous_ids`` (prompt + generated ids) feed the repetition penalty. See the module
    docstring for the order of operations, tie rules and the meaning of ``logprob``.
    """
    x = check_logits(logits)
    if params.repetition_penalty != 1.0 and previous_ids is not None:
        x = apply_repetition_penalty(x, previous_ids, params.repetition_penalty)
    m = _finite_max(x)
    n = x.shape[0]

    if params.temperature == 0.0:
        token = int(np.argmax(x))  # first occurrence: lowest id on ties
        shifted = x - np.float32(m)
        np.exp(shifted, out=shifted)
        return token, -math.log(float(shifted.sum()))  # x[token] == m

    inv_t = min(max(1.0 / params.temperature, 1.0 / _INV_T_LIMIT), _INV_T_LIMIT)
    k = params.top_k if 0 < params.top_k < n else 0
    if k:
        order = _ranked_top(x, k)
    elif params.top_p < 1.0:
        order = _nucleus(x, m, inv_t, params.top_p)
    elif params.min_p > 0.0:
        order = _min_p_candidates(x, m, inv_t, params.min_p)
    else:
        return _draw_full(x, m, inv_t, rng)

    # q = p / p_max over the candidates; the argmax always survives, so max(q) == 1
    q = np.exp((x[order].astype(np.float64) - m) * inv_t)
    if k and params.top_p < 1.0:  # top-p on the distribution renormalised over the top-k
        target = params.top_p * float(q.sum()) * (1.0 - _TOP_P_RTOL)
        cut = int(np.searchsorted(np.cumsum(q), target, side="left"))
        order, q = order[: cut + 1], q[: cut + 1]  # ``order`` is ranked, so this is a prefix
    if params.min_p > 0.0:
        keep = q >= params.min_p
        order, q = order[keep], q[keep]
    i, p = _draw(q, rng)
    return int(order[i]), math.log(p)
