"""A/B rounds of stlm packages and ONNX Runtime session settings: decode and prefill speed as ratios.

Each arm is a package, optionally with settings after ``@`` (``batch=N`` overrides ``--batch``;
session settings: ``intra=N``, ``inter=N``, ``opt=basic|extended|all``, ``seq=0`` for parallel
execution, and any ONNX Runtime session config entry such as
``session.intra_op.allow_spinning=0``), for example::

    .venv/bin/python benchmarks/ab_packages.py PKG PKG@session.intra_op.allow_spinning=0 --threads 2
    .venv/bin/python benchmarks/ab_packages.py int4-b32 int4-b64 int4-b128 --rounds 5
    .venv/bin/python benchmarks/ab_packages.py PKG PKG@batch=8      # batch-8 vs batch-1 throughput

All arms are loaded in one process. Every round prefills each arm once (in an order that rotates
from round to round), then decodes all arms in lockstep, one step of each in turn, so the
machine's load changes hit every arm alike; a round's decode speed is its median step. Wall time
and the calling thread's CPU time are both reported: with ``--threads 1`` ONNX Runtime computes in
the calling thread, so the CPU time leaves out the time the thread was descheduled — the steadier
measure on a shared machine. Sessions with more than one thread each keep their own pool;
``--processes`` instead runs each arm in its own process per round (the runtime's benchmark loop;
no competing pools, but seconds apart, so much noisier ratios).

The report gives per-round ratios to the first arm and their medians — the only numbers that mean
much on a shared, noisy machine — plus the medians of the tokens/s themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import stlm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _session_options(settings: dict[str, str], threads: int | None) -> Any:
    import onnxruntime as ort

    from stlm.runtime.ort_session import SESSION_CONFIG

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in SESSION_CONFIG.items():  # the runtime's own settings, then the arm's
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    for key, value in settings.items():
        if key == "intra":
            options.intra_op_num_threads = int(value)
        elif key == "inter":
            options.inter_op_num_threads = int(value)
        elif key == "opt":
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[value])
        elif key == "seq":
            options.execution_mode = (
                ort.ExecutionMode.ORT_SEQUENTIAL if value == "1" else ort.ExecutionMode.ORT_PARALLEL
            )
        else:
            options.add_session_config_entry(key, value)
    return options


def _load(arm: str, threads: int | None, batch: int) -> tuple[Any, int]:
    """The backend of ``arm`` (package[@settings]) and its batch."""
    import onnxruntime as ort

    from stlm.runtime.generator import Generator

    package, _, spec = arm.partition("@")
    settings = dict(item.split("=", 1) for item in spec.split(",") if item)
    batch = int(settings.pop("batch", batch))
    backend: Any = Generator.load(package, device="cpu", threads=threads).backend
    if settings:
        options = _session_options(settings, threads)
        path = str(Path(package) / backend.manifest.graph)
        backend.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return backend, batch


def _prompts(batch: int, prompt_len: int) -> list[list[int]]:
    return np.random.default_rng(0).integers(3, 50000, (batch, prompt_len)).tolist()


def _once(backend: Any, batch: int, prompt_len: int, gen_len: int) -> dict[str, float]:
    """One prefill + greedy decode (the runtime's benchmark loop): TTFT, tokens/s, median step ms."""
    from stlm.runtime.bench import _timed_run

    first, decode, steps = _timed_run(backend, _prompts(batch, prompt_len), gen_len)
    return {
        "ttft_ms": 1000.0 * first,
        "prefill_tok_s": batch * prompt_len / first,
        "decode_tok_s": batch * (gen_len - 1) / decode,
        "step_ms": 1000.0 * statistics.median(steps),
    }


def _timed(backend: Any, cache: Any, tokens: list[list[int]]) -> tuple[np.ndarray, float, float]:
    """``backend.forward`` and its wall and CPU seconds (CPU of the calling thread: ONNX Runtime runs a
    one-thread session in it, so descheduled time does not count)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    logits = backend.forward(cache, tokens)
    return logits.argmax(axis=-1), time.perf_counter() - wall, time.thread_time() - cpu


def _lockstep_round(loaded: dict[str, tuple[Any, int]], order: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """Each arm prefills (in ``order``), then all arms decode step by step, alternating every step."""
    state: dict[str, tuple[Any, np.ndarray]] = {}
    out: dict[str, dict[str, Any]] = {}
    for arm in order:
        backend, batch = loaded[arm]
        cache = backend.new_cache(batch, a.prompt_len + a.gen_len)
        tokens, wall, cpu = _timed(backend, cache, _prompts(batch, a.prompt_len))
        state[arm], out[arm] = (cache, tokens), {"prefill_s": wall, "prefill_cpu_s": cpu, "step_s": [], "cpu_s": []}
    for step in range(a.gen_len - 1):
        for arm in order[step % len(order) :] + order[: step % len(order)]:
            backend, _ = loaded[arm]
            cache, tokens = state[arm]
            tokens, wall, cpu = _timed(backend, cache, tokens[:, None].tolist())
            state[arm] = (cache, tokens)
            out[arm]["step_s"].append(wall)
            out[arm]["cpu_s"].append(cpu)
    return out


def _rotations(arms: list[str], rounds: int) -> list[list[str]]:
    return [arms[r % len(arms) :] + arms[: r % len(arms)] for r in range(rounds)]


def interleaved(a: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every arm loaded in this process; each round prefills every arm, then decodes them in lockstep."""
    loaded = {arm: _load(arm, a.threads, a.batch) for arm in a.arms}
    for backend, batch in loaded.values():
        _once(backend, batch, a.prompt_len, 4)  # warm-up
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in a.arms}
    for r, order in enumerate(_rotations(a.arms, a.rounds)):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        for arm, result in _lockstep_round(loaded, order, a).items():
            batch = loaded[arm][1]
            result["decode_tok_s"] = batch / statistics.median(result["step_s"])
            result["decode_cpu_tok_s"] = batch / statistics.median(result["cpu_s"])
            result["prefill_tok_s"] = batch * a.prompt_len / result["prefill_s"]
            result["prefill_cpu_tok_s"] = batch * a.prompt_len / result["prefill_cpu_s"]
            results[arm].append(result)
    return results


