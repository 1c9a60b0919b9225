"""Resource bounds checked before the server allocates anything: the KV cache must fit in memory.

``--max-batch`` slots of ``--max-context`` tokens are allocated once, at startup; a size the
machine cannot hold is refused with an :class:`InvalidArgumentError` that says how much it needs,
how much there is and what would fit, instead of being killed by the OOM killer later (Linux
over-commits, so the allocation itself would "succeed").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from stlm.errors import InvalidArgumentError, StlmError
from stlm.manifest import Manifest

__all__ = ["KV_MEMORY_FRACTION", "MemoryBudget", "check_kv_cache", "kv_cache_bytes"]

log = logging.getLogger(__name__)

#: The KV cache may take at most this fraction of the available memory (the rest: activations,
#: logits, tokenizer, request buffers).
KV_MEMORY_FRACTION = 0.8

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# backends whose cache lives on the GPU; TensorRT keeps two slabs of twice the columns
_DEVICE_BACKENDS = {"onnxruntime-cuda": 1, "onnxruntime-iobinding": 1, "tensorrt": 4}


def kv_cache_bytes(manifest: Manifest, batch: int, capacity: int, backend: str = "onnxruntime") -> int:
    """Bytes of a KV cache of ``batch`` slots × ``capacity`` tokens for ``backend``."""
    cfg = manifest.model
    itemsize = _ITEMSIZE.get(manifest.contract.kv_dtype, 4)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # keys and values
    return per_token * batch * capacity * _DEVICE_BACKENDS.get(backend, 1)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes available for the cache, and where (for messages)."""

    available: int
    where: str


def host_memory_available() -> int | None:
    """Bytes of host memory this process can still use: MemAvailable, capped by a cgroup limit."""
    candidates: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:
                candidates.append(max(0, int(limit) - int(usage)))
        except OSError:
            continue
    return min(candidates) if candidates else None


def _device_memory_available() -> int | None:
    try:
        from stlm.runtime.gpu import call, cudart

        free, _total = call(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)
    except (StlmError, ImportError, TypeError, ValueError):
        return None


def memory_budget(backend: str) -> MemoryBudget | None:
    """Memory the cache of ``backend`` can use (None when it cannot be measured here)."""
    if backend in _DEVICE_BACKENDS:
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
