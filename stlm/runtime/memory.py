"""Memory facts the runtime checks before allocating: the bytes of a KV cache, the host memory left.

Linux over-commits, so an allocation too large for the machine "succeeds" and the OOM killer ends
the process later; callers compare :func:`kv_cache_bytes` with :func:`host_memory_available` first.
"""

from __future__ import annotations

from pathlib import Path

from stlm.package.manifest import Manifest

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# backends whose cache lives on the GPU; TensorRT keeps two slabs of twice the columns
DEVICE_BACKENDS = {"onnxruntime-cuda": 1, "onnxruntime-iobinding": 1, "tensorrt": 4}


def kv_cache_bytes(manifest: Manifest, batch: int, capacity: int, backend: str = "onnxruntime") -> int:
    """Bytes of a KV cache of ``batch`` slots × ``capacity`` tokens for ``backend``."""
    cfg = manifest.model
    itemsize = _ITEMSIZE.get(manifest.contract.kv_dtype, 4)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # keys and values
    return per_token * batch * capacity * DEVICE_BACKENDS.get(backend, 1)


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
