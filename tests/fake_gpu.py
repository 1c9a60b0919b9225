"""Stand-ins for TensorRT and the CUDA runtime so the TensorRT backend's own logic runs on a CPU,
and :func:`drive`, a ragged schedule that checks backends against each other.

The backend under test is the real one; only its two dependencies are replaced, each as strict as
the real API where the backend could go wrong:

* a ``cuda-python``-shaped runtime whose "device memory" is host memory (256-byte aligned like
  ``cudaMalloc``; every access must stay inside an allocation). Streams are ``cudaStream_t``
  objects; work queued on a stream (copies, memsets, engine runs) happens only when the stream is
  synchronized (or destroyed, or memory is freed), in order, so a result read before
  ``cudaStreamSynchronize`` is still the old memory, and a host buffer changed before it is what
  gets copied;
* a ``tensorrt``-shaped module whose engine is "built" from an ONNX package and its own list of
  optimization profiles, independent of the engine package's manifest: its tensor names, dtypes
  (``get_tensor_dtype``), ranks and profiles are the graph's, so a manifest that disagrees is
  caught. The context refuses shapes of the wrong rank or outside the active profile (returns
  False, as ``set_input_shape`` does), unaligned or unknown tensor addresses, and stream handles
  that are not ints (``execute_async_v3`` takes ``int``); runs read and write device memory at the
  addresses set, with ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import enum
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stlm.package.manifest import read_manifest
from stlm.tensorrt.profiles import Profile, profile_shapes

ALIGNMENT = 256


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInvalidResourceHandle = 400


class MemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStream_t:
    """``cuda.bindings.runtime.cudaStream_t``: an object, ``int(stream)`` is the handle TensorRT takes."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:
        return self._handle

    def __repr__(self) -> str:
        return f"<cudaStream_t {self._handle:#x}>"


class FakeCudart(types.ModuleType):
    """The calls of ``cuda.bindings.runtime`` stlm makes, on host memory, with deferred streams."""

    cudaError_t = CudaError
    cudaMemcpyKind = MemcpyKind
    cudaStream_t = cudaStream_t

    def __init__(self) -> None:
        super().__init__("fake_cudart")
        self.blocks: dict[int, tuple[np.ndarray, int]] = {}  # aligned ptr -> (backing array, size)
        self.streams: dict[int, list[Callable[[], None]]] = {}
        self.copies = 0
        self._next_stream = 0x5EED

    # -- memory -------------------------------------------------------------------------------
    def _check(self, ptr: int, nbytes: int) -> None:
        if any(p <= ptr and ptr + nbytes <= p + size for p, (_, size) in self.blocks.items()):
            return
        raise AssertionError(f"device access {ptr:#x}+{nbytes} is outside every allocation")

    def cudaGetDeviceCount(self) -> tuple[CudaError, int]:
        return CudaError.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device: int) -> tuple[CudaError, Any]:
        prop = types.SimpleNamespace(name=b"Fake GPU\x00\x00", major=8, minor=0, totalGlobalMem=1 << 34)
        return CudaError.cudaSuccess, prop

    def cudaMalloc(self, nbytes: int) -> tuple[CudaError, int]:
        backing = np.full(nbytes + ALIGNMENT, 0xFF, dtype=np.uint8)  # NaN garbage: reading unwritten memory shows
        ptr = -(-backing.ctypes.data // ALIGNMENT) * ALIGNMENT
        self.blocks[ptr] = (backing, nbytes)
        return CudaError.cudaSuccess, ptr

    def cudaFree(self, ptr: int) -> tuple[CudaError]:
        self.run_all()  # cudaFree synchronizes the device
        return (CudaError.cudaSuccess if self.blocks.pop(ptr, None) is not None else CudaError.cudaErrorInvalidValue,)

    # -- streams ------------------------------------------------------------------------------
    def _queue(self, stream: Any) -> list[Callable[[], None]] | None:
        if stream is None or stream == 0:
            raise AssertionError("work on the legacy default stream: stlm must use its own stream")
        handle = int(stream) if isinstance(stream, cudaStream_t | int) else None
        return self.streams.get(handle) if handle is not None else None

    def cudaStreamCreate(self) -> tuple[CudaError, cudaStream_t]:
        self._next_stream += 0x100
        self.streams[self._next_stream] = []
        return CudaError.cudaSuccess, cudaStream_t(self._next_stream)

    def cudaStreamDestroy(self, stream: Any) -> tuple[CudaError]:
        if self.cudaStreamSynchronize(stream)[0] != CudaError.cudaSuccess:  # queued work still completes
            return (CudaError.cudaErrorInvalidResourceHandle,)
        del self.streams[int(stream)]
        return (CudaError.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[CudaError]:
        queue = self._queue(stream)
        if queue is None:
            return (CudaError.cudaErrorInvalidResourceHandle,)
        while queue:
            queue.pop(0)()
        return (CudaError.cudaSuccess,)

    def run_all(self) -> None:
        """Complete the work queued on every stream (a device-wide synchronization)."""
        for handle in list(self.streams):
            self.cudaStreamSynchronize(handle)

    def pending(self) -> int:
        """Operations queued and not yet done."""
        return sum(len(q) for q in self.streams.values())

    def enqueue(self, stream: Any, work: Callable[[], None]) -> CudaError:
        """Queue ``work`` on ``stream`` (what TensorRT's fake engine uses for its runs)."""
        queue = self._queue(stream)
        if queue is None:
            return CudaError.cudaErrorInvalidResourceHandle
        queue.append(work)
        return CudaError.cudaSuccess

    # -- async copies -------------------------------------------------------------------------
    def cudaMemsetAsync(self, ptr: int, value: int, count: int, stream: Any) -> tuple[CudaError]:
        self._check(ptr, count)
        return (self.enqueue(stream, lambda: ctypes.memset(ptr, value, count)),)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: MemcpyKind, stream: Any) -> tuple[CudaError]:
        return self.cudaMemcpy2DAsync(dst, count, src, count, count, 1, kind, stream)

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: MemcpyKind, stream: Any
    ) -> tuple[CudaError]:
        if not isinstance(kind, MemcpyKind) or dpitch < width or spitch < width:
            return (CudaError.cudaErrorInvalidValue,)
        for i in range(height):
            if kind != MemcpyKind.cudaMemcpyDeviceToHost:
                self._check(dst + i * dpitch, width)
            if kind != MemcpyKind.cudaMemcpyHostToDevice:
                self._check(src + i * spitch, width)

        def copy() -> None:
            for i in range(height):
                ctypes.memmove(dst + i * dpitch, src + i * spitch, width)

        self.copies += 1
        return (self.enqueue(stream, copy),)

    def view(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The device tensor at ``ptr`` as a numpy array (no copy)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._check(ptr, max(nbytes, 1))
        return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).reshape(shape)


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_ORT_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(bfloat16)": DataType.BF16,
              "tensor(int64)": DataType.INT64, "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL}  # fmt: skip


