"""scripts/gpu_check.sh, the GPU acceptance run: documented, bounded, and on a machine without a GPU
it runs to its summary with every GPU step skipped and the reason given."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _gpu_here() -> bool:
    if shutil.which("nvidia-smi"):
        return True
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_no_gpu = pytest.mark.skipif(_gpu_here(), reason="a GPU is here: run scripts/gpu_check.sh itself (minutes)")


def _load_module() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "steps.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--budget", "240", "--workdir", str(tmp_path / "work"), "--json", str(out), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )  # fmt: skip
    return proc, json.loads(out.read_text()) if out.is_file() else None


def test_help_documents_the_run() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("--full", "--strict", "--budget", "10 minutes", "network", "build-engine", "--target tensorrt",
                   "stlm verify", "stlm bench", "pytest", "onnxruntime-gpu", "Triton", "skipped with the reason"):  # fmt: skip
        assert needle in text, needle


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--budget", "-1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 2 and "--budget" in proc.stderr


@needs_no_gpu
def test_without_a_gpu_every_gpu_step_is_skipped_with_its_reason(tmp_path: Path) -> None:
    proc, report = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = report["steps"]
    names = [s["name"] for s in steps]
    assert names[0] == "environment" and steps[0]["status"] == "pass"
    assert "TensorRT absent" in steps[0]["detail"] and "onnxruntime" in steps[0]["detail"]
    for wanted in ("triton-kernel", "pytest-gpu", "tiny-reference", "tiny-trt-bench"):
        assert wanted in names
    for dtype in ("fp16", "bf16"):
        for rotary in ("plugin", "native"):
            for stage in ("export", "build", "verify"):
                assert f"tiny-trt-{dtype}-{rotary}-{stage}" in names
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(n.startswith(f"tiny-ort-cuda-{dtype}") and n.endswith("-verify") for n in names), dtype
    for step in steps[1:]:
        assert step["status"] == "skip", step
        assert len(step["detail"]) > 10, step  # a reason, not a bare "skip"
    assert "torch.cuda is not available" in next(s["detail"] for s in steps if s["name"] == "triton-kernel")
    assert "summary: 1 passed, 0 failed" in proc.stdout
    table = proc.stdout[proc.stdout.index("\nstep ") :]
    assert all(name in table for name in names)
    assert not any(n.startswith("full-") for n in names)  # only with --full
    assert (tmp_path / "work" / "gpu_check.log").is_file()


@needs_no_gpu
def test_a_broken_environment_fails_the_run(tmp_path: Path) -> None:
    """Two ONNX Runtime builds installed (a fake onnxruntime-gpu dist-info) and an nvidia-smi that
    lists a GPU: the environment step fails, and the TensorRT / CUDA steps name what is missing."""
    site = tmp_path / "site"
    info = site / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 580.65.06, 9.0'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PYTHONPATH": str(site), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc, report = _run(tmp_path, "--strict", env=env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    steps = {s["name"]: s for s in report["steps"]}
    env_step = steps["environment"]
    assert env_step["status"] == "fail"
    assert "onnxruntime-gpu 1.31.1" in env_step["detail"] and "NVIDIA H200" in env_step["detail"]
    assert "TensorRT is not importable" in steps["tiny-trt-fp16-plugin-build"]["detail"]
    assert "no CUDA provider" in steps["tiny-ort-cuda-bf16-concat-verify"]["detail"]
    assert "FAILED" in proc.stdout


def test_lanes_follow_the_environment() -> None:
    gpu_check = _load_module()
    everything = {
        "gpus": [["NVIDIA H200", "580.65.06", "9.0"]],
        "torch": {"version": "2.13.0", "cuda_build": "13.0", "cuda_available": True},
        "triton": "3.9.0",
        "tensorrt": "11.4.0.106",
        "onnxruntime": {"version": "1.31.1", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    }
    assert gpu_check.lanes_of(everything) == (None, None, None)
    triton, trt, ort = gpu_check.lanes_of({"gpus_error": "RuntimeError: nvidia-smi not found", "torch": {}})
    assert "torch.cuda is not available" in triton
    assert "no NVIDIA GPU visible" in trt and "nvidia-smi not found" in ort
    no_trt = {**everything, "tensorrt_error": "ModuleNotFoundError: tensorrt"}
    del no_trt["tensorrt"]
    assert gpu_check.lanes_of(no_trt)[1].startswith("TensorRT is not importable")
