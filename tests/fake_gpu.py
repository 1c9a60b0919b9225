"""Stand-ins for TensorRT and the CUDA runtime so the TensorRT backend's own logic runs on a CPU,
and :func:`drive`, a ragged schedule that checks backends against each other.

The backend under test is the real one; only its two dependencies are replaced:

* a ``cuda-python``-shaped runtime whose "device memory" is host memory (pointers are real
  addresses; copies are ``memmove``), which checks that every copy stays inside an allocation;
* a ``tensorrt``-shaped module whose engine runs the concat-KV ONNX graph with ONNX Runtime,
  reading and writing the tensors at the addresses the backend set, and refusing shapes that
  fall outside the active optimization profile (as TensorRT's ``set_input_shape`` does).
"""

from __future__ import annotations

import ctypes
import enum
import types
from pathlib import Path
from typing import Any

import numpy as np

from stlm.manifest import Manifest
from stlm.tensorrt.profiles import Profile, profile_shapes


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


class MemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class FakeCudart(types.ModuleType):
    """The calls of ``cuda.bindings.runtime`` stlm makes, on host memory."""

    cudaError_t = CudaError
    cudaMemcpyKind = MemcpyKind

    def __init__(self) -> None:
        super().__init__("fake_cudart")
        self.blocks: dict[int, np.ndarray] = {}
        self.copies = 0

    def _check(self, ptr: int, nbytes: int) -> None:
        if any(p <= ptr and ptr + nbytes <= p + a.nbytes for p, a in self.blocks.items()):
            return
        raise AssertionError(f"device access {ptr:#x}+{nbytes} is outside every allocation")

    def cudaGetDeviceCount(self) -> tuple[CudaError, int]:
        return CudaError.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device: int) -> tuple[CudaError, Any]:
        prop = types.SimpleNamespace(name=b"Fake GPU\x00\x00", major=8, minor=0, totalGlobalMem=1 << 34)
        return CudaError.cudaSuccess, prop

    def cudaMalloc(self, nbytes: int) -> tuple[CudaError, int]:
        block = np.full(nbytes, 0xFF, dtype=np.uint8)  # NaN garbage: reading unwritten memory shows
        self.blocks[block.ctypes.data] = block
        return CudaError.cudaSuccess, block.ctypes.data

    def cudaFree(self, ptr: int) -> tuple[CudaError]:
        return (CudaError.cudaSuccess if self.blocks.pop(ptr, None) is not None else CudaError.cudaErrorInvalidValue,)

    def cudaStreamCreate(self) -> tuple[CudaError, int]:
        return CudaError.cudaSuccess, 0x5EED

    def cudaStreamDestroy(self, stream: int) -> tuple[CudaError]:
        return (CudaError.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[CudaError]:
        return (CudaError.cudaSuccess,)

    def cudaMemsetAsync(self, ptr: int, value: int, count: int, stream: int) -> tuple[CudaError]:
        self._check(ptr, count)
        ctypes.memset(ptr, value, count)
        return (CudaError.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: MemcpyKind, stream: int) -> tuple[CudaError]:
        return self.cudaMemcpy2DAsync(dst, count, src, count, count, 1, kind, stream)

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: MemcpyKind, stream: int
    ) -> tuple[CudaError]:
        assert dpitch >= width and spitch >= width, (dpitch, spitch, width)
        for i in range(height):
            if kind != MemcpyKind.cudaMemcpyDeviceToHost:
                self._check(dst + i * dpitch, width)
            if kind != MemcpyKind.cudaMemcpyHostToDevice:
                self._check(src + i * spitch, width)
            ctypes.memmove(dst + i * dpitch, src + i * spitch, width)
        self.copies += 1
        return (CudaError.cudaSuccess,)

    def view(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The device tensor at ``ptr`` as a numpy array (no copy)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._check(ptr, max(nbytes, 1))
        return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).reshape(shape)


def fake_tensorrt(cudart: FakeCudart, manifest: Manifest, onnx_package: Path) -> types.ModuleType:
    """A ``tensorrt`` module whose engines run ``onnx_package`` (a concat-KV ONNX package)."""
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = str(manifest.extra["tensorrt_version"])
    session = ort.InferenceSession(str(onnx_package / "model.onnx"), providers=["CPUExecutionProvider"])
    profiles = [profile_shapes(manifest.contract, Profile.from_dict(p)) for p in manifest.extra["profiles"]]
    dtypes = {s.name: np.dtype(s.dtype) for s in (*manifest.contract.inputs, *manifest.contract.outputs)}
    inputs = [s.name for s in manifest.contract.inputs]
    outputs = [s.name for s in manifest.contract.outputs]

    class ILogger:
        class Severity(enum.Enum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class Context:
        def __init__(self) -> None:
            self.profile, self.shapes, self.addresses = 0, {}, {}
            self.switches: list[int] = []

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            self.profile, self.shapes = index, {}
            self.switches.append(index)
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            lo, _, hi = profiles[self.profile][name]
            if not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            assert set(self.shapes) == set(inputs) and set(self.addresses) == set(inputs) | set(outputs)
            feeds = {n: cudart.view(self.addresses[n], self.shapes[n], dtypes[n]).copy() for n in inputs}
            results = session.run(outputs, feeds)
            for name, value in zip(outputs, results, strict=True):
                if name.startswith("present."):  # written while the past is read: must not overlap it
                    past_name = name.replace("present", "past_key_values")
                    past, present = self.addresses[past_name], self.addresses[name]
                    assert past + feeds[past_name].nbytes <= present or present + value.nbytes <= past
                cudart.view(self.addresses[name], value.shape, dtypes[name])[...] = value
            return True

    class Engine:
        num_io_tensors = len(inputs) + len(outputs)
        num_optimization_profiles = len(profiles)

        def get_tensor_name(self, i: int) -> str:
            return [*inputs, *outputs][i]

        def create_execution_context(self) -> Context:
            self.context = Context()
            return self.context

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.engine = Engine()

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            assert data == b"fake engine"
            return self.engine

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt


def drive(backends: list[Any], batch: int, capacity: int, steps: int, seed: int = 0) -> list[Any]:
    """Run the same ragged schedule (prompts of different lengths, idle rows, rows released at
    ``capacity`` tokens and restarted with a new prompt) through every backend; assert equal
    logits for the rows fed at each step. Returns the caches."""
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
            np.testing.assert_allclose(out[fed], outs[0][fed], rtol=2e-2, atol=2e-2)
        for c in caches:
            np.testing.assert_array_equal(c.lengths, lengths)
    return caches
