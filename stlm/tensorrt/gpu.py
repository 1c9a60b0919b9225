"""Thin CUDA runtime helpers over ``cuda-python`` (the ``gpu`` extra): device facts, device
buffers, a stream, copies. No torch: services embed :mod:`stlm.runtime` without it.

``cuda-python`` 12.6+ and 13 expose the runtime API as ``cuda.bindings.runtime``; older 12.x as
``cuda.cudart``. Every call returns ``(cudaError_t, *values)``; :func:`call` checks the error.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import numpy as np

from stlm.errors import BackendUnavailableError
from stlm.support import gpu_env

log = logging.getLogger(__name__)

ALIGNMENT: Final = 256

_cudart: ModuleType | None = None


def cudart() -> ModuleType:
    """The ``cuda-python`` runtime module, or :class:`BackendUnavailableError` if it is missing."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as module
        except ImportError:
            try:
                from cuda import cudart as module  # cuda-python < 12.6
            except ImportError:
                raise BackendUnavailableError(
                    "cuda-python is not installed (neither cuda.bindings.runtime nor cuda.cudart imports), "
                    "so stlm cannot reach the GPU",
                    fix=gpu_env.GPU_INSTALL_FIX,
                ) from None
        _cudart = module
    return _cudart


def _error_name(err: Any) -> str:
    return str(getattr(err, "name", err))


def driver_problem_here(error: str | None = None) -> gpu_env.EnvProblem | None:
    """What :func:`stlm.support.gpu_env.probe_cuda_driver` finds wrong with this machine's NVIDIA driver
    (None when cuda-python is missing or the driver is fine); ``error``: a CUDA error name already
    seen, e.g. ``cudaErrorInsufficientDriver``, named when the probe itself learns nothing."""
    try:
        problem = gpu_env.probe_cuda_driver(cudart())
    except Exception:  # a diagnosis must not hide the error it explains
        log.debug("could not probe the CUDA driver", exc_info=True)
        problem = None
    if problem is None and error is not None:
        problem = gpu_env.driver_problem(driver_version=None, error=error)
    return problem


