"""Checks of the GPU software environment: one CUDA major, a driver new enough for it, one ONNX Runtime.

stlm's GPU stack is built on **CUDA 13**: TensorRT 11 (``tensorrt`` pulls ``tensorrt_cu13``),
``cuda-python`` 13.x and ``onnxruntime-gpu`` 1.31.1 (``libcudart.so.13``, cuBLAS 13) all need an
NVIDIA driver of branch 580 or newer (NVIDIA's CUDA compatibility table: CUDA 13.x needs >= 580;
CUDA 13.0 GA shipped with 580.65.06). On an older driver the CUDA runtime answers
``cudaErrorInsufficientDriver``, which is not the same as having no GPU.

``onnxruntime`` (CPU, stlm's base dependency) and ``onnxruntime-gpu`` install the same Python
module: with both installed, whichever pip wrote last wins, file by file. pip cannot express
"install this one instead of that one", so the GPU build is installed by a swap (see
docs/tensorrt.md) and this module detects the mixed state.

The functions taking versions or distribution lists are pure (tested with fake inputs);
:func:`installed_distributions`, :func:`installed_onnxruntime_builds` and :func:`probe_cuda_driver`
read the real environment. Used by the ONNX Runtime session (a mixed install is an error when CUDA
is asked for, a warning otherwise) and the CUDA helpers (an old driver is named as such).
Nothing here imports onnxruntime, TensorRT or cuda-python at module import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from stlm.errors import BackendUnavailableError

CUDA_MAJOR: Final = 13
"""The one CUDA major stlm's GPU extra and image are built on."""
MIN_DRIVER_BRANCH: Final[dict[int, int]] = {13: 580, 12: 525}
"""Oldest NVIDIA driver branch per CUDA major (NVIDIA's minor-version compatibility table)."""
ONNXRUNTIME_GPU_PIN: Final = "onnxruntime-gpu==1.31.1"
"""The onnxruntime-gpu release built on CUDA 13 that stlm documents and the image installs."""
ONNXRUNTIME_BUILDS: Final = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-migraphx",
    "onnxruntime-training",
)
"""Distributions that each install the ``onnxruntime`` module (onnxruntime-extensions/-genai do not)."""
SWAP_FIX: Final = f"pip uninstall -y onnxruntime onnxruntime-gpu && pip install {ONNXRUNTIME_GPU_PIN}"
GPU_INSTALL_FIX: Final = (
    "on a machine with an NVIDIA GPU and driver >= 580 (CUDA 13): pip install 'stlm[gpu]' (TensorRT 11, "
    f"cuda-python 13); for ONNX packages on the GPU also {SWAP_FIX}; or use the Dockerfile "
    "(docker build --target gpu -t stlm-gpu . && docker run --gpus all ...; see docs/tensorrt.md)"
)
"""The fix to name when the GPU stack is missing (replaces the runtime's older text, which put
onnxruntime-gpu in the gpu extra)."""


@dataclass(frozen=True)
class EnvProblem:
    """A broken GPU environment: what is wrong and the command or step that fixes it."""

    problem: str
    fix: str

    def as_error(self) -> BackendUnavailableError:
        """The :class:`BackendUnavailableError` to raise for it."""
        return BackendUnavailableError(self.problem, fix=self.fix)


def normalize_name(name: str) -> str:
    """A distribution name as PEP 503 compares them (``ONNXRuntime_GPU`` -> ``onnxruntime-gpu``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def onnxruntime_conflict(installed: Mapping[str, str]) -> EnvProblem | None:
    """More than one distribution providing the ``onnxruntime`` module in ``installed`` (name -> version)?"""
    found = {normalize_name(n): v for n, v in installed.items() if normalize_name(n) in ONNXRUNTIME_BUILDS}
    if len(found) < 2:
        return None
    listed = ", ".join(f"{n} {v}" for n, v in sorted(found.items()))
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else "one of them"
    return EnvProblem(
        f"several ONNX Runtime builds are installed ({listed}); they write the same `onnxruntime` module, "
        "so which one Python imports depends on install order and may be a broken mix",
        fix=f"keep only {keep}: {SWAP_FIX} (for the CPU build only: pip uninstall -y onnxruntime-gpu "
        "&& pip install --force-reinstall onnxruntime)",
    )


def installed_distributions() -> dict[str, str]:
    """Installed distributions of this interpreter: normalized name -> version."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize_name(name), dist.version)
    return found


