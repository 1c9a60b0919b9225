"""Where a decode step's time goes: ONNX Runtime's per-op profile of an stlm package.

Loads the package with the runtime's own backend, swaps in a session opened with the same options
plus ``enable_profiling``, prefills a fixed random prompt and decodes greedily. From ONNX Runtime's
profile (its JSON trace) it sums each node's kernel time over the decode steps and groups it:
MatMulNBits / MatMul by weight (qkv, o, gate_up, down, lm_head), GroupQueryAttention,
LayerNormalization, the rest by op type. "session overhead" is ``model_run`` minus the kernels
(ONNX Runtime's executor, fences, allocation); "host" is the wall time of ``backend.forward`` minus
``model_run`` (Python, IOBinding, input arrays, the logits copy).

The machine is shared and noisy: read the shares (percentages), not the absolute milliseconds,
and compare packages in the same run.

``--prefill`` also breaks down the prefill of the ``--prompt-len`` prompt (one run).

Run: ``.venv/bin/python benchmarks/profile_decode.py PKG [PKG ...] [--steps 32] [--threads 1] [--batch 8] [--prefill]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import stlm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from stlm.runtime.generator import Generator  # noqa: E402
from stlm.runtime.ort_session import SESSION_CONFIG  # noqa: E402

WEIGHT_GROUPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def _weight_groups(model_path: Path) -> dict[str, str]:
    """Node name → 'MatMulNBits qkv_proj' etc. for the linear layers of the graph."""
    model = onnx.load(str(model_path), load_external_data=False)
    groups = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits") and len(node.input) > 1:
            part = next((w for w in WEIGHT_GROUPS if w in node.input[1]), None)
            if part:
                groups[node.name] = f"{node.op_type} {part}"
    return groups


def _profiled_backend(package: Path, threads: int | None, folder: Path) -> Any:
    backend: Any = Generator.load(package, device="cpu", threads=threads).backend
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    backend.session = ort.InferenceSession(
        str(package / backend.manifest.graph), options, providers=["CPUExecutionProvider"]
    )
    return backend


def _run(backend: Any, prompt_len: int, steps: int, batch: int) -> list[float]:
    """Prefill then ``steps`` greedy decode steps; the wall seconds of each ``forward`` (prefill first)."""
    prompt = np.random.default_rng(0).integers(3, 50000, (batch, prompt_len)).tolist()
    cache = backend.new_cache(batch, prompt_len + steps + 1)
    walls = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        token = backend.forward(cache, prompt).argmax(axis=-1)
        walls.append(time.perf_counter() - start)
        prompt = token[:, None].tolist()
    return walls


def _parts(run: dict[str, Any], kernels: list[dict[str, Any]], groups: dict[str, str]) -> dict[str, float]:
    """Milliseconds of one ``model_run`` by group, and the session overhead (the run minus its kernels)."""
    lo, hi = run["ts"], run["ts"] + run["dur"]
    sums: dict[str, float] = defaultdict(float)
    for e in kernels:
        if lo <= e["ts"] <= hi:
            node = re.sub("_kernel_time$", "", e["name"])
            sums[groups.get(node, e["args"].get("op_name", "?"))] += e["dur"] / 1000.0
    sums["session overhead"] = run["dur"] / 1000.0 - sum(sums.values())
    return sums


def _summarize(trace: list[dict[str, Any]], groups: dict[str, str], walls: list[float]) -> dict[str, Any]:
    """Per-group milliseconds of the decode steps (medians of the per-step sums) and of the prefill."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[-len(walls) :]
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    parts = [_parts(run, kernels, groups) for run in runs]
    for part, run, wall in zip(parts, runs, walls, strict=True):
        part["host (Python, IOBinding)"] = wall * 1000.0 - run["dur"] / 1000.0
    per_step: dict[str, list[float]] = defaultdict(list)
    for part in parts[1:]:
        for key, value in part.items():
            per_step[key].append(value)
    return {
        "step_ms": float(np.median(walls[1:])) * 1000.0,
        "parts_ms": {k: float(np.median(v)) for k, v in sorted(per_step.items(), key=lambda kv: -np.median(kv[1]))},
        "prefill_ms": walls[0] * 1000.0,
        "prefill_parts_ms": dict(sorted(parts[0].items(), key=lambda kv: -kv[1])),
    }


def profile(package: Path, prompt_len: int, steps: int, threads: int | None, batch: int = 1) -> dict[str, Any]:
    """The decode profile of ``package`` (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = _profiled_backend(package, threads, Path(tmp))
        _run(backend, prompt_len, 4, batch)  # warm-up
        walls = _run(backend, prompt_len, steps, batch)
        trace = json.loads(Path(backend.session.end_profiling()).read_text())
    return _summarize(trace, _weight_groups(package / backend.manifest.graph), walls)


def _print(name: str, what: str, total_ms: float, parts: dict[str, float]) -> None:
    print(f"\n{name}: {what} {total_ms:.2f} ms (wall of backend.forward; parts sum to {sum(parts.values()):.2f})")
    for part, ms in parts.items():
        print(f"  {part:<28} {ms:9.3f} ms  {100.0 * ms / total_ms:5.1f} %")


def main(argv: list[str] | None = None) -> int:
    """Profile each package and print a table of per-step milliseconds and shares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", type=Path, nargs="+")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--prefill", action="store_true", help="also print the prefill's profile")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    results = {str(p): profile(p, args.prompt_len, args.steps, args.threads, args.batch) for p in args.packages}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for name, result in results.items():
        _print(name, "decode step median", result["step_ms"], result["parts_ms"])
        if args.prefill:
            _print(name, f"prefill of {args.prompt_len} tokens", result["prefill_ms"], result["prefill_parts_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