def call(result: Any, what: str) -> Any:
    """Check a ``cuda-python`` result tuple; return its value(s) (None, one value, or a tuple)."""
    rt = cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = _error_name(err)
        if "MemoryAllocation" in name:
            raise BackendUnavailableError(
                f"the GPU ran out of memory during {what} ({name})",
                fix="lower the batch size or max_new_tokens, or build the engine "
                "with a smaller --max-batch / --max-seq-len",
            )
        if "InsufficientDriver" in name:  # the GPU is there; the driver is too old for CUDA 13
            problem = driver_problem_here(name)
            assert problem is not None  # driver_problem always names an InsufficientDriver error
            raise problem.as_error()
        if "NoDevice" in name:
            raise BackendUnavailableError(
                f"no usable CUDA GPU: {what} failed with {name}",
                fix="run on a machine with an NVIDIA GPU and driver (in Docker: --gpus all)",
            )
        raise BackendUnavailableError(
            f"CUDA error during {what}: {name}", fix="check the GPU with nvidia-smi; rerun with -v for details"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class GpuInfo:
    """The facts an engine depends on."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int


def gpu_info(device: int = 0) -> GpuInfo:
    """Describe CUDA device ``device``; :class:`BackendUnavailableError` when there is none."""
    rt = cudart()
    count = call(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise BackendUnavailableError(
            "no CUDA GPU is visible to this process",
            fix="run on a machine with an NVIDIA GPU and driver; in Docker pass --gpus all; check CUDA_VISIBLE_DEVICES",
        )
    if not 0 <= device < count:
        raise BackendUnavailableError(
            f"CUDA device {device} does not exist ({count} visible)",
            fix="pick a device index below the count, or set CUDA_VISIBLE_DEVICES",
        )
    prop = call(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(device, name.rstrip("\x00").strip(), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem))


def _free(ptr: int) -> None:
    try:
        err = cudart().cudaFree(ptr)
        if (err[0] if isinstance(err, tuple) else err) != cudart().cudaError_t.cudaSuccess:
            log.warning("cudaFree(%#x) failed: %s", ptr, err)
    except Exception:  # noqa: BLE001 - a finalizer must never raise (interpreter shutdown included)
        pass


class DeviceBuffer:
    """``nbytes`` of device memory, freed when the object is collected."""

    def __init__(self, nbytes: int, what: str = "a device buffer") -> None:
        self.nbytes = max(int(nbytes), ALIGNMENT)
        self.ptr: int = int(
            call(cudart().cudaMalloc(self.nbytes), f"allocating {self.nbytes / 2**20:.1f} MiB for {what}")
        )
        self._finalizer = weakref.finalize(self, _free, self.ptr)

    def free(self) -> None:
        """Release the memory now (idempotent)."""
        self._finalizer()


class Stream:
    """A CUDA stream with the copies stlm needs; ``handle`` is the int TensorRT takes."""

    def __init__(self) -> None:
        rt = cudart()
        self.stream = call(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)
        self._finalizer = weakref.finalize(self, _destroy_stream, self.stream)

    def htod(self, dst: int, array: np.ndarray) -> None:
        """Copy a C-contiguous host array to device address ``dst`` (async; keep ``array`` alive until sync)."""
        rt = cudart()
        call(
            rt.cudaMemcpyAsync(
                dst, array.ctypes.data, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            ),
            "a host-to-device copy",
        )

    def dtoh(self, array: np.ndarray, src: int) -> None:
        """Copy device address ``src`` into a C-contiguous host array (async)."""
        rt = cudart()
        call(
            rt.cudaMemcpyAsync(
                array.ctypes.data, src, array.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            ),
            "a device-to-host copy",
        )

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        """Fill ``nbytes`` of device memory with the byte ``value`` (async)."""
        if nbytes:
            call(cudart().cudaMemsetAsync(dst, value, nbytes, self.stream), "cudaMemsetAsync")

    def dtod_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        """Copy ``height`` rows of ``width`` bytes between device addresses with the given pitches (async)."""
        if width and height:
            rt = cudart()
            call(
                rt.cudaMemcpy2DAsync(
                    dst, dpitch, src, spitch, width, height, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream
                ),
                "a strided device-to-device copy",
            )

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        call(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


def _destroy_stream(stream: Any) -> None:
    try:
        cudart().cudaStreamDestroy(stream)
    except Exception:  # noqa: BLE001 - finalizer
        pass


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the 256-byte alignment TensorRT wants for tensor addresses."""
    return -(-int(nbytes) // ALIGNMENT) * ALIGNMENT


MIN_TRT_MAJOR: Final = 11


def import_tensorrt() -> ModuleType:
    """``import tensorrt``, or :class:`BackendUnavailableError` saying what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed: the Python module 'tensorrt' cannot be imported ({exc})",
            fix=gpu_env.GPU_INSTALL_FIX,
        ) from None
    except (OSError, RuntimeError) as exc:  # the wheel is there but its CUDA libraries are not
        problem = driver_problem_here()  # an old driver is the usual cause: say so
        if problem is not None:
            raise BackendUnavailableError(
                f"TensorRT is installed but cannot load its libraries ({exc}): {problem.problem}", fix=problem.fix
            ) from None
        raise BackendUnavailableError(
            f"TensorRT is installed but cannot load its libraries ({exc})", fix=gpu_env.GPU_INSTALL_FIX
        ) from None
    version = getattr(trt, "__version__", None)
    if version is None:
        raise BackendUnavailableError(
            "TensorRT is installed but unusable: its Python module has no __version__ (a partial install, "
            "or its native libraries did not load)",
            fix=gpu_env.GPU_INSTALL_FIX,
        )
    major = int(str(version).split(".")[0] or 0)
    if major < MIN_TRT_MAJOR:
        raise BackendUnavailableError(
            f"stlm needs TensorRT {MIN_TRT_MAJOR} or newer; found {version}",
            fix=f"pip install 'tensorrt>={MIN_TRT_MAJOR}' (the gpu extra), or use the Dockerfile",
        )
    return trt