def installed_onnxruntime_builds() -> dict[str, str]:
    """The installed distributions among :data:`ONNXRUNTIME_BUILDS` (name -> version); cheap enough
    to call on every session start (a few metadata lookups, not a scan of every distribution)."""
    from importlib import metadata

    found = {}
    for name in ONNXRUNTIME_BUILDS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def cuda_version_text(version: int) -> str:
    """CUDA's integer version (``13000``, ``12080``) as ``13.0`` / ``12.8``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_problem(
    *,
    driver_version: int | None,
    runtime_version: int | None = None,
    error: str | None = None,
    needed_major: int = CUDA_MAJOR,
) -> EnvProblem | None:
    """Is the NVIDIA driver too old (or absent) for the CUDA runtime? (pure)

    ``driver_version`` / ``runtime_version`` are what ``cudaDriverGetVersion`` /
    ``cudaRuntimeGetVersion`` return (``12080`` = CUDA 12.8; driver 0 = no driver loaded);
    ``error`` is the name of a CUDA error seen (``cudaErrorInsufficientDriver``).
    """
    needed = runtime_version if runtime_version else needed_major * 1000
    branch = MIN_DRIVER_BRANCH.get(needed // 1000)
    driver_fix = (
        f"install NVIDIA driver {branch} or newer (`nvidia-smi` shows the driver and the newest CUDA it supports)"
        if branch
        else f"install an NVIDIA driver that supports CUDA {cuda_version_text(needed)}"
    ) + "; in Docker the host's driver is used"
    if driver_version == 0 or (error and "NoDriver" in error):
        return EnvProblem(
            "no NVIDIA driver is loaded (the CUDA driver version is 0)",
            fix=f"{driver_fix}; in Docker run with --gpus all",
        )
    # Minor-version compatibility: any driver of the runtime's major runs it (13.0's driver runs 13.x).
    too_old = driver_version is not None and driver_version // 1000 < needed // 1000
    if too_old or (error is not None and "InsufficientDriver" in error):
        have = f"supports CUDA {cuda_version_text(driver_version)} only" if driver_version else "is too old"
        return EnvProblem(
            f"the NVIDIA driver {have}, but stlm's GPU packages need CUDA {cuda_version_text(needed)}"
            f" (cudaErrorInsufficientDriver): the GPU is there, the driver is too old for it",
            fix=driver_fix,
        )
    return None


def _value(result: Any) -> tuple[str | None, int | None]:
    """``(error name or None, value)`` from a cuda-python ``(cudaError_t, value)`` result."""
    err, value = (result[0], result[1]) if isinstance(result, tuple) and len(result) > 1 else (result, None)
    name = str(getattr(err, "name", err))
    return (None if name.endswith("cudaSuccess") or err == 0 else name), (None if value is None else int(value))


def probe_cuda_driver(cudart: Any) -> EnvProblem | None:
    """:func:`driver_problem` for the driver and runtime behind a cuda-python runtime module
    (``cuda.bindings.runtime``, or anything with its ``cudaDriverGetVersion``/``cudaRuntimeGetVersion``)."""
    driver_error, driver = _value(cudart.cudaDriverGetVersion())
    runtime_error, runtime = _value(cudart.cudaRuntimeGetVersion())
    return driver_problem(driver_version=driver, runtime_version=runtime, error=driver_error or runtime_error)