def _numpy_dtype(dtype: DataType) -> np.dtype:
    if dtype == DataType.BF16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64,
                     DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.INT8: np.int8}[dtype])  # fmt: skip


class _ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self) -> None:
        pass


class _Build:
    """What a built engine knows: the graph's tensors (dtype, rank) and its own profiles."""

    def __init__(self, cudart: FakeCudart, onnx_package: Path, profiles: Sequence[Profile]) -> None:
        import onnxruntime as ort

        self.cudart = cudart
        self.session = ort.InferenceSession(str(onnx_package / "model.onnx"), providers=["CPUExecutionProvider"])
        contract = read_manifest(onnx_package).contract  # the source package, as `stlm build-engine` reads it
        self.profiles = [profile_shapes(contract, p) for p in profiles]
        self.inputs = {i.name: (_ORT_TYPES[i.type], len(i.shape)) for i in self.session.get_inputs()}
        self.outputs = {o.name: (_ORT_TYPES[o.type], len(o.shape)) for o in self.session.get_outputs()}
        self.errors: list[str] = []

    def refuse(self, message: str) -> bool:
        self.errors.append(message)
        return False

    def check_stream(self, stream: Any, call: str) -> None:
        if type(stream) is not int:  # pybind11: `int stream_handle`
            raise TypeError(f"{call}(): incompatible function arguments: stream handle {stream!r} is not an int")
        if stream not in self.cudart.streams:
            raise AssertionError(f"{call}() on an unknown or destroyed stream {stream:#x}")

    def run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        """One engine run (when the stream gets to it): read the inputs, write the outputs."""
        view = self.cudart.view
        feeds = {n: view(addresses[n], shapes[n], _numpy_dtype(t)).copy() for n, (t, _) in self.inputs.items()}
        results = self.session.run(list(self.outputs), feeds)
        for name, value in zip(self.outputs, results, strict=True):
            if name.startswith("present."):  # written while the past is read: must not overlap it
                past_name = name.replace("present", "past_key_values")
                past, present = addresses[past_name], addresses[name]
                assert past + feeds[past_name].nbytes <= present or present + value.nbytes <= past
            view(addresses[name], value.shape, _numpy_dtype(self.outputs[name][0]))[...] = value


