"""Resource bounds checked before the server allocates anything: the KV cache must fit in memory.

``--max-batch`` slots of ``--max-context`` tokens are allocated once, at startup; a size the
machine cannot hold is refused with an :class:`InvalidArgumentError` that says how much it needs,
how much there is and what would fit, instead of being killed by the OOM killer later (Linux
over-commits, so the allocation itself would "succeed").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stlm.errors import InvalidArgumentError, StlmError
from stlm.package.manifest import Manifest
from stlm.runtime.memory import DEVICE_BACKENDS, host_memory_available, kv_cache_bytes

__all__ = ["KV_MEMORY_FRACTION", "MemoryBudget", "check_kv_cache", "kv_cache_bytes"]

log = logging.getLogger(__name__)

#: The KV cache may take at most this fraction of the available memory (the rest: activations,
#: logits, tokenizer, request buffers).
KV_MEMORY_FRACTION = 0.8


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes available for the cache, and where (for messages)."""

    available: int
    where: str


def _device_memory_available() -> int | None:
    try:
        from stlm.runtime.gpu import call, cudart

        free, _total = call(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)
    except (StlmError, ImportError, TypeError, ValueError):
        return None


def memory_budget(backend: str) -> MemoryBudget | None:
    """Memory the cache of ``backend`` can use (None when it cannot be measured here)."""
    if backend in DEVICE_BACKENDS:
        free = _device_memory_available()
        return None if free is None else MemoryBudget(free, "free GPU memory")
    free = host_memory_available()
    return None if free is None else MemoryBudget(free, "available host memory")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_kv_cache(manifest: Manifest, backend: str, max_batch: int, capacity: int, budget: MemoryBudget | None) -> int:
    """The cache's bytes; :class:`InvalidArgumentError` if it exceeds ``KV_MEMORY_FRACTION`` of ``budget``."""
    need = kv_cache_bytes(manifest, max_batch, capacity, backend)
    if budget is None:
        log.info("KV cache: %s (available memory unknown, not checked)", _gb(need))
        return need
    allowed = int(budget.available * KV_MEMORY_FRACTION)
    if need > allowed:
        per_slot = max(1, kv_cache_bytes(manifest, 1, capacity, backend))
        fits = allowed // per_slot
        cfg = manifest.model
        raise InvalidArgumentError(
            f"--max-batch {max_batch} × --max-context {capacity} needs a {_gb(need)} KV cache "
            f"({cfg.num_layers} layers × {cfg.num_kv_heads} KV heads × {cfg.head_dim} dims × keys and values in "
            f"{manifest.contract.kv_dtype}), but only {_gb(budget.available)} of {budget.where} is left "
            f"(the cache may take {int(KV_MEMORY_FRACTION * 100)}%: {_gb(allowed)})",
            fix=f"pass --max-batch ≤ {fits}, or a smaller --max-context"
            if fits >= 1
            else "pass a smaller --max-context, or free memory",
        )
    log.info("KV cache: %s of %s %s", _gb(need), _gb(budget.available), budget.where)
    return need
