"""Stage: ONNX package folder → TensorRT engine package folder (``model.engine``, tokenizer, manifest).

Strongly typed build (TensorRT 11 has no FP16/BF16 builder flags: the precision is the ONNX
graph's dtypes), the ``stlm::partial_rotary`` plugin registered before parsing, two optimization
profiles (:mod:`stlm.export.profiles`), a reusable timing cache, build progress through a
``trt.IProgressMonitor``. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import stlm
from stlm.errors import BackendUnavailableError, InvalidArgumentError, PackageError
from stlm.export.engine_manifest import (
    COMPUTE_CAPABILITY,
    GPU_NAME,
    HARDWARE_COMPAT,
    HARDWARE_COMPAT_LEVELS,
    SOURCE_PACKAGE,
    TRT_VERSION,
)
from stlm.export.profiles import Profile, engine_profiles, profile_shapes
from stlm.export.staging import staged_folder
from stlm.export.tokenizer_files import TokenizerFiles, copy_tokenizer_files
from stlm.manifest import Manifest, read_manifest, write_manifest
from stlm.runtime.gpu import gpu_info
from stlm.runtime.trt_common import PLUGIN_ID, import_tensorrt, make_logger, register_rotary_plugin

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total), as stlm.export.graph.Progress

ENGINE_NAME: Final = "model.engine"
TRT_DTYPE_NAMES: Final = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def _check_options(builder_optimization_level: int, hardware_compat: str | None, workspace_gib: float | None) -> str:
    if (
        isinstance(builder_optimization_level, bool)
        or not isinstance(builder_optimization_level, int)
        or not 0 <= builder_optimization_level <= 5
    ):
        raise InvalidArgumentError(
            f"--builder-optimization-level {builder_optimization_level!r} is not 0..5",
            fix="pass 0 (fastest build) .. 5 (most tactics); 3 is TensorRT's default",
        )
    level = "none" if hardware_compat is None else str(hardware_compat).lower()
    if level not in HARDWARE_COMPAT_LEVELS:
        raise InvalidArgumentError(
            f"--hardware-compat {hardware_compat!r} is not one of {', '.join(HARDWARE_COMPAT_LEVELS)}",
            fix="pass --hardware-compat none (this GPU's architecture) or ampere_plus",
        )
    if workspace_gib is not None and (
        isinstance(workspace_gib, bool) or not isinstance(workspace_gib, (int, float)) or not 0 < workspace_gib < 4096
    ):
        raise InvalidArgumentError(
            f"--workspace-gib {workspace_gib!r} is not a positive size in GiB",
            fix="pass e.g. --workspace-gib 8, or omit it to let TensorRT use the free GPU memory",
        )
    return level


def _check_output(out: Path, onnx_dir: Path, overwrite: bool, timing_cache: Path | None) -> None:
    if out.resolve() == onnx_dir.resolve():
        raise InvalidArgumentError(
            f"the engine folder {str(out)!r} is the ONNX package folder", fix="pass another -o folder for the engine"
        )
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(
            f"output folder {str(out)!r} already exists and is not empty",
            fix="pass another -o folder, or --overwrite to replace it",
        )
    if timing_cache is not None and timing_cache.is_dir():
        raise InvalidArgumentError(
            f"--timing-cache {str(timing_cache)!r} is a folder",
            fix="pass a file path, e.g. --timing-cache ~/.cache/stlm/a100.timing",
        )


def _plugin_record(graph: Path, source: Manifest) -> dict[str, Any] | None:
    """``{"id", "aot"}`` when the graph has partial_rotary plugin nodes (aot None if unknown)."""
    if source.variant.get("rotary") != "plugin":
        return None
    try:
        import onnx

        from stlm.plugins.partial_rotary.spec import ATTR_AOT, is_plugin_node
    except ImportError:
        return {"id": PLUGIN_ID, "aot": None}
    model = onnx.load(str(graph), load_external_data=False)
    aot = [
        next((bool(a.i) for a in n.attribute if a.name == ATTR_AOT), False)
        for n in model.graph.node
        if is_plugin_node(n)
    ]
    return {"id": PLUGIN_ID, "aot": all(aot), "nodes": len(aot)} if aot else None


def _network_flags(trt: ModuleType) -> int:
    flags = 0
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):  # STRONGLY_TYPED: always on (ignored) in TRT 11
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def _check_network(network: Any, source: Manifest, graph: Path) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    expected = {s.name for s in source.contract.inputs}
    if set(inputs) != expected:
        raise PackageError(
            f"{graph} has inputs that differ from its manifest's contract "
            f"(missing {sorted(expected - set(inputs))[:4]}, extra {sorted(set(inputs) - expected)[:4]})",
            fix="export the package again",
        )
    kv = next(s for s in source.contract.inputs if s.name.startswith("past_key_values."))
    got = TRT_DTYPE_NAMES.get(inputs[kv.name].dtype.name, inputs[kv.name].dtype.name)
    if got != kv.dtype:
        raise PackageError(
            f"{graph}: {kv.name} is {got} but the manifest says {kv.dtype}", fix="export the package again"
        )


def _progress_monitor(trt: ModuleType, progress: Progress) -> Any | None:
    """A ``trt.IProgressMonitor`` reporting the top two levels of build phases, or None if unsupported."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    import threading

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, int]] = {}  # name → (depth, steps)

        def _report(self, phase: str, done: int) -> None:
            depth, steps = self._phases.get(phase, (9, 0))
            if depth <= 1:
                try:
                    progress(phase, done, max(steps, done))
                except Exception:
                    log.debug("progress callback failed", exc_info=True)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = 0 if not parent_phase else self._phases.get(parent_phase, (0, 0))[0] + 1
                self._phases[phase_name] = (depth, int(num_steps))
                self._report(phase_name, 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                self._report(phase_name, int(step) + 1)
            return True

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._phases.pop(phase_name, None)

    return _Monitor()


def _timing_cache(config: Any, path: Path | None) -> Any:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
        log.info("reusing the timing cache %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    if cache is None and data:
        log.warning("the timing cache %s is unreadable; starting an empty one", path)
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("the timing cache %s was made for another GPU or TensorRT; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    data = config.get_timing_cache().serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    log.info("saved the timing cache to %s", path)


def build_engine(
    onnx_dir: str | Path,
    engine_dir: str | Path,
    *,
    max_batch: int,
    max_seq_len: int | None,
    opt_batch: int | None = None,
    opt_seq_len: int | None = None,
    prefill_chunk: int | None = None,
    timing_cache: str | Path | None = None,
    builder_optimization_level: int = 3,
    hardware_compat: str | None = None,
    workspace_gib: float | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Build a TensorRT engine package from the ONNX package ``onnx_dir``; return ``engine_dir``.

    ``max_seq_len`` (prompt + generated tokens; None = the model's context) and ``max_batch``
    bound what the engine accepts; ``opt_*`` are the shapes kernels are tuned for; prompts run
    in chunks of at most ``prefill_chunk`` tokens (see :mod:`stlm.export.profiles`).
    ``timing_cache`` is read if it exists and written back after the build.
    ``hardware_compat='ampere_plus'`` makes one engine run on any GPU of compute capability ≥ 8.0.
    Without TensorRT or a CUDA GPU this raises :class:`BackendUnavailableError`.
    """
    onnx_dir, out = Path(onnx_dir), Path(engine_dir)
    cache_path = None if timing_cache is None else Path(timing_cache).expanduser()
    compat = _check_options(builder_optimization_level, hardware_compat, workspace_gib)
    source = read_manifest(onnx_dir)
    if source.kind != "onnx":
        raise PackageError(
            f"{onnx_dir} is a {source.kind!r} package, not an ONNX package",
            fix="pass the folder written by `stlm export ... --target tensorrt`",
        )
    if source.variant.get("kv_cache", "concat") != "concat" or source.variant.get("quantization"):
        raise PackageError(
            f"{onnx_dir} uses ONNX Runtime-only operators (kv_cache={source.variant.get('kv_cache')!r}, "
            f"quantization={source.variant.get('quantization')!r}), which TensorRT cannot build",
            fix="export for TensorRT: stlm export CHECKPOINT -o ONNX_DIR --target tensorrt",
        )
    profiles = engine_profiles(
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        context_length=source.generation.context_length,
        opt_batch=opt_batch,
        opt_seq_len=opt_seq_len,
        prefill_chunk=prefill_chunk,
    )
    _check_output(out, onnx_dir, overwrite, cache_path)

    trt = import_tensorrt()
    gpu = gpu_info(0)
    if compat == "ampere_plus" and gpu.compute_capability < (8, 0):
        raise InvalidArgumentError(
            f"--hardware-compat ampere_plus needs an Ampere-or-newer build GPU; "
            f"{gpu.name} has compute capability {gpu.compute_capability}",
            fix="build on an A100/A10/L4/H100-class GPU, or pass --hardware-compat none",
        )
    graph = onnx_dir / source.graph
    plugin = _plugin_record(graph, source)
    if plugin is not None:
        register_rotary_plugin(required=True)
    elif source.variant.get("rotary") != "plugin":
        log.info("%s has plain-ONNX rotary; `stlm export --target tensorrt` uses the fused plugin", onnx_dir)

    start = time.perf_counter()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BackendUnavailableError(
            f"TensorRT could not start a builder: {logger.recent_errors()}",
            fix="check the GPU and driver with nvidia-smi",
        )
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if progress:
        progress("parse", 0, 1)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or logger.recent_errors()
        raise PackageError(
            f"TensorRT cannot parse {graph}: {errors[:1500]}",
            fix="export the package again with `stlm export ... --target tensorrt`; "
            f"a plugin error means the {PLUGIN_ID} plugin did not register",
        )
    if progress:
        progress("parse", 1, 1)
    _check_network(network, source, graph)

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.builder_optimization_level = builder_optimization_level
    if compat == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(source.contract, profile).items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    _timing_cache(config, cache_path)
    monitor = _progress_monitor(trt, progress) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    log.info(
        "building a TensorRT %s engine from %s on %s (profiles: %s)",
        trt.__version__,
        graph,
        gpu.name,
        [p.to_dict() for p in profiles],
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PackageError(
            f"TensorRT could not build an engine from {graph}: {logger.recent_errors()}",
            fix="rerun with -v for TensorRT's log; lower --max-batch/--max-seq-len if the GPU ran out of memory",
        )
    seconds = time.perf_counter() - start
    if cache_path is not None:
        _save_timing_cache(config, cache_path)

    max_seq = profiles[0].axes["total_sequence"][2]
    manifest = dataclasses.replace(
        source,
        kind="tensorrt",
        graph=ENGINE_NAME,
        generation=dataclasses.replace(source.generation, context_length=max_seq),
        versions={"stlm": stlm.__version__, "tensorrt": trt.__version__, "onnx_package": source.versions},
        variant={**source.variant, "target": "tensorrt"},
        extra=engine_extra(
            trt_version=trt.__version__,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            precision=source.dtype,
            kv_dtype=source.contract.kv_dtype,
            profiles=profiles,
            hardware_compat=compat,
            builder_optimization_level=builder_optimization_level,
            workspace_gib=workspace_gib,
            plugin=plugin,
            source_package=str(onnx_dir.resolve()),
            model_context_length=source.generation.context_length,
            build_seconds=seconds,
        ),
    )
    if progress:
        progress("write", 0, 1)
    with staged_folder(out) as tmp:
        with open(tmp / ENGINE_NAME, "wb") as f:
            f.write(serialized)
        del serialized
        shutil.copyfile(onnx_dir / source.tokenizer, tmp / source.tokenizer)
        copy_tokenizer_files(onnx_dir, tmp, TokenizerFiles(source.chat_template, source.tokenizer_config))
        write_manifest(tmp, manifest)
    if progress:
        progress("write", 1, 1)
    log.info("built %s → %s in %.1f s", onnx_dir, out, seconds)
    return out


def engine_extra(
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    precision: str,
    kv_dtype: str,
    profiles: tuple[Profile, ...] | list[Profile],
    hardware_compat: str,
    builder_optimization_level: int,
    workspace_gib: float | None = None,
    plugin: dict[str, Any] | None = None,
    source_package: str | None = None,
    model_context_length: int | None = None,
    build_seconds: float | None = None,
) -> dict[str, Any]:
    """The ``extra`` record of an engine manifest (what the runtime checks and what was built)."""
    return {
        TRT_VERSION: trt_version,
        GPU_NAME: gpu_name,
        COMPUTE_CAPABILITY: list(compute_capability),
        "precision": precision,
        "kv_dtype": kv_dtype,
        "profiles": [p.to_dict() for p in profiles],
        HARDWARE_COMPAT: hardware_compat,
        "builder_optimization_level": builder_optimization_level,
        "workspace_gib": workspace_gib,
        "plugin": plugin,
        SOURCE_PACKAGE: source_package,
        "model_context_length": model_context_length,
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
    }
