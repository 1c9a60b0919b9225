"""Speed of a package: time to first token, prefill and decode throughput, per-token latency.

Times the backend itself (prefill of a fixed random prompt, then greedy decode of a fixed number
of tokens, argmax on the host), after warm-up runs; reports medians over runs. Pure measurement:
no printing; the CLI formats the result.
"""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.package.manifest import Manifest, read_manifest
from stlm.package.variant import Variant
from stlm.runtime.backend import Backend
from stlm.runtime.memory import host_memory_available, kv_cache_bytes


@dataclass(frozen=True)
class BenchResult:
    """Medians over runs; latencies in milliseconds, throughputs in tokens per second."""

    backend: str
    package: str
    dtype: str
    variant: Variant
    batch: int
    prompt_len: int
    gen_len: int
    runs: int
    threads: int | None
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    token_ms_p50: float
    token_ms_p90: float
    token_ms_p99: float
    peak_rss_mb: float
    machine: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {**asdict(self), "variant": self.variant.to_dict()}

    def format(self) -> str:
        """The human-readable report (``stlm bench``)."""
        return "\n".join(
            [
                f"{self.backend}: {self.variant.describe()} | batch {self.batch}, prompt {self.prompt_len}, "
                f"generate {self.gen_len}, {self.runs} runs",
                f"time to first token  {self.ttft_ms:9.1f} ms   prefill {self.prefill_tok_s:9.1f} tok/s",
                f"decode               {self.decode_tok_s:9.1f} tok/s  per token p50 {self.token_ms_p50:.2f} "
                f"p90 {self.token_ms_p90:.2f} p99 {self.token_ms_p99:.2f} ms",
                f"peak RSS             {self.peak_rss_mb:9.0f} MB",
            ]
        )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _check_sizes(**sizes: int) -> None:
    lows = {"batch": 1, "prompt_len": 1, "gen_len": 2, "runs": 1, "warmup": 0}
    for name, value in sizes.items():
        low = lows[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(
                f"{name} must be an int ≥ {low}, got {value!r}",
                fix=f"pass --{name.replace('_', '-')} {max(low, 1)} or more",
            )


MAX_BATCH = 4096
#: the KV cache plus the prefill's activations may take at most this fraction of the memory left
MEMORY_FRACTION = 0.8


def _check_memory(manifest: Manifest, batch: int, prompt_len: int, gen_len: int) -> None:
    """Refuse a run the machine cannot hold (rather than be ended by the OOM killer)."""
    if batch > MAX_BATCH:
        raise InvalidArgumentError(f"--batch {batch} is more than {MAX_BATCH}", fix=f"pass --batch ≤ {MAX_BATCH}")
    cfg = manifest.model
    kv = kv_cache_bytes(manifest, batch, prompt_len + gen_len)
    widest = max(3 * cfg.hidden_size, 2 * cfg.intermediate_size, cfg.num_heads * prompt_len)
    # activations: the widest prefill tensor (MLP, or the attention scores) twice over, in float32
    need = kv + batch * prompt_len * widest * 4 * 2 + batch * cfg.vocab_size * 4
    available = host_memory_available()
    if available is not None and need > available * MEMORY_FRACTION:
        fits = int(available * MEMORY_FRACTION) // max(1, need // batch)
        raise InvalidArgumentError(
            f"--batch {batch} × {prompt_len + gen_len} tokens needs about {need / 1e9:.1f} GB "
            f"(KV cache {kv / 1e9:.1f} GB and activations), but {available / 1e9:.1f} GB of memory is available",
            fix=f"pass --batch ≤ {fits}" if fits >= 1 else "pass a shorter --prompt-len/--gen-len, or free memory",
        )


def _timed_run(backend: Backend[Any], prompts: list[list[int]], gen_len: int) -> tuple[float, float, list[float]]:
    """One prefill + greedy decode: (time to first token, decode seconds, each decode step's seconds)."""
    cache = backend.new_cache(len(prompts), len(prompts[0]) + gen_len)
    start = time.perf_counter()
    tokens = backend.forward(cache, prompts).argmax(axis=-1)
    first = time.perf_counter()
    steps = []
    for _ in range(gen_len - 1):
        t0 = time.perf_counter()
        tokens = backend.forward(cache, tokens[:, None].tolist()).argmax(axis=-1)
        steps.append(time.perf_counter() - t0)
    return first - start, time.perf_counter() - first, steps


def run_benchmark(
    package: str | Path,
    *,
    batch: int = 1,
    prompt_len: int = 128,
    gen_len: int = 64,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> BenchResult:
    """Benchmark ``package``: ``warmup`` unmeasured runs, then ``runs`` measured ones."""
    _check_sizes(batch=batch, prompt_len=prompt_len, gen_len=gen_len, runs=runs, warmup=warmup)
    manifest = read_manifest(Path(package))
    if prompt_len + gen_len > manifest.generation.context_length:
        raise InvalidArgumentError(
            f"prompt_len {prompt_len} + gen_len {gen_len} exceeds the context of {manifest.generation.context_length}",
            fix="lower --prompt-len or --gen-len",
        )
    _check_memory(manifest, batch, prompt_len, gen_len)
    from stlm.runtime.generator import Generator

    backend = Generator.load(package, threads=threads).backend
    prompts = np.random.default_rng(seed).integers(3, min(manifest.model.vocab_size, 50000), (batch, prompt_len))
    measured = [_timed_run(backend, prompts.tolist(), gen_len) for _ in range(warmup + runs)][warmup:]
    ms = np.array([t for _, _, steps in measured for t in steps]) * 1000.0
    ttft = float(np.median([first for first, _, _ in measured]))
    return BenchResult(
        backend=backend.name,
        package=str(package),
        dtype=manifest.dtype,
        variant=manifest.variant,
        batch=batch,
        prompt_len=prompt_len,
        gen_len=gen_len,
        runs=runs,
        threads=threads,
        ttft_ms=ttft * 1000.0,
        prefill_tok_s=float(np.median([batch * prompt_len / first for first, _, _ in measured])),
        decode_tok_s=float(np.median([batch * (gen_len - 1) / decode for _, decode, _ in measured])),
        token_ms_p50=float(np.percentile(ms, 50)),
        token_ms_p90=float(np.percentile(ms, 90)),
        token_ms_p99=float(np.percentile(ms, 99)),
        peak_rss_mb=_peak_rss_mb(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
