"""ONNX Runtime with the KV cache on the device through IOBinding (run here on the CPU provider,
which exercises the same binding code as CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_gpu import drive

from stlm.errors import BackendUnavailableError
from stlm.manifest import read_manifest


@pytest.mark.parametrize("variant", ["hd16", "hd16-inplace"])
def test_iobinding_backend_matches_cpu_backend(packages: dict[str, Path], variant: str) -> None:
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from stlm.runtime.onnxruntime_cuda import OnnxRuntimeCudaBackend

    folder = packages[variant]
    manifest = read_manifest(folder)
    backends = [OnnxRuntimeBackend(folder, manifest), OnnxRuntimeCudaBackend(folder, manifest, device="cpu")]
    drive(backends, batch=3, capacity=12, steps=16)


def test_onnx_backend_choice_without_cuda(package: Path) -> None:
    import onnxruntime as ort

    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from stlm.runtime.onnxruntime_cuda import CUDA_PROVIDER, OnnxRuntimeCudaBackend, load_onnx_backend

    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    manifest = read_manifest(package)
    assert isinstance(load_onnx_backend(package, manifest), OnnxRuntimeBackend)
    with pytest.raises(BackendUnavailableError) as err:
        OnnxRuntimeCudaBackend(package, manifest, device="cuda")
    assert "CUDA execution provider" in str(err.value)
