"""Stage: ONNX package folder → TensorRT engine package folder (``model.engine``, tokenizer, manifest).

Strongly typed build (TensorRT 11 has no FP16/BF16 builder flags: the precision is the ONNX
graph's dtypes), the ``stlm::partial_rotary`` plugin registered before parsing, two optimization
profiles (:mod:`stlm.tensorrt.profiles`), a reusable timing cache, build progress through a
``trt.IProgressMonitor``. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import stlm
from stlm.errors import BackendUnavailableError, InvalidArgumentError, PackageError
from stlm.export.engine_build import (
    load_timing_cache,
    network_flags,
    progress_monitor,
    save_timing_cache,
)
from stlm.export.tokenizer_files import TokenizerFiles, copy_tokenizer_files
from stlm.package.dtypes import TENSORRT_NAME
from stlm.package.manifest import Manifest, read_manifest, write_manifest
from stlm.plugins.partial_rotary.plugin import check_hardware_compat
from stlm.plugins.partial_rotary.spec import PLUGIN_ID
from stlm.support.progress import Progress
from stlm.support.staging import check_output, staged_folder
from stlm.tensorrt.common import make_logger, register_rotary_plugin
from stlm.tensorrt.engine_manifest import AMPERE, ENGINE_NAME, HARDWARE_COMPAT_LEVELS, engine_extra
from stlm.tensorrt.gpu import GpuInfo, gpu_info, import_tensorrt
from stlm.tensorrt.profiles import Profile, engine_profiles, profile_shapes

log = logging.getLogger(__name__)

__all__ = ["ENGINE_NAME", "build_engine", "engine_extra"]


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How the builder runs (validated by :func:`_check_options`)."""

    builder_optimization_level: int = 3
    hardware_compat: str = "none"
    workspace_gib: float | None = None
    timing_cache: Path | None = None


def _check_options(options: BuildOptions) -> None:
    level = options.builder_optimization_level
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5:
        raise InvalidArgumentError(
            f"--builder-optimization-level {level!r} is not 0..5",
            fix="pass 0 (fastest build) .. 5 (most tactics); 3 is TensorRT's default",
        )
    if options.hardware_compat not in HARDWARE_COMPAT_LEVELS:
        raise InvalidArgumentError(
            f"--hardware-compat {options.hardware_compat!r} is not one of {', '.join(HARDWARE_COMPAT_LEVELS)}",
            fix="pass --hardware-compat none (this GPU's architecture) or ampere_plus",
        )
    gib = options.workspace_gib
    if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib < 4096):
        raise InvalidArgumentError(
            f"--workspace-gib {gib!r} is not a positive size in GiB",
            fix="pass e.g. --workspace-gib 8, or omit it to let TensorRT use the free GPU memory",
        )
    if options.timing_cache is not None and options.timing_cache.is_dir():
        raise InvalidArgumentError(
            f"--timing-cache {str(options.timing_cache)!r} is a folder",
            fix="pass a file path, e.g. --timing-cache ~/.cache/stlm/a100.timing",
        )


def _read_source(onnx_dir: Path) -> Manifest:
    """The ONNX package to build from; TensorRT takes only concat, unquantized graphs."""
    source = read_manifest(onnx_dir)
    if source.kind != "onnx":
        raise PackageError(
            f"{onnx_dir} is a {source.kind!r} package, not an ONNX package",
            fix="pass the folder written by `stlm export ... --target tensorrt`",
        )
    variant = source.variant
    if variant.inplace or variant.quantization is not None:
        raise PackageError(
            f"{onnx_dir} uses ONNX Runtime-only operators (kv_cache={variant.kv_cache!r}, "
            f"quantization={None if variant.quantization is None else variant.quantization.name!r}), "
            "which TensorRT cannot build",
            fix="export for TensorRT: stlm export CHECKPOINT -o ONNX_DIR --target tensorrt",
        )
    return source


def _plugin_record(graph: Path, source: Manifest) -> dict[str, Any] | None:
    """``{"id", "aot", "nodes"}`` when the graph has partial_rotary plugin nodes (aot None if unknown)."""
    if source.variant.rotary != "plugin":
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


def _check_network(network: Any, source: Manifest, graph: Path) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    expected = {s.name for s in source.contract.inputs}
    if set(inputs) != expected:
        raise PackageError(
            f"{graph} has inputs that differ from its manifest's contract "
            f"(missing {sorted(expected - set(inputs))[:4]}, extra {sorted(set(inputs) - expected)[:4]})",
            fix="export the package again",
        )
    kv = source.contract.past[0]
    got = TENSORRT_NAME.get(inputs[kv].dtype.name, inputs[kv].dtype.name)
    if got != source.contract.kv_dtype:
        raise PackageError(
            f"{graph}: {kv} is {got} but the manifest says {source.contract.kv_dtype}", fix="export the package again"
        )


def _parse(trt: ModuleType, logger: Any, graph: Path, source: Manifest, progress: Progress | None) -> tuple[Any, Any]:
    """A builder and the network parsed from ``graph``."""
    builder = trt.Builder(logger)
    if builder is None:
        raise BackendUnavailableError(
            f"TensorRT could not start a builder: {logger.recent_errors()}",
            fix="check the GPU and driver with nvidia-smi",
        )
    network = builder.create_network(network_flags(trt))
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
    return builder, network


def _builder_config(
    trt: ModuleType, builder: Any, source: Manifest, profiles: Sequence[Profile], options: BuildOptions
) -> tuple[Any, bool]:
    """The builder config, and whether ``--timing-cache`` may be replaced (see :func:`load_timing_cache`)."""
    config = builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    config.builder_optimization_level = options.builder_optimization_level
    if source.variant.compute_dtype == "fp32":
        # TF32 is on by default and rounds fp32 matmul inputs to 10-bit mantissas: an fp32 package
        # must compute in fp32 (its tolerance class is fp32's)
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.hardware_compat == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(source.contract, profile).items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    return config, load_timing_cache(config, options.timing_cache)


