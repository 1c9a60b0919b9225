"""The numerics of lm-eval's requests, as pure functions (numpy only, no lm_eval import).

These reproduce what lm-evaluation-harness's ``hf`` model (``HFLM``) does with the logits of a
causal decoder, so that a package scores a task item exactly as transformers would:

* a ``(context, continuation)`` request reads ``(context + continuation)[-(max_length + 1):][:-1]``
  (the last token is only predicted; a too-long pair loses tokens on the left);
* the continuation's log-likelihood is the sum of the log-softmax of the last
  ``len(continuation)`` positions at the continuation's tokens, and it is *greedy* when every one
  of those tokens is the position's argmax (lowest id on ties, as ``torch.argmax``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stlm.errors import InvalidArgumentError

__all__ = ["batches", "model_input", "score_continuation"]


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The tokens the model reads to score ``continuation`` after ``context`` (HFLM's window)."""
    if not continuation:
        raise InvalidArgumentError("an empty continuation has no tokens to score", fix="pass a non-empty continuation")
    if len(continuation) > max_length:
        raise InvalidArgumentError(
            f"the continuation has {len(continuation)} tokens; the model reads at most {max_length}",
            fix="shorten the continuation (lm-eval's hf model refuses it too)",
        )
    whole = [*context, *continuation]
    return tuple(whole[-(max_length + 1) :][:-1])


def score_continuation(logits: np.ndarray, continuation: Sequence[int]) -> tuple[float, bool]:
    """``(log-likelihood, is_greedy)`` of ``continuation`` from the logits of its model input.

    ``logits`` is ``(len(input), vocab)``: row ``i`` predicts token ``i + 1``, so the continuation's
    tokens are predicted by the last ``len(continuation)`` rows. The log-softmax is taken in float64.
    """
    n = len(continuation)
    if logits.ndim != 2 or not 0 < n <= logits.shape[0]:
        raise InvalidArgumentError(
            f"logits of shape {logits.shape} cannot score a {n}-token continuation",
            fix="pass the (len(input), vocab) logits of the model input that ends with the continuation",
        )
    rows = logits[-n:]
    targets = np.asarray(continuation, dtype=np.int64)
    greedy = bool((rows.argmax(axis=1) == targets).all())
    x = rows.astype(np.float64)
    peak = x.max(axis=1)
    log_norm = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
    return float((x[np.arange(n), targets] - log_norm).sum()), greedy


def batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped for batched runs: longest first (as lm-eval's Collator), at most ``batch_size``
    rows and, beyond its first row, at most ``max_tokens`` tokens per batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups and len(groups[-1]) < batch_size and total + lengths[i] <= max_tokens:
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups
