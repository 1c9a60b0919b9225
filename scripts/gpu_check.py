"""The GPU acceptance run of stlm: every GPU path, one command, a summary table.

Each step passes, fails or is skipped with the reason; a step whose input failed is skipped. Steps:

  environment      GPU, driver, CUDA, TensorRT, ONNX Runtime, Triton, torch versions; fails on a
                   broken environment (two ONNX Runtime builds, a driver too old for CUDA 13)
  triton-kernel    the partial_rotary Triton kernel and its AOT PTX on CUDA vs the numpy reference
                   at StableLM-3B shapes (scripts/gpu_kernel_check.py; needs torch with CUDA)
  checkpoint       a tiny random StableLM checkpoint (stlm make-checkpoint; no download)
  reference        its fp32 ONNX package checked against transformers, logits saved
                   (stlm verify --save-reference): what the engines and GPU packages are verified against
  trt-*            with TensorRT: stlm export --target tensorrt (fp16/bf16 x plugin/native rotary),
                   stlm build-engine, stlm verify REFERENCE ENGINE; then stlm bench of one engine
  pytest-gpu       python -m pytest -m gpu (the TensorRT engine and kernel tests)
  ort-cuda-*       with onnxruntime-gpu: ONNX packages fp32/fp16/bf16 on the CUDA backend:
                   stlm verify REFERENCE PACKAGE, stlm bench (which must report the CUDA backend)
  full-*           --full only: the same for a full-size random StableLM-3B checkpoint (export,
                   build, verify, bench at batch 1 and 4): the numbers for the README's GPU section

Bounded: every command has a timeout and the run stops starting steps when its budget is spent
(600 s by default: within 10 minutes on one GPU; 3600 s with --full). Never uses the network
(HF_HUB_OFFLINE=1; checkpoints are generated locally). Exit status 0 when nothing failed (with
--strict: nothing failed or was skipped), 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, os, shutil, subprocess, sys
facts = {"python": sys.version.split()[0]}
def attempt(key, fn):
    try:
        facts[key] = fn()
    except BaseException as exc:  # a broken install must not stop the probe
        facts[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
def smi():
    if not shutil.which("nvidia-smi"):
        raise RuntimeError("nvidia-smi not found")
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
attempt("gpus", smi)
def torch_facts():
    import torch
    cuda = torch.cuda.is_available()
    return {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else None}
attempt("torch", torch_facts)
attempt("triton", lambda: __import__("triton").__version__)
attempt("tensorrt", lambda: __import__("tensorrt").__version__)
attempt("transformers", lambda: __import__("transformers").__version__)
def ort():
    import onnxruntime
    return {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
attempt("onnxruntime", ort)
from stlm.support import gpu_env
def conflict():
    problem = gpu_env.onnxruntime_conflict(gpu_env.installed_distributions())
    return problem and problem.problem
attempt("ort_conflict", conflict)
def cuda():
    from cuda.bindings import runtime as rt
    problem = gpu_env.probe_cuda_driver(rt)
    driver, runtime = rt.cudaDriverGetVersion()[1], rt.cudaRuntimeGetVersion()[1]
    return {"driver": gpu_env.cuda_version_text(int(driver)), "runtime": gpu_env.cuda_version_text(int(runtime)),
            "problem": problem and f"{problem.problem} (fix: {problem.fix})"}
attempt("cuda", cuda)
print(json.dumps(facts))
"""


@dataclass
class Step:
    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float = 0.0


@dataclass
class Run:
    """The steps run so far, the work folder and the time budget."""

    work: Path
    deadline: float
    python: str = sys.executable
    steps: list[Step] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    log_copy: Path | None = None  # where the log is copied when the work folder is removed

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, status: str, detail: str, seconds: float = 0.0) -> bool:
        self.steps.append(Step(name, status, detail.strip().replace("\n", " ")[:240], seconds))
        print(f"[gpu_check] {name}: {status.upper()} ({seconds:.1f}s) {detail.strip()[:400]}", flush=True)
        return status == "pass"

    def status(self, name: str) -> str | None:
        return next((s.status for s in self.steps if s.name == name), None)

    def step(self, name: str, needs: list[str], run: Callable[[], tuple[str, str]], skip: str | None = None) -> bool:
        """Run ``run`` unless ``skip`` is given, a needed step did not pass, or the budget is spent."""
        missing = [n for n in needs if self.status(n) != "pass"]
        if skip is not None:
            return self.record(name, "skip", skip)
        if missing:
            return self.record(name, "skip", f"needs {', '.join(missing)}, which did not pass")
        if self.left() < 5:
            return self.record(name, "skip", "time budget spent (--budget)")
        start = time.monotonic()
        try:
            status, detail = run()
        except subprocess.TimeoutExpired as exc:
            status, detail = "fail", f"timed out after {exc.timeout:.0f}s: {' '.join(map(str, exc.cmd))[:200]}"
        return self.record(name, status, detail, time.monotonic() - start)

    def cmd(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a command (``stlm ...`` = this interpreter's stlm) within the budget; output kept in the log."""
        argv = [self.python, "-m", "stlm", *args[1:]] if args[0] == "stlm" else args
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=max(1.0, min(timeout, self.left())),
                              cwd=ROOT, check=False)  # fmt: skip
        with (self.work / "gpu_check.log").open("a") as log:
            log.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode}]\n")
        return proc


