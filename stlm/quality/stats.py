"""The numbers of ``stlm perplexity``: pure functions over logits (numpy only, float64 sums).

They follow llama.cpp's ``llama-perplexity``: perplexity is ``exp(mean NLL)`` with the standard
error ``PPL · sqrt(var(NLL) / (n - 1))``; a KL-divergence run also reports, against the base
model's logits, the mean KLD with its standard error, its percentiles, the mean and RMS of
``Δp = p(target) - p_base(target)``, the fraction of positions whose top token is the base's, and
``PPL - PPL_base`` with the error propagated through the covariance of the two NLL series.

The base's distribution is either complete (every logit) or its ``k`` largest log-probabilities
(:class:`BaseRows`); in the second case the tokens outside the base's top ``k`` are pooled into one
"rest" outcome on both sides, so the KLD is computed over ``k + 1`` outcomes. By the log-sum
inequality that is a lower bound of the full KLD, short of it by at most the divergence inside the
pooled tail (whose base mass :attr:`KldSummary.base_tail_mass` reports).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

#: The percentiles reported for KLD and Δp (llama-perplexity's set), as fractions.
PERCENTILES: Final = (0.999, 0.99, 0.95, 0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.01, 0.001)
_TINY: Final = 1e-30


@dataclass(frozen=True)
class Estimate:
    """A mean and its standard error."""

    value: float
    error: float


@dataclass(frozen=True)
class PositionScores:
    """Per scored position: the NLL of the target token, the top token, the log-sum-exp of the logits."""

    nll: np.ndarray  # (n,) float64
    top1: np.ndarray  # (n,) int64
    lse: np.ndarray  # (n,) float64


@dataclass(frozen=True)
class BaseRows:
    """The base model's log-probabilities at some positions: all of them (``ids`` None), or the
    ``k`` largest per position with their token ids."""

    logprobs: np.ndarray  # (n, vocab) or (n, k) float32
    ids: np.ndarray | None  # (n, k) int32, or None for the full vocabulary


def log_sum_exp(logits: np.ndarray) -> np.ndarray:
    """``log(sum(exp(logits)))`` over the last axis as float64 (exponentials in the logits' dtype, summed in float64)."""
    top = logits.max(axis=-1, keepdims=True)
    total = np.exp(logits - top).sum(axis=-1, dtype=np.float64)
    return np.asarray(top[..., 0].astype(np.float64) + np.log(total))


def score_positions(logits: np.ndarray, targets: np.ndarray) -> PositionScores:
    """NLL of ``targets[i]`` under ``logits[i]`` (n, vocab), the argmax and the log-sum-exp per row."""
    lse = log_sum_exp(logits)
    picked = np.take_along_axis(logits, np.asarray(targets, dtype=np.int64)[:, None], axis=1)[:, 0]
    return PositionScores(nll=lse - picked.astype(np.float64), top1=logits.argmax(axis=-1), lse=lse)


def base_rows(logits: np.ndarray, lse: np.ndarray, top_k: int) -> BaseRows:
    """The rows to keep of a base model's ``logits``: all log-probabilities (``top_k`` 0) or the ``top_k`` largest."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return BaseRows((logits - lse[:, None]).astype(np.float32), None)
    ids = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
    picked = np.take_along_axis(logits, ids, axis=-1)
    order = np.argsort(-picked, axis=-1, kind="stable")
    ids, picked = np.take_along_axis(ids, order, axis=-1), np.take_along_axis(picked, order, axis=-1)
    return BaseRows((picked - lse[:, None]).astype(np.float32), ids.astype(np.int32))


def kl_divergence(base: BaseRows, logits: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Per position ``KL(base || model)`` in nats, the model given by ``logits`` (n, vocab) and their log-sum-exp."""
    logp = base.logprobs.astype(np.float64)
    p = np.exp(logp)
    if base.ids is None:
        logq = logits.astype(np.float64) - lse[:, None]
        return np.asarray((p * (logp - logq)).sum(axis=-1))
    logq = np.take_along_axis(logits, base.ids.astype(np.int64), axis=-1).astype(np.float64) - lse[:, None]
    rest_p = np.maximum(1.0 - p.sum(axis=-1), 0.0)
    rest_q = np.maximum(1.0 - np.exp(logq).sum(axis=-1), _TINY)
    tail = np.where(rest_p > 0, rest_p * (np.log(np.maximum(rest_p, _TINY)) - np.log(rest_q)), 0.0)
    return np.asarray((p * (logp - logq)).sum(axis=-1) + tail)


def base_tail_mass(base: BaseRows) -> np.ndarray:
    """Per position, the base probability outside the kept rows (0 for full rows)."""
    if base.ids is None:
        return np.zeros(base.logprobs.shape[0])
    return np.asarray(np.maximum(1.0 - np.exp(base.logprobs.astype(np.float64)).sum(axis=-1), 0.0))


def mean_and_error(values: np.ndarray) -> Estimate:
    """Mean and standard error of the mean (llama-perplexity: 0 for fewer than 11 values)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 1:
        return Estimate(0.0, 0.0)
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return Estimate(mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def perplexity(nll: np.ndarray) -> Estimate:
    """``exp(mean NLL)`` and its standard error ``PPL · SE(mean NLL)``."""
    m = mean_and_error(nll)
    ppl = math.exp(m.value)
    return Estimate(ppl, ppl * m.error)


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of the two means (llama-perplexity: 0 for fewer than 10 values)."""
    n = a.size
    if n < 10:
        return 0.0
    return float(((a * b).mean() - a.mean() * b.mean()) / (n - 1))


def percentiles(values: np.ndarray) -> dict[str, float]:
    """Maximum, :data:`PERCENTILES` (linear interpolation, as llama-perplexity) and minimum."""
    x = np.asarray(values, dtype=np.float64)
    out = {"max": float(x.max())}
    out.update({f"p{100 * f:g}": float(np.percentile(x, 100 * f)) for f in PERCENTILES})
    out["min"] = float(x.min())
    return out


@dataclass(frozen=True)
class KldSummary:
    """The comparison of a model with the base on the same positions (see the module docstring)."""

    count: int
    ppl: Estimate
    base_ppl: Estimate
    ln_ppl_ratio: Estimate
    ppl_ratio: Estimate
    delta_ppl: Estimate
    nll_correlation: float
    mean_kld: Estimate
    kld: dict[str, float]
    mean_delta_p: Estimate
    delta_p: dict[str, float]
    rms_delta_p: Estimate
    same_top: Estimate
    base_tail_mass: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def summarize_kld(
    nll: np.ndarray, base_nll: np.ndarray, kld: np.ndarray, same_top: np.ndarray, tail_mass: np.ndarray
) -> KldSummary:
    """The :class:`KldSummary` of per-position NLLs (model and base), KLDs, top-1 matches and base tail masses."""
    nll, base_nll = np.asarray(nll, np.float64), np.asarray(base_nll, np.float64)
    n = nll.size
    ln_q, ln_b = mean_and_error(nll), mean_and_error(base_nll)
    ppl, base_ppl = perplexity(nll), perplexity(base_nll)
    cov = _covariance(nll, base_nll)
    ratio_err = math.sqrt(max(ln_q.error**2 + ln_b.error**2 - 2 * cov, 0.0))
    ln_ratio = Estimate(ln_q.value - ln_b.value, ratio_err)
    ppl_ratio = math.exp(ln_ratio.value)
    diff_err = math.sqrt(max(ppl.error**2 + base_ppl.error**2 - 2 * ppl.value * base_ppl.value * cov, 0.0))
    delta_p = np.exp(-nll) - np.exp(-base_nll)
    mse = mean_and_error(delta_p**2)
    rms = math.sqrt(mse.value)
    top = float(np.mean(same_top)) if n else 0.0
    return KldSummary(
        count=n,
        ppl=ppl,
        base_ppl=base_ppl,
        ln_ppl_ratio=ln_ratio,
        ppl_ratio=Estimate(ppl_ratio, ppl_ratio * ratio_err),
        delta_ppl=Estimate(ppl.value - base_ppl.value, diff_err),
        nll_correlation=cov / (ln_q.error * ln_b.error) if ln_q.error and ln_b.error else 1.0,
        mean_kld=mean_and_error(kld),
        kld=percentiles(kld),
        mean_delta_p=mean_and_error(delta_p),
        delta_p=percentiles(delta_p),
        rms_delta_p=Estimate(rms, 0.5 / rms * mse.error if rms > 0 else 0.0),
        same_top=Estimate(top, math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0),
        base_tail_mass=float(np.mean(tail_mass)) if n else 0.0,
    )
