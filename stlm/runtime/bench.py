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
from stlm.manifest import read_manifest
from stlm.variant import Variant


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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    for name, value, low in (
        ("batch", batch, 1),
        ("prompt_len", prompt_len, 1),
        ("gen_len", gen_len, 2),
        ("runs", runs, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise InvalidArgumentError(
                f"{name} must be an int ≥ {low}, got {value!r}",
                fix=f"pass --{name.replace('_', '-')} {max(low, 1)} or more",
            )
    manifest = read_manifest(Path(package))
    if prompt_len + gen_len > manifest.generation.context_length:
        raise InvalidArgumentError(
            f"prompt_len {prompt_len} + gen_len {gen_len} exceeds the context of {manifest.generation.context_length}",
            fix="lower --prompt-len or --gen-len",
        )
    from stlm.runtime.generator import Generator

    backend = Generator.load(package, threads=threads).backend
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, min(manifest.model.vocab_size, 50000), (batch, prompt_len)).tolist()
    ttfts, prefills, decodes, steps = [], [], [], []
    for run in range(warmup + runs):
        cache = backend.new_cache(batch, prompt_len + gen_len)
        start = time.perf_counter()
        logits = backend.forward(cache, prompts)
        tokens = logits.argmax(axis=-1)
        first = time.perf_counter()
        step_times = []
        for _ in range(gen_len - 1):
            t0 = time.perf_counter()
            logits = backend.forward(cache, tokens[:, None].tolist())
            tokens = logits.argmax(axis=-1)
            step_times.append(time.perf_counter() - t0)
        end = time.perf_counter()
        del cache
        if run >= warmup:
            ttfts.append(first - start)
            prefills.append(batch * prompt_len / (first - start))
            decodes.append(batch * (gen_len - 1) / (end - first))
            steps.extend(step_times)
    ms = np.array(steps) * 1000.0
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
        ttft_ms=float(np.median(ttfts) * 1000.0),
        prefill_tok_s=float(np.median(prefills)),
        decode_tok_s=float(np.median(decodes)),
        token_ms_p50=float(np.percentile(ms, 50)),
        token_ms_p90=float(np.percentile(ms, 90)),
        token_ms_p99=float(np.percentile(ms, 99)),
        peak_rss_mb=_peak_rss_mb(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