def failed(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
    return "fail", f"exit {proc.returncode}: {' | '.join(tail)}"


def simple(run: Run, args: list[str], timeout: float, ok: str = "") -> Callable[[], tuple[str, str]]:
    """A step that passes when the command exits 0 (detail: ``ok``, else its last line of output)."""

    def go() -> tuple[str, str]:
        proc = run.cmd(args, timeout)
        if proc.returncode != 0:
            return failed(proc)
        last = proc.stdout.strip().splitlines()[-1:]
        return "pass", ok or (last[0] if last else "")

    return go


def verify(run: Run, reference: Path, package: Path, timeout: float = 240) -> Callable[[], tuple[str, str]]:
    def go() -> tuple[str, str]:
        proc = run.cmd(["stlm", "verify", str(reference), str(package), "--json"], timeout)
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return failed(proc)
        checks = "; ".join(f"{c['output']} {c['value']:.4g} (limit {c['limit']:.4g})" for c in report["checks"])
        return ("pass" if report["passed"] else "fail"), f"{report['description']}: {checks}"

    return go


def bench(run: Run, package: Path, *, backend: str, batch: int = 1, prompt: int = 64, gen: int = 32,
          timeout: float = 240) -> Callable[[], tuple[str, str]]:  # fmt: skip
    def go() -> tuple[str, str]:
        args = ["stlm", "bench", str(package), "--batch", str(batch), "--prompt-len", str(prompt),
                "--gen-len", str(gen), "--runs", "3", "--json"]  # fmt: skip
        proc = run.cmd(args, timeout)
        if proc.returncode != 0:
            return failed(proc)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        run.outputs[f"bench {package.name} b{batch}"] = r
        text = (f"{r['backend']} batch {batch}, prompt {prompt}: ttft {r['ttft_ms']:.1f} ms, prefill "
                f"{r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.0f} tok/s (p50 {r['token_ms_p50']:.2f} ms)")  # fmt: skip
        return ("pass" if backend in r["backend"] else "fail"), text + ("" if backend in r["backend"] else
                f" -- expected the {backend} backend")  # fmt: skip

    return go


def environment(run: Run) -> dict[str, Any]:
    """Probe the environment (in a child process: a broken CUDA install cannot take this run down)."""
    facts: dict[str, Any] = {}

    def go() -> tuple[str, str]:
        proc = run.cmd([run.python, "-c", PROBE], 120)
        if proc.returncode != 0:
            return failed(proc)
        facts.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        torch = facts.get("torch") or {}
        ort = facts.get("onnxruntime") or {}
        cuda = facts.get("cuda") or {}
        gpus = facts.get("gpus") or []
        parts = [
            f"GPU {', '.join(g[0] + ' (sm ' + g[2] + ')' for g in gpus) or 'none: ' + facts.get('gpus_error', '')}",
            f"driver {gpus[0][1] if gpus else '-'} (CUDA {cuda.get('driver', '-')}), cuda-python runtime "
            f"{cuda.get('runtime', 'absent')}",
            f"TensorRT {facts.get('tensorrt', 'absent')}",
            f"onnxruntime {ort.get('version', 'absent')} {'+CUDA' if 'CUDAExecutionProvider' in ort.get('providers', []) else 'CPU'}",
            f"triton {facts.get('triton', 'absent')}, torch {torch.get('version', 'absent')} (CUDA {torch.get('cuda_build')})",
        ]  # fmt: skip
        problems = [p for p in (facts.get("ort_conflict"), cuda.get("problem")) if p]
        return ("fail" if problems else "pass"), "; ".join(problems + parts)

    run.step("environment", [], go)
    return facts


def reference_steps(run: Run, *, preset: str, name: str, lanes: list[str]) -> tuple[Path, Path]:
    """A random checkpoint and a reference saved from its verified ONNX package."""
    ckpt, package, ref = run.work / f"{name}-checkpoint", run.work / f"{name}-onnx-ref", run.work / f"{name}-ref.json"
    skip = None if lanes else "no GPU lane needs it (no TensorRT, no onnxruntime-gpu CUDA provider)"
    dtype = "bfloat16" if preset == "stablelm-3b-4e1t" else "float32"
    run.step(f"{name}-checkpoint", [], simple(run, ["stlm", "make-checkpoint", str(ckpt), "--preset", preset,
             "--dtype", dtype], 900), skip=skip)  # fmt: skip
    ref_dtype = "fp16" if preset == "stablelm-3b-4e1t" else "fp32"  # a 3B fp32 graph would need 11 GB more disk
    run.step(f"{name}-reference-export", [f"{name}-checkpoint"], simple(run, ["stlm", "export", str(ckpt), "-o",
             str(package), "--dtype", ref_dtype, "--kv-cache", "concat"], 1200), skip=skip)  # fmt: skip
    run.step(f"{name}-reference", [f"{name}-reference-export"], simple(run, ["stlm", "verify", str(ckpt),
             str(package), "--save-reference", str(ref)], 1200, ok=f"saved {ref.name}"), skip=skip)  # fmt: skip
    return ckpt, ref


def tensorrt_steps(run: Run, ckpt: Path, ref: Path, name: str, variants: list[tuple[str, str]], skip: str | None,
                   build_args: list[str]) -> list[Path]:  # fmt: skip
    """export --target tensorrt, build-engine and verify for each (dtype, rotary)."""
    engines = []
    for dtype, rotary in variants:
        tag = f"{name}-trt-{dtype}-{rotary}"
        onnx_dir, engine = run.work / f"{tag}-onnx", run.work / f"{tag}-engine"
        run.step(f"{tag}-export", [f"{name}-checkpoint"], simple(run, ["stlm", "export", str(ckpt), "-o",
                 str(onnx_dir), "--dtype", dtype, "--target", "tensorrt", "--rotary", rotary], 1200), skip=skip)  # fmt: skip
        run.step(f"{tag}-build", [f"{tag}-export"], simple(run, ["stlm", "build-engine", str(onnx_dir), "-o",
                 str(engine), "--timing-cache", str(run.work / "timing.cache"), *build_args], 1800), skip=skip)  # fmt: skip
        run.step(f"{tag}-verify", [f"{tag}-build", f"{name}-reference"], verify(run, ref, engine), skip=skip)
        engines.append(engine)
    return engines


def ort_cuda_steps(run: Run, ckpt: Path, ref: Path, name: str, variants: list[tuple[str, str]], skip: str | None,
                   bench_shapes: list[tuple[int, int, int]]) -> None:  # fmt: skip
    """Export ONNX packages and run them on the CUDA backend: verify and bench."""
    for dtype, kv in variants:
        tag = f"{name}-ort-cuda-{dtype}-{kv}"
        package = run.work / f"{tag}-onnx"
        run.step(f"{tag}-export", [f"{name}-checkpoint"], simple(run, ["stlm", "export", str(ckpt), "-o",
                 str(package), "--dtype", dtype, "--kv-cache", kv], 1200), skip=skip)  # fmt: skip
        run.step(f"{tag}-verify", [f"{tag}-export", f"{name}-reference"], verify(run, ref, package), skip=skip)
        for batch, prompt, gen in bench_shapes:
            run.step(f"{tag}-bench-b{batch}", [f"{tag}-export"], bench(run, package, backend="cuda", batch=batch,
                     prompt=prompt, gen=gen), skip=skip)  # fmt: skip


def lanes_of(facts: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """Why each GPU lane is skipped (None: it runs): Triton, TensorRT, ONNX Runtime CUDA."""
    torch = facts.get("torch") or {}
    has_gpu = bool(facts.get("gpus")) or bool(torch.get("cuda_available"))
    no_gpu = f"no NVIDIA GPU visible ({facts.get('gpus_error', 'nvidia-smi lists none')})"
    if torch.get("cuda_available"):
        triton = None if "triton" in facts else f"triton is not importable ({facts.get('triton_error')})"
    else:
        why = (
            facts.get("torch_error")
            or f"torch {torch.get('version')} has no usable CUDA (build: {torch.get('cuda_build')})"
        )
        triton = f"torch.cuda is not available: {why}"  # fmt: skip
    trt = no_gpu if not has_gpu else (None if "tensorrt" in facts else
          f"TensorRT is not importable ({facts.get('tensorrt_error')}); pip install 'stlm[gpu]'")  # fmt: skip
    providers = (facts.get("onnxruntime") or {}).get("providers", [])
    ort = no_gpu if not has_gpu else (None if "CUDAExecutionProvider" in providers else
          f"onnxruntime has no CUDA provider ({providers}); install onnxruntime-gpu (docs/tensorrt.md)")  # fmt: skip
    return triton, trt, ort


def quick_run(run: Run, facts: dict[str, Any]) -> None:
    triton_skip, trt_skip, ort_skip = lanes_of(facts)
    kernel = [run.python, str(ROOT / "scripts" / "gpu_kernel_check.py"), "--quick"]
    run.step("triton-kernel", [], simple(run, kernel, 300, ok="kernel and AOT PTX match the reference"),
             skip=triton_skip)  # fmt: skip
    lanes = [n for n, s in (("tensorrt", trt_skip), ("ort-cuda", ort_skip)) if s is None]
    ckpt, ref = reference_steps(run, preset="tiny-hd64", name="tiny", lanes=lanes)
    variants = [(d, r) for d in ("fp16", "bf16") for r in ("plugin", "native")]
    engines = tensorrt_steps(run, ckpt, ref, "tiny", variants, trt_skip, ["--max-batch", "2", "--max-seq-len",
                             "256", "--prefill-chunk", "64", "--builder-optimization-level", "1"])  # fmt: skip
    run.step("tiny-trt-bench", ["tiny-trt-fp16-plugin-build"], bench(run, engines[0], backend="tensorrt"),
             skip=trt_skip)  # fmt: skip
    pytest = [run.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(ROOT / "tests")]
    gpu_skip = trt_skip if triton_skip and trt_skip else None
    run.step("pytest-gpu", [], simple(run, pytest, 300), skip=gpu_skip)
    ort_variants = [("fp32", "inplace"), ("fp16", "inplace"), ("bf16", "concat"), ("bf16", "inplace")]
    ort_cuda_steps(run, ckpt, ref, "tiny", ort_variants, ort_skip, [(1, 64, 32)])


def full_run(run: Run, facts: dict[str, Any]) -> None:
    _, trt_skip, ort_skip = lanes_of(facts)
    lanes = [n for n, s in (("tensorrt", trt_skip), ("ort-cuda", ort_skip)) if s is None]
    ckpt, ref = reference_steps(run, preset="stablelm-3b-4e1t", name="full", lanes=lanes)
    engines = tensorrt_steps(run, ckpt, ref, "full", [("fp16", "plugin")], trt_skip,
                             ["--max-batch", "4", "--max-seq-len", "4096"])  # fmt: skip
    for batch, prompt, gen in ((1, 128, 64), (4, 512, 128)):
        run.step(f"full-trt-bench-b{batch}", ["full-trt-fp16-plugin-build"], bench(run, engines[0],
                 backend="tensorrt", batch=batch, prompt=prompt, gen=gen, timeout=600), skip=trt_skip)  # fmt: skip
    ort_cuda_steps(run, ckpt, ref, "full", [("fp16", "inplace")], ort_skip, [(1, 128, 64), (4, 512, 128)])


def summary(run: Run, strict: bool) -> int:
    width = max(len(s.name) for s in run.steps)
    lines = [f"{'step':<{width}}  result  {'time':>7}  detail", "-" * (width + 60)]
    lines += [f"{s.name:<{width}}  {s.status:<6}  {s.seconds:6.1f}s  {s.detail}" for s in run.steps]
    counts = {k: sum(s.status == k for s in run.steps) for k in ("pass", "fail", "skip")}
    bad = counts["fail"] + (counts["skip"] if strict else 0)
    lines.append(f"summary: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
                 f" -> {'FAILED' if bad else 'OK'} (log: {run.log_copy or run.work / 'gpu_check.log'})")  # fmt: skip
    print("\n" + "\n".join(lines), flush=True)
    return 1 if bad else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--full", action="store_true", help="also run the full-size StableLM-3B steps (long)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run [600; --full: 3600]")
    parser.add_argument("--workdir", type=Path, default=None, help="where packages and the log go [a temp dir]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--strict", action="store_true", help="a skipped step counts as a failure")
    parser.add_argument("--json", type=Path, default=None, help="also write the steps and benchmarks as JSON")
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))  # fmt: skip
    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="stlm-gpu-check-")) if temp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (3600.0 if args.full else 600.0)
    run = Run(work=work, deadline=time.monotonic() + budget)
    if temp and not args.keep:
        run.log_copy = Path(tempfile.gettempdir()) / "stlm-gpu-check.log"
    print(f"[gpu_check] work folder {work}, budget {budget:.0f}s, python {run.python}", flush=True)
    facts = environment(run)
    quick_run(run, facts)
    if args.full:
        full_run(run, facts)
    code = summary(run, args.strict)
    if args.json:
        args.json.write_text(json.dumps({"steps": [vars(s) for s in run.steps], "facts": facts,
                                         "benchmarks": run.outputs}, indent=2))  # fmt: skip
    if run.log_copy is not None:
        shutil.copy(work / "gpu_check.log", run.log_copy)
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
