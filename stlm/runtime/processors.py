"""Logits processors of the OpenAI API: ``logit_bias``, ``presence_penalty``, ``frequency_penalty``.

Pure functions of their arguments (the input array is never modified), applied to one row of
raw logits before :func:`stlm.runtime.sampling.sample_token` (which then applies the repetition
penalty, temperature, top-k, top-p and min-p). Order, as in vLLM: ``logit_bias`` first, then the
penalties.

* ``logit_bias``: ``logits[id] += bias`` for each ``(id, bias)``; ``bias`` in [-100, 100] (OpenAI's
  range: -100 in effect bans a token, 100 in effect forces it).
* presence / frequency (OpenAI's definition): ``logits[j] -= frequency * c[j] + presence * (c[j] > 0)``
  where ``c[j]`` counts the occurrences of token ``j`` among the *generated* tokens (not the prompt,
  as in vLLM); both in [-2, 2], negative values encourage repetition.

Results stay finite float32: they are clipped to the float32 range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.support.numbers import check_real

__all__ = [
    "MAX_BIAS",
    "MAX_PENALTY",
    "apply_logit_bias",
    "apply_presence_frequency",
    "check_logit_bias",
    "check_penalty",
]

MAX_BIAS = 100.0
MAX_PENALTY = 2.0
_F32_MAX = float(np.finfo(np.float32).max)


def check_penalty(name: str, value: object) -> float:
    """``value`` as a float in [-2, 2], or an :class:`InvalidArgumentError` naming ``name``."""
    return check_real(
        name, value, -MAX_PENALTY, MAX_PENALTY, expected="a number from -2 to 2 (0 = off)", fix=f"pass e.g. {name}=0.5"
    )


def check_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """``bias`` (a mapping or pairs of token id → bias) as sorted ``(id, bias)`` pairs, ids unique.

    Token ids may be ints or decimal strings (JSON object keys); biases numbers in [-100, 100].
    Whether an id exists in the vocabulary is checked where the vocabulary is known.
    """
    fix = 'pass a mapping of token ids to numbers from -100 to 100, e.g. logit_bias={"50256": -100}'
    items: Iterable[Any]
    if isinstance(bias, Mapping):
        items = bias.items()
    elif isinstance(bias, list | tuple):
        items = bias
    else:
        raise InvalidArgumentError(f"logit_bias={bias!r:.80} is invalid: expected a mapping", fix=fix)
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidArgumentError(f"logit_bias entry {item!r:.60} is invalid: expected (id, bias)", fix=fix)
        key, value = item
        token = _token_id(key)
        if token is None:
            raise InvalidArgumentError(
                f"logit_bias has the key {key!r:.40}, which is not a token id (expected an integer >= 0)", fix=fix
            )
        out[token] = check_real(
            f"logit_bias[{key!r:.40}]", value, -MAX_BIAS, MAX_BIAS, expected="a number from -100 to 100", fix=fix
        )
    return tuple(sorted(out.items()))


def _token_id(key: object) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int | np.integer):
        return int(key) if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12:
        return int(key)
    return None


def check_logits(logits: Any) -> np.ndarray:
    """``logits`` as one float32 row (the same array when it already is one), or an
    :class:`InvalidArgumentError` for anything that is not a non-empty 1-D float array."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        raise InvalidArgumentError(
            f"logits have shape {x.shape} and dtype {x.dtype}, expected a non-empty 1-D float array",
            fix="pass one row of logits, shape (vocab,)",
        )
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _float32(logits: Any) -> np.ndarray:
    return np.array(check_logits(logits), dtype=np.float32, copy=True)  # always a copy


def apply_logit_bias(logits: np.ndarray, bias: Iterable[tuple[int, float]]) -> np.ndarray:
    """``logits`` with ``bias`` added (a copy); :class:`InvalidArgumentError` for an id outside the vocabulary."""
    x = _float32(logits)
    pairs = list(bias)
    if not pairs:
        return x
    ids = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
    values = np.fromiter((b for _, b in pairs), dtype=np.float64, count=len(pairs))
    if int(ids.min()) < 0 or int(ids.max()) >= x.shape[0]:
        bad = int(ids.max()) if int(ids.max()) >= x.shape[0] else int(ids.min())
        raise InvalidArgumentError(
            f"logit_bias names the token id {bad}, expected ids in [0, {x.shape[0]})",
            fix="pass token ids of this model's vocabulary (see /tokenize)",
        )
    biased = x[ids].astype(np.float64) + values
    x[ids] = np.where(np.isfinite(x[ids]), np.clip(biased, -_F32_MAX, _F32_MAX), x[ids])
    return x


def apply_presence_frequency(
    logits: np.ndarray, counts: np.ndarray, presence: float = 0.0, frequency: float = 0.0
) -> np.ndarray:
    """``logits - frequency * counts - presence * (counts > 0)`` (a copy; see the module docstring).

    ``counts`` has one entry per vocabulary id: how often each was generated so far.
    """
    x = _float32(logits)
    c = np.asarray(counts)
    if c.shape != x.shape:
        raise InvalidArgumentError(
            f"counts have shape {c.shape}, expected {x.shape} (one count per vocabulary id)",
            fix="pass the generated tokens' counts as np.bincount(ids, minlength=vocab)",
        )
    presence, frequency = check_penalty("presence_penalty", presence), check_penalty("frequency_penalty", frequency)
    seen = np.flatnonzero(c)
    if seen.size == 0 or (presence == 0.0 and frequency == 0.0):
        return x
    penalty = frequency * c[seen].astype(np.float64) + presence
    before = x[seen]
    x[seen] = np.where(np.isfinite(before), np.clip(before - penalty, -_F32_MAX, _F32_MAX), before)
    return x
