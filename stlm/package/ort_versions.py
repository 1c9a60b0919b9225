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
from stlm.package.variant import Variant

#: feature → oldest onnxruntime that loads and runs it. Measured on 1.20.1, 1.21.1, 1.22.1, 1.23.2,
#: 1.24.4, 1.25.1, 1.26.0, 1.27.0, 1.31.1 and 1.32.0 (CPU): the logits of a ragged batch schedule
#: equal 1.32.0's within 2e-5 wherever the graph loads. The comment names the newest release that refuses.
MIN_ONNXRUNTIME: Final[dict[str, str]] = {
    "fp32": "1.20.1",  # opset 17-21 ops, IR 10 (the exporter caps the IR version at 10)
    "fp16": "1.20.1",  # fp16 weights + Cast to fp32, fp16 KV at the graph boundary
    "bf16": "1.20.1",  # bf16 weights + Cast to fp32, bf16 KV at the boundary (fed as OrtValues)
    "inplace": "1.20.1",  # GroupQueryAttention inputs 0-8 (no query_seqlens), fused rotary, fp32 KV
    "inplace-fp16": "1.20.1",  # the same with an fp16 KV cache
    "int4": "1.20.1",  # MatMulNBits bits=4
    "int8": "1.22.1",  # MatMulNBits bits=8 (also int4 packages' 8-bit LM head); 1.21.1: "Only 4b quantization"
    "rotary-native": "1.24.4",  # RotaryEmbedding-23, 4-D, rotary_embedding_dim; 1.23.2 demands num_heads
    **{f"opset-{o}": "1.20.1" for o in range(17, 22)},
    "opset-22": "1.21.1",  # 1.20.1 refuses
    "opset-23": "1.23.2",  # 1.22.1 refuses
    "opset-24": "1.24.4",  # 1.23.2 refuses
    "opset-25": "1.24.4",
    "opset-26": "1.25.1",  # 1.24.4 refuses
    "opset-27": "1.32.0",  # 1.31.1 refuses
    "opset-28": "1.32.0",
}
#: The newest opset any measured onnxruntime runs (the exporter writes no newer one).
MAX_OPSET: Final = max(int(k.split("-")[1]) for k in MIN_ONNXRUNTIME if k.startswith("opset-"))


def version_tuple(version: str) -> tuple[int, ...]:
    """``'1.22.1'`` → ``(1, 22, 1)`` (suffixes such as ``.dev`` or ``+cu12`` ignored)."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def graph_features(variant: Variant, opset: int) -> list[str]:
    """The :data:`MIN_ONNXRUNTIME` features a graph of ``variant`` at ``opset`` uses."""
    features: list[str] = [variant.weight_dtype]
    if variant.inplace:
        features.append("inplace" if variant.kv_dtype == "fp32" else "inplace-fp16")
    if variant.quantization is not None:
        features += [f"int{bits}" for bits in variant.quantization.all_bits]
    if variant.rotary == "native":
        features.append("rotary-native")
    features.append(f"opset-{opset}")
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
