"""Sampling parameters: :class:`SamplingParams` (validated on construction) and :func:`make_rng`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.runtime.logprobs import LOGPROBS_MODES, check_top_logprobs
from stlm.runtime.processors import check_logit_bias, check_penalty
from stlm.runtime.sampling.controls import check_controls
from stlm.support.numbers import check_int, check_real

if TYPE_CHECKING:
    from stlm.runtime.constraints import Constraint

__all__ = ["SamplingParams", "checked", "make_rng"]


class _Rule(NamedTuple):
    """What one numeric parameter accepts: ints only (bools and floats refused) or any real number,
    in ``[low, high]`` (``low`` itself excluded when ``low_open``)."""

    expected: str
    fix: str
    integer: bool
    low: float
    high: float
    low_open: bool = False


_INT_MAX = (1 << 31) - 1  # token counts: far beyond any context
_BIG = (1 << 128) - 1  # top-k and seeds: anything a client may reasonably send (top-k ≥ vocab = off)
_RULES: dict[str, _Rule] = {
    "max_new_tokens": _Rule("an int from 1 to 2**31-1", "ask for e.g. max_new_tokens=64", True, 1, _INT_MAX),
    "temperature": _Rule("a finite float >= 0 (0 = greedy)", "use 0 for greedy or e.g. 0.7", False, 0, math.inf),
    "top_k": _Rule("an int from 0 (off) to 2**128-1", "use top_k=0 (off) or e.g. 50", True, 0, _BIG),
    "top_p": _Rule("a float in (0, 1] (1 = off)", "use top_p=1.0 (off) or e.g. 0.95", False, 0, 1, low_open=True),
    "min_p": _Rule("a float in [0, 1] (0 = off)", "use min_p=0.0 (off) or e.g. 0.05", False, 0, 1),
    "repetition_penalty": _Rule(
        "a finite float > 0 (1 = off)", "use 1.0 (off) or e.g. 1.1", False, 0, math.inf, low_open=True
    ),
    "seed": _Rule("None or an int from 0 to 2**128-1", "pass e.g. seed=0, or None for a random seed", True, 0, _BIG),
}


def checked(name: str, value: object) -> Any:
    """``value`` as the int/float ``_RULES[name]`` allows, or an InvalidArgumentError naming it
    (:mod:`stlm.support.numbers`: bools, NaN/inf and out-of-range ints of any size refused)."""
    rule = _RULES[name]
    if rule.integer:
        return check_int(name, value, int(rule.low), int(rule.high), expected=rule.expected, fix=rule.fix)
    return check_real(name, value, rule.low, rule.high, expected=rule.expected, fix=rule.fix, low_open=rule.low_open)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction (:class:`InvalidArgumentError` if bad).

    ``temperature=0`` is greedy (top-k/top-p/min-p/seed are then irrelevant). ``top_k=0``,
    ``top_p=1`` and ``min_p=0`` switch their filter off. ``stop`` accepts a list (stored as a
    tuple) or a single str (one stop string). ``max_new_tokens`` is checked against the context
    length by the generator.

    OpenAI's processors (:mod:`stlm.runtime.processors`, applied before the repetition penalty):
    ``presence_penalty``/``frequency_penalty`` in [-2, 2] on the generated tokens, ``logit_bias``
    (a mapping token id → bias in [-100, 100], stored as sorted pairs). ``logprobs=True`` records
    each generated token's log-probability and ``top_logprobs`` (0..20) alternatives, from the
    model's own distribution (``logprobs_mode="raw"``) or after bias, penalties and temperature
    (``"processed"``); see :mod:`stlm.runtime.logprobs`.

    vLLM's stop and length controls (``stop_token_ids``, ``min_tokens``, ``ignore_eos``,
    ``skip_special_tokens``, ``include_stop_str_in_output``, ``bad_words``,
    ``truncate_prompt_tokens``: :mod:`stlm.runtime.sampling.controls`) and ``constraint`` (a
    :class:`stlm.runtime.constraints.Constraint`: the output must match it).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    logprobs_mode: str = "raw"
    # vLLM's stop and length controls and the output constraint (see stlm.runtime.sampling.controls)
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: tuple[str, ...] = ()
    truncate_prompt_tokens: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if not (name == "seed" and value is None):
                object.__setattr__(self, name, checked(name, value))
        object.__setattr__(self, "stop", _check_stop(self.stop))
        if not isinstance(self.logprobs, bool | np.bool_):
            raise InvalidArgumentError(
                f"logprobs={self.logprobs!r} is invalid: expected a bool", fix="pass logprobs=True or logprobs=False"
            )
        object.__setattr__(self, "logprobs", bool(self.logprobs))
        _check_openai_fields(self)
        check_controls(self)

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0.0


def _check_openai_fields(params: SamplingParams) -> None:
    """Validate (and normalise) the fields of :mod:`stlm.runtime.processors` and :mod:`stlm.runtime.logprobs`."""
    for name in ("presence_penalty", "frequency_penalty"):
        object.__setattr__(params, name, check_penalty(name, getattr(params, name)))
    object.__setattr__(params, "logit_bias", check_logit_bias(params.logit_bias))
    object.__setattr__(params, "top_logprobs", check_top_logprobs(params.top_logprobs))
    if params.top_logprobs and not params.logprobs:
        raise InvalidArgumentError(
            f"top_logprobs={params.top_logprobs} needs logprobs=True", fix="pass logprobs=True with top_logprobs"
        )
    if params.logprobs_mode not in LOGPROBS_MODES:
        raise InvalidArgumentError(
            f"logprobs_mode={params.logprobs_mode!r} is invalid: expected one of {', '.join(LOGPROBS_MODES)}",
            fix='pass logprobs_mode="raw" (the model\'s own log-probabilities) or "processed"',
        )


def _check_stop(stop: object) -> tuple[str, ...]:
    expected = "expected a list or tuple of non-empty str"
    fix = 'pass a list of non-empty strings, e.g. stop=["\\n\\n", "User:"]'
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple):
        raise InvalidArgumentError(f"stop={stop!r} is invalid: {expected}", fix=fix)
    for item in stop:
        if not isinstance(item, str) or not item:
            raise InvalidArgumentError(
                f"stop={stop!r} is invalid: the entry {item!r} is not a non-empty str ({expected})", fix=fix
            )
    return tuple(stop)


def make_rng(seed: int | None) -> np.random.Generator:
    """A PCG64 generator: reproducible for an int seed >= 0, fresh OS entropy for None."""
    return np.random.default_rng(None if seed is None else checked("seed", seed))
