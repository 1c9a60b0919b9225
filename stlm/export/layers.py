"""The decoder's building blocks as ONNX nodes: linear layers (plain or MatMulNBits), LayerNorm, MLP.

Every block reads its weights from the checkpoint by name as it is written, so the graph is built
one tensor at a time. :class:`Parts` carries what every block needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stlm.config import ModelConfig
from stlm.export.onnx_builder import GraphBuilder
from stlm.export.quantize import quantize_blockwise
from stlm.export.weights import SafetensorsCheckpoint
from stlm.variant import Quantization


@dataclass(frozen=True)
class Parts:
    """The graph being written, the checkpoint it reads, the model's shape, the quantization."""

    g: GraphBuilder
    ckpt: SafetensorsCheckpoint
    cfg: ModelConfig
    quantization: Quantization | None


def read_linear(ckpt: SafetensorsCheckpoint, names: Sequence[str]) -> np.ndarray:
    """Linear weights (out, in) as float32, stacked along 'out' (fused projections)."""
    return np.concatenate([ckpt.read(n, np.float32) for n in names], axis=0)


def linear(p: Parts, x: str, name: str, weight: np.ndarray, bits: int | None) -> str:
    """``x @ weight.T``: a MatMul on a (in, out) initializer, or MatMulNBits on ``bits``-bit blocks."""
    g = p.g
    if bits is None or p.quantization is None:
        return g.op("MatMul", x, g.weight(name, np.ascontiguousarray(weight.T)))
    q = quantize_blockwise(weight, bits, p.quantization.block_size)
    return g.op(
        "MatMulNBits",
        x,
        g.store.add(f"{name}.q{bits}", q.packed),
        g.weight(f"{name}.scales", q.scales),
        g.store.add(f"{name}.zero_points", q.zero_points),
        domain="com.microsoft",
        K=q.k,
        N=q.n,
        bits=bits,
        block_size=q.block_size,
        accuracy_level=p.quantization.accuracy_level,
    )


def layer_bits(p: Parts) -> int | None:
    """Bits of the decoder layers' linear weights (None: not quantized)."""
    return None if p.quantization is None else p.quantization.bits


def layer_norm(p: Parts, x: str, prefix: str) -> str:
    """LayerNormalization with the checkpoint's ``prefix.weight`` and ``prefix.bias``."""
    g = p.g
    w = g.weight(f"{prefix}.weight", p.ckpt.read(f"{prefix}.weight", g.weights))
    b = g.weight(f"{prefix}.bias", p.ckpt.read(f"{prefix}.bias", g.weights))
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=p.cfg.layer_norm_eps)


def mlp(p: Parts, h: str, layer: int) -> str:
    """SwiGLU: ``down(silu(gate(h)) * up(h))``, gate and up fused into one projection."""
    prefix = f"model.layers.{layer}.mlp"
    gate_up_weight = read_linear(p.ckpt, [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"])
    gate_up = linear(p, h, f"{prefix}.gate_up_proj.weight", gate_up_weight, layer_bits(p))
    gate, up = p.g.op("Split", gate_up, p.g.const([p.cfg.intermediate_size] * 2), axis=2, outputs=2)
    act = p.g.op("Mul", p.g.op("Mul", gate, p.g.op("Sigmoid", gate)), up)
    down = read_linear(p.ckpt, [f"{prefix}.down_proj.weight"])
    return linear(p, act, f"{prefix}.down_proj.weight", down, layer_bits(p))
