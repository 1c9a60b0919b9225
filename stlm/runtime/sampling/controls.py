"""Validation of vLLM's stop and length controls and of the output constraint (:class:`SamplingParams` fields).

Same names and meanings as vLLM's ``SamplingParams``: ``stop_token_ids`` (finish with reason
'stop' when one is generated; the token is kept in the token ids, its text only with
``include_stop_str_in_output``), ``min_tokens`` (EOS and ``stop_token_ids`` are forbidden, and
stop strings not checked, before that many tokens), ``ignore_eos`` (EOS is an ordinary token),
``skip_special_tokens`` (drop special tokens from the text; default True),
``include_stop_str_in_output`` (keep the stop string / stop token's text), ``bad_words`` (words
never generated: see :mod:`stlm.runtime.badwords`), ``truncate_prompt_tokens`` (keep only the
last k prompt tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError

MAX_CONTROL_ITEMS = 1024  # entries of stop_token_ids / bad_words


def _int(name: str, value: object, low: int, expected: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < low:
        raise InvalidArgumentError(f"{name}={value!r} is invalid: expected {expected}", fix=fix)
    return int(value)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidArgumentError(f"{name}={value!r} is invalid: expected a bool", fix=f"pass {name}=True or False")
    return bool(value)


def check_controls(params: Any) -> None:
    """Validate and normalise the stop/length controls and ``constraint`` of ``params`` in place."""
    put = object.__setattr__
    ids = params.stop_token_ids
    if isinstance(ids, str | bytes) or not isinstance(ids, list | tuple) or len(ids) > MAX_CONTROL_ITEMS:
        raise InvalidArgumentError(
            f"stop_token_ids={ids!r:.80} is invalid: expected a list of at most {MAX_CONTROL_ITEMS} token ids",
            fix="pass e.g. stop_token_ids=[0]",
        )
    fix = "pass token ids (ints >= 0) of this model's vocabulary"
    put(params, "stop_token_ids", tuple(_int("stop_token_ids", t, 0, "ints >= 0", fix) for t in ids))
    put(params, "min_tokens", _int("min_tokens", params.min_tokens, 0, "an int >= 0", "pass e.g. min_tokens=0"))
    if params.min_tokens > params.max_new_tokens:
        raise InvalidArgumentError(
            f"min_tokens={params.min_tokens} exceeds max_new_tokens={params.max_new_tokens}",
            fix="pass min_tokens ≤ max_new_tokens",
        )
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        put(params, name, _bool(name, getattr(params, name)))
    words = params.bad_words
    if isinstance(words, str) or not isinstance(words, list | tuple) or len(words) > MAX_CONTROL_ITEMS:
        raise InvalidArgumentError(
            f"bad_words={words!r:.80} is invalid: expected a list of at most {MAX_CONTROL_ITEMS} strings",
            fix='pass e.g. bad_words=["foo"]',
        )
    if not all(isinstance(w, str) and w for w in words):
        raise InvalidArgumentError(
            f"bad_words={words!r:.80} holds an entry that is not a non-empty string", fix="pass non-empty strings"
        )
    put(params, "bad_words", tuple(words))
    k = params.truncate_prompt_tokens
    if k is not None:
        put(
            params,
            "truncate_prompt_tokens",
            _int("truncate_prompt_tokens", k, 1, "None or an int >= 1", "pass e.g. truncate_prompt_tokens=512"),
        )
    _check_constraint(params.constraint)


def _check_constraint(constraint: object) -> None:
    if constraint is None:
        return
    from stlm.runtime.constraints import Constraint

    if not isinstance(constraint, Constraint):
        raise InvalidArgumentError(
            f"constraint={constraint!r:.80} is invalid: expected a stlm.runtime.Constraint or None",
            fix="pass e.g. constraint=Constraint('json_schema', {...})",
        )
