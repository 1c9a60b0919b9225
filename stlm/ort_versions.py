"""The oldest onnxruntime each package feature needs: the one table, and the check made at load.

Each entry was measured by loading and running packages that use the feature with every
onnxruntime release from 1.20.1 on (see docs/precision.md, "onnxruntime versions"). The exporter
records the maximum over a graph's features as ``Variant.min_onnxruntime``; the runtime refuses
an older onnxruntime with :class:`BackendUnavailableError` before ONNX Runtime sees the graph.
"""

from __future__ import annotations

import re
from typing import Final

from stlm.errors import BackendUnavailableError
from stlm.variant import Variant

#: feature → oldest onnxruntime that loads and runs it (measured; see the module docstring).
MIN_ONNXRUNTIME: Final[dict[str, str]] = {
    "fp32": "1.20.1",  # concat graphs, opset 17-21, IR 10
    "fp16": "1.20.1",  # fp16 weights + Cast to fp32; fp16 KV at the boundary
    "bf16": "1.20.1",  # bf16 weights + Cast to fp32; bf16 KV at the boundary (fed through OrtValues)
    "inplace": "1.20.1",  # GroupQueryAttention inputs 0-8 (no query_seqlens), fused rotary, fp32 KV
    "inplace-fp16": "1.20.1",  # GroupQueryAttention with an fp16 KV cache
    "int4": "1.20.1",  # MatMulNBits bits=4
    "int8": "1.20.1",  # MatMulNBits bits=8
    "opset-22": "1.20.1",
    "opset-23": "1.20.1",  # RotaryEmbedding-23 (--rotary native)
}


def version_tuple(version: str) -> tuple[int, ...]:
    """``'1.22.1'`` → ``(1, 22, 1)`` (suffixes such as ``.dev`` or ``+cu12`` ignored)."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def graph_features(variant: Variant, opset: int) -> list[str]:
    """The :data:`MIN_ONNXRUNTIME` features a graph of ``variant`` at ``opset`` uses."""
    features: list[str] = [variant.weight_dtype]
    if variant.inplace:
        features.append("inplace" if variant.kv_dtype == "fp32" else "inplace-fp16")
    if variant.quantization is not None:
        features += [f"int{variant.quantization.bits}", f"int{variant.quantization.lm_head_bits}"]
    features += [f"opset-{o}" for o in (22, 23) if opset >= o]
    return features


def required_onnxruntime(variant: Variant, opset: int) -> str:
    """The oldest onnxruntime that runs a graph of ``variant`` at ``opset``."""
    return max((MIN_ONNXRUNTIME[f] for f in graph_features(variant, opset)), key=version_tuple)


def check_onnxruntime(required: str | None, installed: str, *, package: str) -> None:
    """:class:`BackendUnavailableError` when ``installed`` is older than the package's ``required``."""
    if required is None or version_tuple(installed) >= version_tuple(required):
        return
    raise BackendUnavailableError(
        f"this package needs onnxruntime >= {required} (installed: {installed}): {package}",
        fix=f"pip install -U 'onnxruntime>={required}' (or onnxruntime-gpu), or export the package again "
        "with options this onnxruntime supports",
    )