def worker(arm: str, a: argparse.Namespace) -> dict[str, float]:
    """One arm's measurement in this process: a warm-up run, then the medians of ``--runs`` runs."""
    backend, batch = _load(arm, a.threads, a.batch)
    runs = [_once(backend, batch, a.prompt_len, a.gen_len) for _ in range(1 + a.runs)][1:]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _measure(arm: str, a: argparse.Namespace) -> dict[str, float]:
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--batch", str(a.batch)]
    args += ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--runs", str(a.runs)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def in_processes(a: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Each arm in its own process per round (thread pools never compete; slower, noisier ratios)."""
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in a.arms}
    for r, order in enumerate(_rotations(a.arms, a.rounds)):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        for arm in order:
            results[arm].append(_measure(arm, a))
    return results


def _report(arms: list[str], results: dict[str, list[dict[str, Any]]], a: argparse.Namespace) -> None:
    print(
        f"batch {a.batch}, prompt {a.prompt_len}, generate {a.gen_len}, threads {a.threads or 'default'}, "
        f"{a.rounds} rounds (ratios to the first arm per round; > 1: faster)"
    )
    base = results[arms[0]]
    for key in ("decode_tok_s", "decode_cpu_tok_s", "prefill_tok_s", "prefill_cpu_tok_s"):
        if key not in base[0]:
            continue
        print(f"\n{key}")
        for arm in arms:
            values = [r[key] for r in results[arm]]
            ratios = [v / b[key] for v, b in zip(values, base, strict=True)]
            per_round = ", ".join(f"{r:.2f}" for r in ratios)
            print(f"  {arm:<60} {statistics.median(values):9.1f}  ratio {statistics.median(ratios):.3f} ({per_round})")


def main(argv: list[str] | None = None) -> int:
    """Parse, run the rounds, print the report (and the raw results with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arms", nargs="*")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--runs", type=int, default=2, help="runs per arm and round with --processes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--processes", action="store_true", help="run each arm in its own process per round")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return 0
    results = in_processes(a) if a.processes else interleaved(a)
    _report(a.arms, results, a)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
