"""What a backend is: a loaded decoder that runs steps over a KV cache it owns.

Every backend (ONNX Runtime on CPU or CUDA, TensorRT) implements :class:`Backend`; the generator
only talks to this protocol, so sampling, batching and streaming behave the same on all of them.
A cache has a fixed number of rows (slots); each step feeds every row its own new tokens (a row
given none is idle for that step), so rows of different lengths and rows that join or leave a
running batch need no re-padding by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from stlm.manifest import Manifest


class KVCache(Protocol):
    """A backend's KV cache for a fixed number of rows."""

    @property
    def batch(self) -> int:
        """Number of rows (slots)."""
        ...

    @property
    def lengths(self) -> np.ndarray:
        """Tokens held by each row, (batch,) int64."""
        ...


class Backend(Protocol):
    """A loaded decoder."""

    manifest: Manifest
    name: str

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache of ``batch`` rows, each able to hold ``capacity`` tokens."""
        ...

    def forward(self, cache: KVCache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Append ``tokens[row]`` to each row (an empty list leaves the row idle) and return the
        float32 logits after each row's last token, (batch, vocab); idle rows' logits are unspecified."""
        ...

    def release(self, cache: KVCache, row: int) -> None:
        """Empty ``row`` so a new sequence can start in it."""
        ...
