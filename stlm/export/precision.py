"""Which dtype a package stores its weights in, computes in, and keeps its KV cache in (pure policy).

``--dtype fp16|bf16`` sets the package dtype. What that means depends on where the graph runs:

* **ONNX Runtime (CPU)**: the CPU provider of ONNX Runtime 1.32 has no fp16 or bf16 kernels for
  most of the decoder's arithmetic (:data:`CPU_KERNEL_GAPS`, probed op by op). For fp16 it silently
  wraps each such node in Cast fp16→fp32→fp16 (its InsertCastTransformer): the graph loads, but
  every op boundary rounds to fp16 and pays two casts. For bf16 it does nothing of the kind: loading
  fails with ``NOT_IMPLEMENTED : Could not find an implementation for MatMul(13) node``. So the
  ONNX Runtime package stores its weights in fp16/bf16 (half the disk of fp32) with a ``Cast`` to
  fp32 right after each initializer, and computes in fp32. ONNX Runtime folds those casts when the
  session is created: **fp16/bf16 halves the download and the disk, not the RAM** of a session.
  The KV cache stays in the package dtype at the graph boundary (half the cache memory), except
  for the bf16 in-place graph: GroupQueryAttention writes its cache in place and has fp16 and fp32
  CPU kernels but no bf16 one, so that graph keeps an fp32 cache.
* **TensorRT** (``--target tensorrt``): a strongly typed network takes its precision from the ONNX
  dtypes, so the graph stays a true fp16/bf16 compute graph (weights, activations and KV in the
  package dtype; LayerNorm statistics and the rotary angles as TensorRT and the plugin compute them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from stlm.package.dtypes import DType
from stlm.package.variant import KVCache, Target

# Ops of the decoder graphs with no CPU kernel for the dtype in ONNX Runtime 1.32 (x86-64), found by
# loading one-node models with ORT_DISABLE_ALL and reading the saved optimized graph back.
# fp16: ORT inserts Cast→fp32 around these (the others it runs natively in fp16:
#       LayerNormalization, GroupQueryAttention, MatMulNBits, Gather, Concat, Split, Slice, ...).
# bf16: session creation fails with NOT_IMPLEMENTED; natively it has only data movement ops,
#       LayerNormalization/SkipLayerNormalization and Cast. Softmax fails on the ReduceMax of its
#       function body; Cos/Sin are not defined for bf16 by ONNX at all.
_ARITHMETIC: Final = ("MatMul", "Gemm", "Add", "Sub", "Mul", "Neg", "Sigmoid", "Softmax", "Where")
CPU_KERNEL_GAPS: Final[dict[DType, tuple[str, ...]]] = {
    "fp32": (),
    "fp16": (*_ARITHMETIC, "Cos", "Sin", "MultiHeadAttention"),
    "bf16": (
        *_ARITHMETIC,
        "Expand",
        "Cos",
        "Sin",
        "GroupQueryAttention",
        "MatMulNBits",
        "RotaryEmbedding",
        "MultiHeadAttention",
    ),
}


@dataclass(frozen=True)
class Precision:
    """The dtypes of one graph: stored weights, activations, KV cache at the graph boundary."""

    weights: DType
    compute: DType
    kv: DType
    note: str = ""


def plan_precision(dtype: DType, *, target: Target, kv_cache: KVCache) -> Precision:
    """The :class:`Precision` of a package of ``dtype`` for ``target`` ('onnxruntime'/'tensorrt')."""
    if dtype == "fp32":
        return Precision("fp32", "fp32", "fp32")
    if target == "tensorrt":
        return Precision(
            dtype,
            dtype,
            dtype,
            f"true {dtype} compute graph: TensorRT's strongly typed network takes its precision from the ONNX dtypes",
        )
    gaps = ", ".join(CPU_KERNEL_GAPS[dtype][:8])
    note = (
        f"weights stored in {dtype} (half the disk of fp32) with a Cast to fp32 after each initializer, "
        f"computed in fp32: ONNX Runtime's CPU provider has no {dtype} kernel for {gaps}, ...; the casts are "
        "folded when the session is created, so a session holds fp32 weights (same RAM as fp32)"
    )
    if kv_cache == "inplace" and dtype == "bf16":
        return Precision(
            dtype,
            "fp32",
            "fp32",
            note + "; KV cache in fp32: GroupQueryAttention, which updates the cache in place, has no bf16 CPU kernel",
        )
    if kv_cache == "inplace":
        return Precision(
            dtype, "fp32", dtype, note + f"; KV cache and GroupQueryAttention in {dtype} (its CPU kernel takes fp16)"
        )
    return Precision(
        dtype, "fp32", dtype, note + f"; KV cache in {dtype} at the graph boundary (cast to fp32 inside the graph)"
    )
