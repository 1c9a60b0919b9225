"""A/B rounds of stlm packages and ONNX Runtime session settings: decode and prefill speed as ratios.

Each arm is a package, optionally with settings after ``@`` (``batch=N`` overrides ``--batch``;
session settings: ``intra=N``, ``inter=N``, ``opt=basic|extended|all``, ``seq=0`` for parallel
execution, and any ONNX Runtime session config entry such as
``session.intra_op.allow_spinning=0``), for example::

    .venv/bin/python benchmarks/ab_packages.py PKG PKG@session.intra_op.allow_spinning=0 --threads 2
    .venv/bin/python benchmarks/ab_packages.py int4-b32 int4-b64 int4-b128 --rounds 5
    .venv/bin/python benchmarks/ab_packages.py PKG PKG@batch=8      # batch-8 vs batch-1 throughput

Every round runs each arm once, in its own process (so thread pools never compete), in an order
that rotates from round to round; each run is the runtime's own benchmark loop
(:func:`stlm.runtime.bench`: warm-up, then a prefill and greedy decode, medians over ``--runs``).
The report gives per-round ratios to the first arm and their medians — the only numbers that mean
much on a shared, noisy machine — plus the medians of the tokens/s themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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


def worker(arm: str, batch: int, prompt_len: int, gen_len: int, runs: int, threads: int | None) -> dict[str, float]:
    """One arm's measurement (in this process): TTFT, prefill and decode tok/s, ms per decode step."""
    import onnxruntime as ort

    from stlm.runtime.bench import _timed_run
    from stlm.runtime.generator import Generator

    package, _, spec = arm.partition("@")
    settings = dict(item.split("=", 1) for item in spec.split(",") if item)
    batch = int(settings.pop("batch", batch))
    backend: Any = Generator.load(package, device="cpu", threads=threads).backend
    if settings:
        options = _session_options(settings, threads)
        path = str(Path(package) / backend.manifest.graph)
        backend.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    prompts = np.random.default_rng(0).integers(3, 50000, (batch, prompt_len)).tolist()
    measured = [_timed_run(backend, prompts, gen_len) for _ in range(1 + runs)][1:]
    steps = [t for _, _, s in measured for t in s]
    return {
        "ttft_ms": 1000.0 * statistics.median(first for first, _, _ in measured),
        "prefill_tok_s": statistics.median(batch * prompt_len / first for first, _, _ in measured),
        "decode_tok_s": statistics.median(batch * (gen_len - 1) / decode for _, decode, _ in measured),
        "step_ms": 1000.0 * statistics.median(steps),
    }


def _measure(arm: str, a: argparse.Namespace) -> dict[str, float]:
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--batch", str(a.batch)]
    args += ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--runs", str(a.runs)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _report(arms: list[str], results: dict[str, list[dict[str, float]]], a: argparse.Namespace) -> None:
    print(
        f"batch {a.batch}, prompt {a.prompt_len}, generate {a.gen_len}, threads {a.threads or 'default'}, "
        f"{a.rounds} rounds (ratios to the first arm per round; > 1: faster)"
    )
    base = results[arms[0]]
    for key in ("decode_tok_s", "prefill_tok_s"):
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.batch, a.prompt_len, a.gen_len, a.runs, a.threads)))
        return 0
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in a.arms}
    for r in range(a.rounds):
        order = a.arms[r % len(a.arms) :] + a.arms[: r % len(a.arms)]
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        for arm in order:
            results[arm].append(_measure(arm, a))
    _report(a.arms, results, a)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
