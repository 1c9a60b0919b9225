"""What an engine package records about its build, and whether it can run here (pure checks).

A serialized TensorRT engine loads only in the TensorRT version that built it, and - unless built
with a hardware-compatibility level - only on GPUs of the compute capability it was built on.
``ampere_plus`` engines run on any GPU of compute capability 8.0 or newer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from stlm.errors import EngineCompatibilityError, PackageError
from stlm.tensorrt.profiles import Profile

ENGINE_NAME: Final = "model.engine"
HARDWARE_COMPAT_LEVELS: Final = ("none", "ampere_plus")
AMPERE: Final = (8, 0)
REBUILD: Final = "stlm build-engine ONNX_DIR -o ENGINE_DIR"

# Keys of Manifest.extra in an engine package.
TRT_VERSION: Final = "tensorrt_version"
COMPUTE_CAPABILITY: Final = "compute_capability"
GPU_NAME: Final = "gpu_name"
HARDWARE_COMPAT: Final = "hardware_compat"
SOURCE_PACKAGE: Final = "source_package"
PROFILES: Final = "profiles"
PLUGIN: Final = "plugin"


def version_key(version: str) -> tuple[int, ...]:
    """``'11.2.1.2'`` → ``(11, 2, 1)``: the part of a TensorRT version an engine is tied to."""
    numbers = re.findall(r"\d+", str(version).split("+")[0])
    return tuple(int(n) for n in numbers[:3])


def format_capability(cc: Sequence[int]) -> str:
    """``(8, 0)`` → ``'8.0'``."""
    return ".".join(str(int(x)) for x in cc)


def rebuild_command(extra: Mapping[str, Any], engine_dir: str | None = None) -> str:
    """The ``stlm build-engine`` command that rebuilds this engine, with the recorded paths if known
    (add ``--overwrite`` to replace an existing engine folder)."""
    source = extra.get(SOURCE_PACKAGE)
    command = REBUILD
    if source:
        command = command.replace("ONNX_DIR", str(source))
    if engine_dir:
        command = command.replace("ENGINE_DIR", str(engine_dir))
    return command


def check_engine_compat(
    manifest_extra: Mapping[str, Any],
    *,
    trt_version: str,
    compute_capability: tuple[int, int],
    gpu_name: str | None = None,
    engine_dir: str | None = None,
) -> None:
    """Raise :class:`EngineCompatibilityError` unless the engine described by ``manifest_extra``
    runs with TensorRT ``trt_version`` on a GPU of ``compute_capability``.

    The message names both versions / capabilities and the rebuild command
    (``stlm build-engine ONNX_DIR -o ENGINE_DIR``). Missing records raise :class:`PackageError`.
    """
    where = f"the engine in {engine_dir}" if engine_dir else "the engine"
    try:
        built_version = str(manifest_extra[TRT_VERSION])
        built_cc = tuple(int(x) for x in manifest_extra[COMPUTE_CAPABILITY])
        level = str(manifest_extra.get(HARDWARE_COMPAT, "none"))
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(
            f"{where} has no valid build record ({exc!r} missing or malformed in its stlm.json)",
            fix=f"rebuild it: {rebuild_command(manifest_extra, engine_dir)}",
        ) from None
    if level not in HARDWARE_COMPAT_LEVELS:
        raise PackageError(
            f"{where} records the unknown hardware compatibility level {level!r} "
            f"(expected one of {', '.join(HARDWARE_COMPAT_LEVELS)})",
            fix=f"rebuild it: {rebuild_command(manifest_extra, engine_dir)}",
        )
    rebuild = rebuild_command(manifest_extra, engine_dir) + " --overwrite"
    built_gpu = manifest_extra.get(GPU_NAME)
    built_on = f"compute capability {format_capability(built_cc)}" + (f" ({built_gpu})" if built_gpu else "")
    here = f"compute capability {format_capability(compute_capability)}" + (f" ({gpu_name})" if gpu_name else "")
    if version_key(built_version) != version_key(trt_version):
        raise EngineCompatibilityError(
            f"{where} was built with TensorRT {built_version}, but this machine has TensorRT {trt_version}; "
            "a TensorRT engine only loads in the TensorRT version that built it",
            fix=f"rebuild the engine with this TensorRT: {rebuild} (or install TensorRT {built_version})",
        )
    if level == "ampere_plus":
        if tuple(compute_capability) < AMPERE:
            raise EngineCompatibilityError(
                f"{where} was built with hardware compatibility 'ampere_plus' (GPUs of compute capability "
                f"{format_capability(AMPERE)} or newer) on {built_on}; this GPU has {here}",
                fix=f"run it on an Ampere-or-newer GPU, or rebuild it on this GPU: {rebuild}",
            )
        return
    if tuple(compute_capability) != built_cc:
        raise EngineCompatibilityError(
            f"{where} was built for {built_on}, but this GPU has {here}; an engine built without hardware "
            "compatibility runs only on GPUs of the compute capability it was built on",
            fix=f"rebuild it on this GPU: {rebuild}, or build with --hardware-compat ampere_plus "
            "to run one engine on any Ampere-or-newer GPU",
        )


def engine_extra(
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    precision: str,
    kv_dtype: str,
    profiles: Sequence[Profile],
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
        PROFILES: [p.to_dict() for p in profiles],
        HARDWARE_COMPAT: hardware_compat,
        "builder_optimization_level": builder_optimization_level,
        "workspace_gib": workspace_gib,
        PLUGIN: plugin,
        SOURCE_PACKAGE: source_package,
        "model_context_length": model_context_length,
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
    }


def recorded_profiles(extra: Mapping[str, Any]) -> list[Profile]:
    """The optimization profiles an engine was built with (in profile-index order)."""
    records = extra.get(PROFILES)
    if not isinstance(records, list):
        raise PackageError(
            f"the engine's build record has no list of profiles ({records!r})",
            fix=f"rebuild it: {rebuild_command(extra)}",
        )
    return [Profile.from_dict(p) for p in records]


def plugin_kernel_is_inside(extra: Mapping[str, Any]) -> bool | None:
    """None when the engine has no plugin node; True when the plugin's kernel is AOT PTX inside the
    engine; False when it runs the plugin's JIT (Python) implementation, which must be registered."""
    plugin = extra.get(PLUGIN)
    if not plugin:
        return None
    return isinstance(plugin, Mapping) and plugin.get("aot") is True
