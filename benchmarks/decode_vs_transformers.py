"""stlm vs transformers `generate` on the same weights, back to back, with the read-bandwidth floor.

    .venv/bin/python benchmarks/decode_vs_transformers.py [--checkpoint DIR | --preset medium]
        [--prompt-len 128] [--gen-len 64] [--rounds 3] [--quantize int4] [--context-scaling] [--profile]
        [--ttft 512,2048] [--reuse]

Builds the checkpoint (default: the 'medium' preset — hidden 1024, 8 layers, 16 heads, vocab
50304 — random weights) unless one is given, exports it (fp32, in-place KV cache), then alternates
stlm and transformers runs (each in its own process, so thread pools never compete) and prints
medians and ratios. The floor is (weight bytes read per decoded token) / (read bandwidth measured
in the same run: a thread per core streams its slice of a 1 GiB buffer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stlm.assets import NEOX_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
NEOX = NEOX_TOKENIZER  # bundled with stlm


def hf_worker(checkpoint: str, prompt_len: int, gen_len: int) -> dict[str, float]:
    """transformers fp32 generate: time to first token and decode tok/s (greedy, fixed length)."""
    import torch
    from transformers import StableLmForCausalLM

    model = StableLmForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(3, 50000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kwargs)
        t2 = time.perf_counter()
    ttft = t1 - t0
    return {"ttft_ms": ttft * 1000, "decode_tok_s": (gen_len - 1) / ((t2 - t1) - ttft)}


def bandwidth_worker(gib: float = 1.0) -> dict[str, float]:
    """Read bandwidth (GB/s): one thread per core takes the max of its slice of a buffer far larger
    than the caches (a vectorised pure read; numpy releases the GIL)."""
    import os
    import threading

    import numpy as np

    data = np.ones(int(gib * 2**30 / 4), np.float32)
    parts = np.array_split(data, os.cpu_count() or 1)
    times = []
    for _ in range(7):
        threads = [threading.Thread(target=part.max) for part in parts]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        times.append(time.perf_counter() - t)
    return {"read_gb_s": data.nbytes / statistics.median(times[2:]) / 1e9}


def weight_bytes_per_token(package: Path) -> int:
    """Bytes of initializers a decode step reads (all but the embedding table: one row is gathered)."""
    import onnx

    model = onnx.load(str(package / "model.onnx"), load_external_data=False)
    sizes = {1: 4, 10: 2, 16: 2, 7: 8, 6: 4, 2: 1, 3: 1}
    total = 0
    for t in model.graph.initializer:
        if t.name != "model.embed_tokens.weight":
            count = 1
            for d in t.dims:
                count *= d
            total += count * sizes.get(t.data_type, 4)
    return total


def profile_decode(package: Path, steps: int = 16) -> list[tuple[str, float]]:
    """Share of decode-step time per ONNX op type (ONNX Runtime's profiler)."""
    import numpy as np
    import onnxruntime as ort

    from stlm.package.manifest import read_manifest
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(package, read_manifest(package))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "stlm_profile")
    backend.session = ort.InferenceSession(str(package / "model.onnx"), options, providers=["CPUExecutionProvider"])
    cache = backend.new_cache(1, 128 + steps)
    logits = backend.forward(cache, [list(range(100, 228))])
    for _ in range(steps):
        logits = backend.forward(cache, [[int(np.argmax(logits[0]))]])
    events = json.loads(Path(backend.session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    by_op: dict[str, float] = {}
    for e in events:  # kernels of the decode runs (the first run is the prefill)
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[1]:
            op = e["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values())
    return sorted(((op, dur / total) for op, dur in by_op.items()), key=lambda kv: -kv[1])


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stlm_bench(package: Path, prompt_len: int, gen_len: int) -> dict:
    return _run(
        [
            "-m",
            "stlm",
            "-q",
            "bench",
            str(package),
            "--prompt-len",
            str(prompt_len),
            "--gen-len",
            str(gen_len),
            "--runs",
            "3",
            "--json",
        ]
    )


def ttft_lockstep(checkpoint: Path, package: Path, lengths: list[int], rounds: int) -> None:
    """TTFT of stlm and transformers in one process, one thread each, alternating prefill by prefill;
    wall and CPU time of the calling thread (both compute in it with one thread), medians of ratios."""
    import numpy as np
    import torch
    from transformers import StableLmForCausalLM

    from stlm.runtime.generator import Generator

    torch.set_num_threads(1)
    model = StableLmForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    backend = Generator.load(package, device="cpu", threads=1).backend

    def hf(ids: list[int]) -> None:
        with torch.inference_mode():
            model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    def ours(ids: list[int]) -> None:
        backend.forward(backend.new_cache(1, len(ids) + 1), [ids])

    for length in lengths:
        ids = np.random.default_rng(0).integers(3, 50000, length).tolist()
        times: dict[str, list[tuple[float, float]]] = {"stlm": [], "transformers": []}
        for r in range(rounds + 1):  # round 0: warm-up
            for name, fn in (("stlm", ours), ("transformers", hf))[:: 1 if r % 2 else -1]:
                wall, cpu = time.perf_counter(), time.thread_time()
                fn(ids)
                if r:
                    times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
        for i, kind in enumerate(("wall", "CPU")):
            s_ms = [t[i] * 1000 for t in times["stlm"]]
            h_ms = [t[i] * 1000 for t in times["transformers"]]
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(s_ms, h_ms, strict=True))
            print(
                f"TTFT {length} tokens, 1 thread, {kind}: stlm {statistics.median(s_ms):.0f} ms, transformers "
                f"{statistics.median(h_ms):.0f} ms, ratio {statistics.median(a / b for a, b in zip(s_ms, h_ms, strict=True)):.2f} "
                f"({ratios})"
            )


def _ttft_rounds(me: list[str], checkpoint: Path, packages: dict[str, Path], lengths: list[int], rounds: int) -> None:
    """Time to first token of each package and of transformers at each prompt length, alternating."""
    for length in lengths:
        ttft: dict[str, list[float]] = {name: [] for name in [*packages, "transformers"]}
        for r in range(rounds):
            print(f"TTFT {length}: round {r + 1}/{rounds}", file=sys.stderr)
            for name, pkg in packages.items():
                ttft[name].append(_stlm_bench(pkg, length, 2)["ttft_ms"])
            hf = [*me, "--worker", "hf", "--checkpoint", str(checkpoint), "--prompt-len", str(length)]
            ttft["transformers"].append(_run([*hf, "--gen-len", "2"])["ttft_ms"])
        hf_ms = ttft["transformers"]
        print(f"time to first token, {length}-token prompt (ms, medians; ratio stlm / transformers, < 1: faster):")
        print(f"  transformers {statistics.median(hf_ms):8.0f}")
        for name in packages:
            ratios = [s / h for s, h in zip(ttft[name], hf_ms, strict=True)]
            per_round = ", ".join(f"{x:.2f}" for x in ratios)
            print(
                f"  stlm {name:<7} {statistics.median(ttft[name]):8.0f}  ratio {statistics.median(ratios):.2f} ({per_round})"
            )


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--preset", default="medium")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stlm-bench")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--context-scaling", action="store_true", help="also decode at context 64 vs 2048")
    p.add_argument("--ttft", metavar="LENGTHS", help="also time to first token at these prompt lengths (e.g. 512,2048)")
    p.add_argument("--reuse", action="store_true", help="reuse the packages already exported in --workdir")
    p.add_argument(
        "--lockstep", action="store_true", help="with --ttft: only TTFT, both in one process, 1 thread, alternating"
    )
    p.add_argument("--profile", action="store_true", help="op-type breakdown of decode steps")
    p.add_argument("--worker", choices=["hf", "bandwidth"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "hf":
        print(json.dumps(hf_worker(str(a.checkpoint), a.prompt_len, a.gen_len)))
        return
    if a.worker == "bandwidth":
        print(json.dumps(bandwidth_worker()))
        return

    sys.path.insert(0, str(ROOT))
    from stlm.export.onnx_export import export_onnx
    from stlm.testing import write_random_checkpoint

    a.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = a.checkpoint or a.workdir / f"checkpoint-{a.preset}"
    if not (checkpoint / "config.json").is_file():
        print(f"building a random '{a.preset}' checkpoint in {checkpoint}", file=sys.stderr)
        write_random_checkpoint(checkpoint, shape=a.preset, tokenizer=NEOX if NEOX.is_file() else None)
    packages = {}
    for name in ["fp32", *([a.quantize] if a.quantize else [])]:
        out = a.workdir / f"pkg-{name}"
        quantize = None if name == "fp32" else name
        reuse = a.reuse and (out / "stlm.json").is_file()
        packages[name] = out if reuse else export_onnx(checkpoint, out, quantize=quantize, overwrite=True)
    if a.ttft and a.lockstep:
        ttft_lockstep(checkpoint, packages["fp32"], [int(n) for n in a.ttft.split(",")], a.rounds)
        return
    me = [str(Path(__file__).resolve())]
    results: dict[str, list[dict]] = {k: [] for k in [*packages, "transformers", "bandwidth"]}
    for r in range(a.rounds):  # alternate A/B/... so machine noise hits every side alike
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        results["bandwidth"].append(_run([*me, "--worker", "bandwidth"]))
        for name, pkg in packages.items():
            results[name].append(_stlm_bench(pkg, a.prompt_len, a.gen_len))
        results["transformers"].append(
            _run(
                [
                    *me,
                    "--worker",
                    "hf",
                    "--checkpoint",
                    str(checkpoint),
                    "--prompt-len",
                    str(a.prompt_len),
                    "--gen-len",
                    str(a.gen_len),
                ]
            )
        )

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    bw = med("bandwidth", "read_gb_s")
    hf_tok_s, hf_ttft = med("transformers", "decode_tok_s"), med("transformers", "ttft_ms")
    print(
        f"\ncheckpoint {checkpoint}  prompt {a.prompt_len}  generate {a.gen_len}  batch 1  "
        f"({a.rounds} alternating rounds, medians)"
    )
    print(f"read bandwidth (max over 1 GiB, a thread per core): {bw:.1f} GB/s")
    print(f"{'':14}{'decode tok/s':>14}{'ms/token':>10}{'TTFT ms':>10}{'vs HF':>8}{'floor ms':>10}{'of floor':>10}")
    print(f"{'transformers':14}{hf_tok_s:14.1f}{1000 / hf_tok_s:10.2f}{hf_ttft:10.1f}{1.0:8.2f}")
    for name, pkg in packages.items():
        tok_s = med(name, "decode_tok_s")
        floor_ms = weight_bytes_per_token(pkg) / (bw * 1e9) * 1000
        print(
            f"{'stlm ' + name:14}{tok_s:14.1f}{1000 / tok_s:10.2f}{med(name, 'ttft_ms'):10.1f}"
            f"{tok_s / hf_tok_s:8.2f}{floor_ms:10.2f}{floor_ms * tok_s / 1000:10.0%}"
        )
    if a.ttft:
        _ttft_rounds(me, checkpoint, packages, [int(n) for n in a.ttft.split(",")], a.rounds)
    if a.context_scaling:
        short = [_stlm_bench(packages["fp32"], 64, 32)["token_ms_p50"] for _ in range(3)]
        long = [_stlm_bench(packages["fp32"], 2048, 32)["token_ms_p50"] for _ in range(3)]
        print(
            f"decode ms/token at context 64: {statistics.median(short):.2f}, at 2048: "
            f"{statistics.median(long):.2f} (ratio {statistics.median(long) / statistics.median(short):.2f})"
        )
    if a.profile:
        print("decode step, share of kernel time by op type (fp32):")
        for op, share in profile_decode(packages["fp32"])[:8]:
            print(f"  {op:24} {share:6.1%}")


if __name__ == "__main__":
    main()
