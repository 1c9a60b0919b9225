"""Where stlm.support.gpu_env is used, checked without a GPU: a mixed ONNX Runtime install when a session
starts, an old NVIDIA driver behind a CUDA error or a TensorRT that cannot load, and the AOT
plugin's hardware-compatibility check before an engine build touches TensorRT.

Only the environment is replaced (the installed-distribution list, the CUDA runtime module, a
broken ``tensorrt`` package); the code deciding what to say is stlm's own."""

from __future__ import annotations

import enum
import logging
import sys
import types
from pathlib import Path

import pytest

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.runtime import ort_session
from stlm.runtime.ort_session import device_for
from stlm.support.gpu_env import GPU_INSTALL_FIX, SWAP_FIX, installed_onnxruntime_builds
from stlm.tensorrt import gpu

MIXED = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_session, "_warned", set())


def test_mixed_onnxruntime_is_an_error_when_cuda_is_asked_for() -> None:
    with pytest.raises(BackendUnavailableError) as err:
        device_for("cuda", installed=MIXED)
    text = str(err.value)
    assert "onnxruntime 1.32.0" in text and "onnxruntime-gpu 1.31.1" in text and SWAP_FIX in text
    assert "no CUDA execution provider" not in text  # the cause is named, not its symptom


@pytest.mark.parametrize("device", [None, "cpu"])
def test_mixed_onnxruntime_is_a_warning_otherwise(device: str | None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stlm.runtime.ort_session"):
        first = device_for(device, installed=MIXED)
        device_for(device, installed=MIXED)
    if device == "cpu":
        assert first == "cpu"
    warnings = [r.getMessage() for r in caplog.records if "several ONNX Runtime builds" in r.getMessage()]
    assert len(warnings) == 1 and SWAP_FIX in warnings[0]  # once per process


def test_one_onnxruntime_build_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert device_for("cpu", installed={"onnxruntime": "1.32.0"}) == "cpu"
    assert caplog.records == []


def test_installed_builds_are_read_from_this_environment() -> None:
    import onnxruntime as ort

    found = installed_onnxruntime_builds()
    assert any(version == ort.__version__ for version in found.values()), found


# -- an old driver behind CUDA errors -------------------------------------------------------------


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


def _cudart(driver: int | None, runtime: int = 13000) -> types.SimpleNamespace:
    """A cuda-python runtime module: ``driver`` None makes the version query itself fail."""

    def driver_version() -> tuple[_Err, int]:
        if driver is None:
            raise RuntimeError("cudaDriverGetVersion is unavailable")
        return (_Err.cudaSuccess, driver)

    return types.SimpleNamespace(
        cudaError_t=_Err,
        cudaDriverGetVersion=driver_version,
        cudaRuntimeGetVersion=lambda: (_Err.cudaSuccess, runtime),
    )


def test_insufficient_driver_names_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_cudart", _cudart(12080))
    with pytest.raises(BackendUnavailableError) as err:
        gpu.call((_Err.cudaErrorInsufficientDriver, 0), "cudaMalloc")
    text = str(err.value)
    assert "CUDA 12.8 only" in text and "CUDA 13.0" in text and "580" in text
    assert "no usable CUDA GPU" not in text


def test_insufficient_driver_without_a_version_still_names_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_cudart", _cudart(None))
    with pytest.raises(BackendUnavailableError, match="driver is too old") as err:
        gpu.call((_Err.cudaErrorInsufficientDriver,), "cudaGetDeviceCount")
    assert "580" in str(err.value)


def test_no_device_is_still_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_cudart", _cudart(13000))
    with pytest.raises(BackendUnavailableError, match="no usable CUDA GPU"):
        gpu.call((_Err.cudaErrorNoDevice,), "cudaGetDeviceCount")


@pytest.fixture
def broken_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``tensorrt`` package whose native library does not load (as with a too-old driver)."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text(
        "raise OSError('libnvinfer.so.11: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)


@pytest.mark.usefixtures("broken_tensorrt")
def test_tensorrt_that_cannot_load_on_an_old_driver_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from stlm.tensorrt.gpu import import_tensorrt

    monkeypatch.setattr(gpu, "_cudart", _cudart(12040))
    with pytest.raises(BackendUnavailableError) as err:
        import_tensorrt()
    text = str(err.value)
    assert "libnvinfer.so.11" in text and "CUDA 12.4 only" in text and "580" in text


@pytest.mark.usefixtures("broken_tensorrt")
def test_tensorrt_that_cannot_load_without_cuda_python_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from stlm.tensorrt.gpu import import_tensorrt

    def no_cuda_python() -> types.ModuleType:
        raise BackendUnavailableError("cuda-python is not installed")

    monkeypatch.setattr(gpu, "cudart", no_cuda_python)
    with pytest.raises(BackendUnavailableError) as err:
        import_tensorrt()
    assert "libnvinfer.so.11" in str(err.value) and GPU_INSTALL_FIX in str(err.value)


# -- the AOT plugin's hardware compatibility, before TensorRT ----------------------------------------


def test_build_engine_checks_hardware_compat_before_tensorrt(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx")
    from stlm.export.engine import build_engine
    from stlm.export.onnx_export import export_onnx
    from stlm.plugins.partial_rotary.plugin import ARCH_ENV

    package = export_onnx(checkpoint, tmp_path / "trt", rotary="plugin")
    monkeypatch.setenv(ARCH_ENV, "90")
    with pytest.raises(InvalidArgumentError, match="sm_90"):
        build_engine(package, tmp_path / "engine", max_batch=1, max_seq_len=64, hardware_compat="ampere_plus")
    assert not (tmp_path / "engine").exists()
