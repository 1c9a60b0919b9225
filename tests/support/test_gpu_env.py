"""stlm.support.gpu_env: one ONNX Runtime build, a driver new enough for CUDA 13 (fake inputs; pure functions)."""

from __future__ import annotations

import enum
import types

import pytest

from stlm.errors import BackendUnavailableError
from stlm.support.gpu_env import (
    CUDA_MAJOR,
    ONNXRUNTIME_GPU_PIN,
    cuda_version_text,
    driver_problem,
    installed_distributions,
    normalize_name,
    onnxruntime_conflict,
    probe_cuda_driver,
)


def test_one_onnxruntime_build_is_fine() -> None:
    assert onnxruntime_conflict({"onnxruntime": "1.23.0", "numpy": "2.1"}) is None
    assert onnxruntime_conflict({"onnxruntime-gpu": "1.31.1", "onnxruntime-extensions": "0.14"}) is None
    assert onnxruntime_conflict({}) is None


@pytest.mark.parametrize(
    "installed",
    [
        {"onnxruntime": "1.23.0", "onnxruntime-gpu": "1.31.1"},
        {"ONNXRuntime": "1.23.0", "onnxruntime_gpu": "1.31.1"},  # spelled as pip may report them
        {"onnxruntime-gpu": "1.31.1", "onnxruntime-openvino": "1.22.0"},
    ],
)
def test_two_onnxruntime_builds_are_a_clear_problem(installed: dict[str, str]) -> None:
    problem = onnxruntime_conflict(installed)
    assert problem is not None
    for name, version in installed.items():
        assert normalize_name(name) in problem.problem and version in problem.problem
    assert ONNXRUNTIME_GPU_PIN in problem.fix and "pip uninstall -y onnxruntime" in problem.fix
    error = problem.as_error()
    assert isinstance(error, BackendUnavailableError) and "fix:" in str(error)


def test_installed_distributions_reads_this_environment() -> None:
    found = installed_distributions()
    assert "stlm" in found and "numpy" in found
    assert all(name == normalize_name(name) for name in found)


@pytest.mark.parametrize(
    "version, text", [(13000, "13.0"), (12080, "12.8"), (13010, "13.1"), (12090, "12.9"), (11080, "11.8")]
)
def test_cuda_version_text(version: int, text: str) -> None:
    assert cuda_version_text(version) == text


def test_driver_new_enough() -> None:
    assert driver_problem(driver_version=13000, runtime_version=13000) is None
    assert driver_problem(driver_version=13000, runtime_version=13010) is None  # minor-version compatibility
    assert driver_problem(driver_version=13020) is None
    assert driver_problem(driver_version=None) is None  # nothing known, nothing claimed


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(driver_version=12080, runtime_version=13000), ["CUDA 12.8 only", "CUDA 13.0", "580"]),
        (dict(driver_version=12090), ["CUDA 12.9 only", f"CUDA {CUDA_MAJOR}.0", "580"]),
        (dict(driver_version=None, error="cudaErrorInsufficientDriver"), ["too old", "580"]),
        (dict(driver_version=11080, runtime_version=12040), ["CUDA 11.8 only", "CUDA 12.4", "525"]),
    ],
)
def test_driver_too_old_is_named_as_such(kwargs: dict[str, object], needles: list[str]) -> None:
    problem = driver_problem(**kwargs)  # type: ignore[arg-type]
    assert problem is not None
    text = f"{problem.problem} {problem.fix}"
    for needle in needles:
        assert needle in text, (needle, text)
    assert "no usable CUDA GPU" not in text and "driver" in problem.fix


def test_no_driver() -> None:
    problem = driver_problem(driver_version=0, runtime_version=13000)
    assert problem is not None and "no NVIDIA driver" in problem.problem and "--gpus all" in problem.fix


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


def _fake_cudart(driver: tuple[_Err, int], runtime: tuple[_Err, int]) -> types.SimpleNamespace:
    return types.SimpleNamespace(cudaDriverGetVersion=lambda: driver, cudaRuntimeGetVersion=lambda: runtime)


def test_probe_cuda_driver_with_cuda_python_results() -> None:
    ok = _fake_cudart((_Err.cudaSuccess, 13000), (_Err.cudaSuccess, 13000))
    assert probe_cuda_driver(ok) is None
    old = _fake_cudart((_Err.cudaSuccess, 12080), (_Err.cudaSuccess, 13000))
    problem = probe_cuda_driver(old)
    assert problem is not None and "12.8" in problem.problem and "13.0" in problem.problem
    refused = _fake_cudart((_Err.cudaSuccess, 12040), (_Err.cudaErrorInsufficientDriver, 0))
    problem = probe_cuda_driver(refused)
    assert problem is not None and "InsufficientDriver" in problem.problem and "12.4" in problem.problem
    none = _fake_cudart((_Err.cudaSuccess, 0), (_Err.cudaSuccess, 13000))
    assert (p := probe_cuda_driver(none)) is not None and "no NVIDIA driver" in p.problem


def test_install_fix_names_the_swap_not_a_gpu_extra_onnxruntime() -> None:
    from stlm.support.gpu_env import GPU_INSTALL_FIX

    assert "stlm[gpu]" in GPU_INSTALL_FIX and ONNXRUNTIME_GPU_PIN in GPU_INSTALL_FIX
    assert "pip uninstall -y onnxruntime" in GPU_INSTALL_FIX and "580" in GPU_INSTALL_FIX
