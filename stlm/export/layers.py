"""The decoder's building blocks as ONNX nodes: linear layers (plain or MatMulNBits), LayerNorm, MLP.

Every block reads its weights from the checkpoint by name as it is written, so the graph is built
one tensor at a time. :class:`Parts` carries what every block needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stlm.export.onnx_builder import GraphBuilder
from stlm.export.quantize import quantize_weight
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import ModelConfig
from stlm.package.variant import Quantization


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


def linear(p: Parts, x: str, name: str, weight: np.ndarray, quant: Quantization | None) -> str:
    """``x @ weight.T``: a MatMul on a (in, out) initializer, or MatMulNBits on ``quant``'s blocks."""
    g = p.g
    if quant is None:
        return g.op("MatMul", x, g.weight(name, np.ascontiguousarray(weight.T)))
    q = quantize_weight(weight, quant.bits, method=quant.method, block_size=quant.block_size, symmetric=quant.symmetric)
    inputs = [x, g.store.add(f"{name}.q{quant.bits}", q.packed), g.weight(f"{name}.scales", q.scales)]
    if q.zero_points is not None:  # uint8: packed like B; float (hqq): one per scale, in the scales' dtype
        zp = f"{name}.zero_points"
        inputs.append(
            g.store.add(zp, q.zero_points) if q.zero_points.dtype == np.uint8 else g.weight(zp, q.zero_points)
        )
    return g.op(
        "MatMulNBits",
        *inputs,
        domain="com.microsoft",
        K=q.k,
        N=q.n,
        bits=quant.bits,
        block_size=q.block_size,
        accuracy_level=quant.accuracy_level,
    )


def layer_quant(p: Parts, layer: int) -> Quantization | None:
    """Quantization of decoder layer ``layer``'s linear weights (None: not quantized)."""
    return None if p.quantization is None else p.quantization.for_layer(layer, p.cfg.num_layers)


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
    gate_up = linear(p, h, f"{prefix}.gate_up_proj.weight", gate_up_weight, layer_quant(p, layer))
    gate, up = p.g.op("Split", gate_up, p.g.const([p.cfg.intermediate_size] * 2), axis=2, outputs=2)
    act = p.g.op("Mul", p.g.op("Mul", gate, p.g.op("Sigmoid", gate)), up)
    down = read_linear(p.ckpt, [f"{prefix}.down_proj.weight"])
    return linear(p, act, f"{prefix}.down_proj.weight", down, layer_quant(p, layer))
