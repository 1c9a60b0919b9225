"""What a backend is: a loaded decoder that runs steps over a KV cache it owns.

Every backend (ONNX Runtime on CPU or CUDA, TensorRT) implements :class:`Backend` for its own
cache type (mypy checks each one against the protocol); the generator and the server only talk to
this protocol, so sampling, batching and streaming behave the same on all of them. A cache has a
fixed number of rows (slots); each step feeds every row its own new tokens (a row given none is
idle for that step), so rows of different lengths and rows that join or leave a running batch
need no re-padding by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

from stlm.package.manifest import Manifest


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


CacheT = TypeVar("CacheT", bound=KVCache)


class Backend(Protocol[CacheT]):
    """A loaded decoder whose steps run over caches of type ``CacheT``."""

    manifest: Manifest
    name: str

    def new_cache(self, batch: int, capacity: int) -> CacheT:
        """An empty cache of ``batch`` rows, each able to hold ``capacity`` tokens."""
        ...

    def forward(self, cache: CacheT, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Append ``tokens[row]`` to each row (an empty list leaves the row idle) and return the
        float32 logits after each row's last token, (batch, vocab); idle rows' logits are unspecified."""
        ...

    def forward_all(self, cache: CacheT, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Like :meth:`forward`, but return every fed position's float32 logits: one
        (len(tokens[row]), vocab) array per row ((0, vocab) for an idle row)."""
        ...

    def release(self, cache: CacheT, row: int) -> None:
        """Empty ``row`` so a new sequence can start in it."""
        ...


def last_position_logits(rows: Sequence[np.ndarray], vocab: int) -> np.ndarray:
    """(batch, vocab) float32: each row's last logits of ``forward_all``'s output (zeros for an idle row)."""
    logits = np.zeros((len(rows), vocab), dtype=np.float32)
    for r, row in enumerate(rows):
        if len(row):
            logits[r] = row[-1]
    return logits