class _Context:
    """``IExecutionContext``: shapes and addresses set on the host, runs queued on the stream."""

    def __init__(self, build: _Build) -> None:
        self.build, self.profile = build, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.switches: list[int] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.build.check_stream(stream, "set_optimization_profile_async")
        if not 0 <= index < len(self.build.profiles):
            return self.build.refuse(f"profile {index} of {len(self.build.profiles)}")
        self.profile, self.shapes = index, {}
        self.switches.append(index)
        return True

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        build = self.build
        if name not in build.inputs:
            return build.refuse(f"{name} is not an input")
        shape = tuple(int(d) for d in shape)
        lo, _, hi = build.profiles[self.profile][name]
        if len(shape) != build.inputs[name][1]:  # rank checked before any dimension
            return build.refuse(f"{name}: shape {shape} has rank {len(shape)}, the engine's is {build.inputs[name][1]}")
        if not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
            return build.refuse(f"{name}: shape {shape} outside profile {self.profile} [{lo}, {hi}]")
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.build.inputs and name not in self.build.outputs:
            return self.build.refuse(f"{name} is not an I/O tensor")
        if type(ptr) is not int or ptr % ALIGNMENT:
            return self.build.refuse(f"{name}: address {ptr!r} is not {ALIGNMENT}-byte aligned")
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        build = self.build
        build.check_stream(stream, "execute_async_v3")
        if set(self.shapes) != set(build.inputs) or set(self.addresses) != set(build.inputs) | set(build.outputs):
            return build.refuse("not every input shape and tensor address is set")
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # captured now, used when the stream runs
        return build.cudart.enqueue(stream, lambda: build.run(shapes, addresses)) == CudaError.cudaSuccess


class _Engine:
    """``ICudaEngine``: everything it reports comes from the build, not from a manifest."""

    def __init__(self, build: _Build) -> None:
        self.build = build
        self.num_io_tensors = len(build.inputs) + len(build.outputs)
        self.num_optimization_profiles = len(build.profiles)

    def get_tensor_name(self, i: int) -> str:
        return [*self.build.inputs, *self.build.outputs][i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        build = self.build
        return (
            TensorIOMode.INPUT
            if name in build.inputs
            else TensorIOMode.OUTPUT
            if name in build.outputs
            else TensorIOMode.NONE
        )

    def get_tensor_dtype(self, name: str) -> DataType:
        return {**self.build.inputs, **self.build.outputs}[name][0]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return list(self.build.profiles[profile_index][name])

    def create_execution_context(self) -> _Context:
        self.context = _Context(self.build)
        return self.context


def fake_tensorrt(
    cudart: FakeCudart, onnx_package: Path, profiles: Sequence[Profile], *, version: str = "11.2.1"
) -> types.ModuleType:
    """A ``tensorrt`` module whose engine (``b"fake engine"``) runs ``onnx_package`` with ONNX Runtime,
    built with ``profiles``: names, dtypes and ranks are the graph's; nothing comes from an engine manifest."""
    build = _Build(cudart, onnx_package, profiles)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.engine = _Engine(build)

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            return self.engine if data == b"fake engine" else None

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.ILogger, trt.Runtime, trt.DataType, trt.TensorIOMode = _ILogger, Runtime, DataType, TensorIOMode  # type: ignore[attr-defined]
    trt.errors = build.errors  # type: ignore[attr-defined]  # what the fake refused, for tests
    return trt


def drive(
    backends: list[Any], batch: int, capacity: int, steps: int, seed: int = 0, *, tol: float | None = None
) -> list[Any]:
    """Run the same ragged schedule (prompts of different lengths, idle rows, rows released at
    ``capacity`` tokens and restarted with a new prompt) through every backend; assert equal
    logits for the rows fed at each step (within ``tol``: by default 1e-5 when every backend runs an
    fp32 package, else 2e-2). Returns the caches."""
    if tol is None:
        fp32 = all(getattr(getattr(b, "manifest", None), "dtype", None) == "fp32" for b in backends)
        tol = 1e-5 if fp32 else 2e-2
    rng = np.random.default_rng(seed)
    # 8 spare tokens: the in-place variant needs room for the padded chunk after every row.
    caches = [b.new_cache(batch, capacity + 8) for b in backends]
    lengths = np.zeros(batch, dtype=np.int64)
    for step in range(steps):
        feed: list[list[int]] = []
        for r in range(batch):
            if step and rng.random() < 0.25:
                feed.append([])  # idle this step
                continue
            n = int(rng.integers(2, 7)) if step == 0 or lengths[r] == 0 else 1
            if lengths[r] + n > capacity:
                for b, c in zip(backends, caches, strict=True):
                    b.release(c, r)
                lengths[r], n = 0, int(rng.integers(2, 5))
            feed.append(rng.integers(0, 50000, size=n).tolist())
            lengths[r] += n
        fed = [r for r in range(batch) if feed[r]]
        outs = [b.forward(c, feed) for b, c in zip(backends, caches, strict=True)]
        for out in outs[1:]:
            np.testing.assert_allclose(out[fed], outs[0][fed], rtol=tol, atol=tol)
        for c in caches:
            np.testing.assert_array_equal(c.lengths, lengths)
    return caches
