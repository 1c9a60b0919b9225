"""Opening a package's graph with ONNX Runtime: the version check, the providers, clear errors.

:func:`providers_for` is the one place the CPU/GPU choice is made: the CUDA execution provider
when onnxruntime-gpu is installed and answers (unless the caller asks for something else),
otherwise the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import onnxruntime as ort

from stlm.errors import BackendUnavailableError, PackageError
from stlm.package.manifest import EXPORT_AGAIN, Manifest
from stlm.package.ort_versions import check_onnxruntime
from stlm.support.gpu_env import GPU_INSTALL_FIX, installed_onnxruntime_builds, onnxruntime_conflict

log = logging.getLogger(__name__)
_warned: set[str] = set()

CPU_PROVIDER: Final = "CPUExecutionProvider"
CUDA_PROVIDER: Final = "CUDAExecutionProvider"
#: Session config entries of every session. Intra-op threads block between parallel sections
#: instead of spinning: with more threads than free cores (shared machines, a server beside other
#: work) spinning threads take the cores the working ones need — measured 1.8x faster decode with
#: 2 threads on 2 busy cores (docs/benchmarks.md). One thread (no pool) is unaffected. On a
#: dedicated machine, STLM_ORT_ALLOW_SPINNING=1 restores ONNX Runtime's default (spinning).
SESSION_CONFIG: Final = {"session.intra_op.allow_spinning": "0"}
SPINNING_ENV: Final = "STLM_ORT_ALLOW_SPINNING"


def cuda_provider_available() -> bool:
    """Whether this ONNX Runtime build has the CUDA execution provider (onnxruntime-gpu)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def device_for(device: str | None, *, installed: Mapping[str, str] | None = None) -> str:
    """``'cuda'`` or ``'cpu'``: the one asked for, else CUDA when onnxruntime-gpu has it.

    Several ONNX Runtime builds installed at once (``installed``: name -> version; default: this
    environment's) are an error when CUDA is asked for, else a warning (once per process).
    """
    conflict = onnxruntime_conflict(installed_onnxruntime_builds() if installed is None else installed)
    if conflict is not None:
        if device == "cuda":
            raise conflict.as_error()
        if conflict.problem not in _warned:
            _warned.add(conflict.problem)
            log.warning("%s (fix: %s)", conflict.problem, conflict.fix)
    if device is None:
        return "cuda" if cuda_provider_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"device {device!r} is not 'cpu' or 'cuda'", fix="pass device='cpu' or 'cuda'")
    if device == "cuda" and not cuda_provider_available():
        raise BackendUnavailableError(
            f"this ONNX Runtime ({ort.__version__}) has no CUDA execution provider "
            f"(available: {', '.join(ort.get_available_providers())})",
            fix=GPU_INSTALL_FIX,
        )
    return device


def providers_for(device: str, device_id: int = 0) -> list[Any]:
    """The execution providers of a session on ``device``."""
    if device == "cuda":
        return [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def _refuse_plugin_graph(folder: Path, manifest: Manifest) -> None:
    if manifest.variant.rotary == "plugin":
        raise PackageError(
            f"{folder} is a TensorRT-target package: its rotary runs in the stlm::partial_rotary "
            "TensorRT plugin, which ONNX Runtime does not have",
            fix=f"build an engine from it (`stlm build-engine {folder} -o ENGINE_DIR`) and generate with "
            "that, or export for ONNX Runtime (without --target tensorrt)",
        )


def _load_error(exc: Exception, path: Path, manifest: Manifest, providers: list[Any]) -> Exception:
    if "NOT_IMPLEMENTED" in str(exc):
        engine_hint = (
            "a --target tensorrt graph computes in its dtype for TensorRT: build an engine from it "
            "(stlm build-engine), or "
            if manifest.variant.target == "tensorrt"
            else ""
        )
        return BackendUnavailableError(
            f"ONNX Runtime ({', '.join(map(str, providers))}) has no kernel for a node of "
            f"{path} in the package's {manifest.dtype} ({str(exc).strip()[:300]})",
            fix=engine_hint + "export the package again with this stlm (--target onnxruntime), which stores "
            "fp16/bf16 weights and computes in fp32 on CPU",
        )
    return PackageError(
        f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {str(exc).strip()[:300]})",
        fix="the graph or its weights are corrupt or truncated: export the package again",
    )


def open_session(
    folder: Path, manifest: Manifest, providers: list[Any], threads: int | None = None
) -> ort.InferenceSession:
    """Load ``folder``'s graph with ``providers``; version, package and kernel problems become StlmErrors."""
    _refuse_plugin_graph(folder, manifest)
    check_onnxruntime(manifest.variant.min_onnxruntime, ort.__version__, package=str(folder))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    config = dict(SESSION_CONFIG)
    if os.environ.get(SPINNING_ENV) == "1":
        config["session.intra_op.allow_spinning"] = "1"
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    path = Path(folder) / manifest.graph
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for bad files
        raise _load_error(exc, path, manifest, providers) from None
    missing = {s.name for s in manifest.contract.inputs} - {i.name for i in session.get_inputs()}
    if missing:
        raise PackageError(f"{path} lacks the inputs {sorted(missing)[:4]} its manifest declares", fix=EXPORT_AGAIN)
    return session
