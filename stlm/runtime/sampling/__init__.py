"""Choosing the next token: :mod:`~stlm.runtime.sampling.params` (what to do, validated),
:mod:`~stlm.runtime.sampling.selection` (the fast, exact path) and
:mod:`~stlm.runtime.sampling.reference` (the sort-based definition it is tested against)."""

from stlm.runtime.sampling.params import SamplingParams, make_rng
from stlm.runtime.sampling.selection import (
    apply_repetition_penalty,
    apply_temperature,
    log_softmax,
    min_p_mask,
    sample_token,
    top_k_mask,
    top_p_mask,
)

__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_temperature",
    "log_softmax",
    "make_rng",
    "min_p_mask",
    "sample_token",
    "top_k_mask",
    "top_p_mask",
]