def _gpu_for(options: BuildOptions) -> GpuInfo:
    gpu = gpu_info(0)
    if options.hardware_compat == "ampere_plus" and gpu.compute_capability < AMPERE:
        raise InvalidArgumentError(
            f"--hardware-compat ampere_plus needs an Ampere-or-newer build GPU; "
            f"{gpu.name} has compute capability {gpu.compute_capability}",
            fix="build on an A100/A10/L4/H100-class GPU, or pass --hardware-compat none",
        )
    return gpu


def _serialize(
    trt: ModuleType,
    graph: Path,
    source: Manifest,
    profiles: Sequence[Profile],
    options: BuildOptions,
    progress: Progress | None,
) -> Any:
    """Parse ``graph`` and build the serialized engine (TensorRT's host memory, a buffer)."""
    logger = make_logger(trt)
    builder, network = _parse(trt, logger, graph, source, progress)
    config, replace_cache = _builder_config(trt, builder, source, profiles, options)
    monitor = progress_monitor(trt, progress) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    log.info(
        "building a TensorRT %s engine from %s (profiles: %s)", trt.__version__, graph, [p.to_dict() for p in profiles]
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PackageError(
            f"TensorRT could not build an engine from {graph}: {logger.recent_errors()}",
            fix="rerun with -v for TensorRT's log; lower --max-batch/--max-seq-len if the GPU ran out of memory",
        )
    if options.timing_cache is not None and replace_cache:
        save_timing_cache(config, options.timing_cache)
    elif options.timing_cache is not None:
        log.warning("this build's timing cache was not saved: pass another --timing-cache path to keep it")
    return serialized


def _engine_manifest(
    source: Manifest,
    onnx_dir: Path,
    trt_version: str,
    gpu: GpuInfo,
    profiles: Sequence[Profile],
    options: BuildOptions,
    plugin: dict[str, Any] | None,
    seconds: float,
) -> Manifest:
    return dataclasses.replace(
        source,
        kind="tensorrt",
        graph=ENGINE_NAME,
        generation=dataclasses.replace(source.generation, context_length=profiles[0].axes["total_sequence"][2]),
        versions={"stlm": stlm.__version__, "tensorrt": trt_version, "onnx_package": source.versions},
        variant=dataclasses.replace(source.variant, target="tensorrt"),
        extra=engine_extra(
            trt_version=trt_version,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            precision=source.dtype,
            kv_dtype=source.contract.kv_dtype,
            profiles=profiles,
            hardware_compat=options.hardware_compat,
            builder_optimization_level=options.builder_optimization_level,
            workspace_gib=options.workspace_gib,
            plugin=plugin,
            source_package=str(onnx_dir.resolve()),
            model_context_length=source.generation.context_length,
            build_seconds=seconds,
        ),
    )


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
    in chunks of at most ``prefill_chunk`` tokens (see :mod:`stlm.tensorrt.profiles`).
    ``timing_cache`` is read if it exists and written back after the build.
    ``hardware_compat='ampere_plus'`` makes one engine run on any GPU of compute capability ≥ 8.0.
    Without TensorRT or a CUDA GPU this raises :class:`BackendUnavailableError`.
    """
    onnx_dir, out = Path(onnx_dir), Path(engine_dir)
    options = BuildOptions(
        builder_optimization_level,
        "none" if hardware_compat is None else str(hardware_compat).lower(),
        workspace_gib,
        None if timing_cache is None else Path(timing_cache).expanduser(),
    )
    _check_options(options)
    source = _read_source(onnx_dir)
    profiles = engine_profiles(
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        context_length=source.generation.context_length,
        opt_batch=opt_batch,
        opt_seq_len=opt_seq_len,
        prefill_chunk=prefill_chunk,
    )
    check_output(out, overwrite=overwrite, protect=[onnx_dir])
    graph = onnx_dir / source.graph
    plugin = _plugin_record(graph, source)
    if plugin is not None and plugin["aot"]:
        check_hardware_compat(options.hardware_compat)  # before the GPU: AOT PTX must suit the level
    trt, gpu = import_tensorrt(), _gpu_for(options)
    if plugin is not None:
        register_rotary_plugin(required=True)
    start = time.perf_counter()
    serialized = _serialize(trt, graph, source, profiles, options, progress)
    seconds = time.perf_counter() - start
    manifest = _engine_manifest(source, onnx_dir, trt.__version__, gpu, profiles, options, plugin, seconds)
    _write_package(out, serialized, onnx_dir, manifest, progress, overwrite=overwrite)
    log.info("built %s → %s in %.1f s", onnx_dir, out, seconds)
    return out


def _write_package(
    out: Path, serialized: Any, onnx_dir: Path, manifest: Manifest, progress: Progress | None, *, overwrite: bool
) -> None:
    """The engine package folder (engine, tokenizer files of the ONNX package ``onnx_dir``), written
    under a temporary name and renamed when complete."""
    if progress:
        progress("write", 0, 1)
    with staged_folder(out, overwrite=overwrite, protect=[onnx_dir]) as tmp:
        (tmp / ENGINE_NAME).write_bytes(serialized)
        shutil.copyfile(onnx_dir / manifest.tokenizer, tmp / manifest.tokenizer)
        copy_tokenizer_files(onnx_dir, tmp, TokenizerFiles(manifest.chat_template, manifest.tokenizer_config))
        write_manifest(tmp, manifest)
        read_manifest(tmp)  # a package written is a package that loads
    if progress:
        progress("write", 1, 1)
