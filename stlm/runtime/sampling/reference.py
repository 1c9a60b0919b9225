"""The sampling distribution by its definition: full sorts in float64, a few lines per step.

This is the test oracle for the fast path (:func:`stlm.runtime.sampling.selection.sample_token`),
which never sorts the vocabulary. The steps, in transformers' order: repetition penalty,
temperature, top-k, top-p on the distribution renormalised over the top-k survivors, min-p.
Ties rank by id (lowest first); a cumulative mass within 1e-9 (relative) of ``top_p`` reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stlm.runtime.sampling.params import SamplingParams

TOP_P_RTOL = 1e-9


def reference_distribution(logits: np.ndarray, params: SamplingParams, previous_ids: Sequence[int] = ()) -> np.ndarray:
    """The float64 probability of each token under ``params`` (one-hot on the argmax when greedy)."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if params.repetition_penalty != 1.0:
        for i in set(previous_ids):  # each distinct id once
            x[i] = x[i] / params.repetition_penalty if x[i] > 0 else x[i] * params.repetition_penalty
    if params.greedy:
        return np.eye(x.shape[0])[int(np.argmax(x))]
    z = x / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.lexsort((np.arange(x.shape[0]), -z))  # probability desc, id asc
    keep = np.zeros(x.shape[0], dtype=bool)
    keep[order[: params.top_k or x.shape[0]]] = True
    if params.top_p < 1.0:
        q = np.where(keep, p, 0.0) / p[keep].sum()
        cut = int(np.argmax(np.cumsum(q[order]) >= params.top_p * (1 - TOP_P_RTOL)))
        keep &= np.isin(np.arange(x.shape[0]), order[: cut + 1])
    if params.min_p > 0.0:
        keep &= p >= params.min_p * p[keep].max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()
