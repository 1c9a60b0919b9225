"""TEMPORARY: logits at every position until ``Generator.logits`` (the ``logits_index`` graph input) lands.

Concat ONNX Runtime packages already return every position of a step; other packages are fed one
token at a time. Delete this module when :meth:`stlm.runtime.Generator.logits` exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stlm.contract import LOGITS
from stlm.runtime import Generator
from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend, step_inputs


def all_logits(generator: Generator, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """float32 logits (len, vocab) at every position of each sequence."""
    backend = generator.backend
    if isinstance(backend, OnnxRuntimeBackend) and not backend.inplace and backend._kv_dtype.name != "bfloat16":
        out = []
        for seq in sequences:
            cache = backend.new_cache(1, len(seq))
            feeds, _ = step_inputs([seq], cache.lengths, inplace=False, mask=cache.mask)
            feeds.update(zip(backend._past, cache.arrays, strict=True))
            out.append(backend.session.run([LOGITS], feeds)[0][0])
        return out
    results = []
    for seq in sequences:
        cache = backend.new_cache(1, len(seq))
        results.append(np.stack([backend.forward(cache, [[t]])[0] for t in seq]).astype(np.float32))
    return results
