"""Self-attention of one decoder layer, in the two KV-cache forms of :class:`~stlm.package.variant.Variant`.

Both share the fused QKV projection (:func:`qkv_projection`) and the output projection
(:func:`output_projection`). ``concat``: rotary (plain, plugin or native), present = past + new,
a causal and padding mask, softmax attention in ONNX ops. ``inplace``: ONNX Runtime's
GroupQueryAttention over a buffer shared by past and present, rotary fused (its inputs 0-8 only,
which every onnxruntime since 1.20 reads).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto

from stlm.export.layers import Parts, layer_quant, linear, read_linear
from stlm.export.rotary import rotary_plain
from stlm.package.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from stlm.package.contract import past_name as past
from stlm.package.contract import present_name as present
from stlm.package.dtypes import ONNX_ELEM
from stlm.package.variant import Rotary


def qkv_projection(p: Parts, h: str, layer: int, head_order: np.ndarray | None = None) -> str:
    """Q, K and V in one MatMul: (batch, seq, (heads + 2 kv_heads) * head_dim). ``head_order``
    permutes each Q/K head's dims (the fused rotary's layout)."""
    cfg, prefix = p.cfg, f"model.layers.{layer}.self_attn"

    def rows(kind: str, what: str, heads: int) -> np.ndarray:
        w = p.ckpt.read(f"{prefix}.{kind}_proj.{what}", np.float32)
        if head_order is None or kind == "v":
            return w
        return w.reshape(heads, cfg.head_dim, -1)[:, head_order].reshape(w.shape)

    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}
    weight = np.concatenate([rows(kind, "weight", n) for kind, n in heads.items()])
    qkv = linear(p, h, f"{prefix}.qkv_proj.weight", weight, layer_quant(p, layer))
    if cfg.use_qkv_bias:
        bias = np.concatenate([rows(kind, "bias", n) for kind, n in heads.items()])
        qkv = p.g.op("Add", qkv, p.g.weight(f"{prefix}.qkv_proj.bias", bias))
    return qkv


def output_projection(p: Parts, ctx: str, layer: int) -> str:
    """The attention output (batch, seq, hidden) through ``o_proj``."""
    name = f"model.layers.{layer}.self_attn.o_proj.weight"
    return linear(p, ctx, name, read_linear(p.ckpt, [name]), layer_quant(p, layer))


def _heads(p: Parts, x: str, n: int) -> str:
    """(batch, seq, n*head_dim) → (batch, n, seq, head_dim)."""
    g = p.g
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, p.cfg.head_dim])), perm=[0, 2, 1, 3])


def _repeat_kv(p: Parts, x: str) -> str:
    g, cfg = p.g, p.cfg
    rep = cfg.num_heads // cfg.num_kv_heads
    if rep == 1:
        return x
    shape = g.op("Shape", x)
    b_kv = g.op("Slice", shape, g.const([0]), g.const([2]), g.const([0]))
    t_d = g.op("Slice", shape, g.const([2]), g.const([4]), g.const([0]))
    expanded = g.op("Expand", g.op("Unsqueeze", x, g.const([2])), g.op("Concat", b_kv, g.const([rep]), t_d, axis=0))
    return g.op("Reshape", expanded, g.const([0, cfg.num_heads, -1, cfg.head_dim]))


def causal_padding_mask(p: Parts) -> str:
    """(batch, 1, seq, total) bool: causal over past + new positions, and not padding."""
    g = p.g
    seq = g.op("Squeeze", g.op("Shape", INPUT_IDS, start=1, end=2), g.const([0]))
    total = g.op("Squeeze", g.op("Shape", ATTENTION_MASK, start=1, end=2), g.const([0]))
    zero, one = g.const(0), g.const(1)
    k_pos = g.op("Range", zero, total, one)
    q_pos = g.op("Add", g.op("Range", zero, seq, one), g.op("Sub", total, seq))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.const([0])), g.op("Unsqueeze", q_pos, g.const([1])))
    keep = g.op("Cast", g.op("Unsqueeze", ATTENTION_MASK, g.const([1, 2])), to=TensorProto.BOOL)
    return g.op("And", causal, keep)


def _rotate(p: Parts, q: str, k: str, layer: int, rotary: Rotary, tables: tuple[str, str]) -> tuple[str, str]:
    """q and k (batch, heads, seq, head_dim) with the rotary embedding applied in form ``rotary``."""
    g, cfg = p.g, p.cfg
    if rotary == "native":  # ONNX RotaryEmbedding-23: partial via rotary_embedding_dim
        rotated = [
            g.op("RotaryEmbedding", x, *tables, POSITION_IDS, interleaved=0, rotary_embedding_dim=cfg.rotary_dim)
            for x in (q, k)
        ]
        return rotated[0], rotated[1]
    if rotary == "plugin":
        from stlm.plugins.partial_rotary.spec import make_onnx_node

        q_out, k_out = f"/layers.{layer}/rotary/q_out", f"/layers.{layer}/rotary/k_out"
        node = make_onnx_node(
            q, k, POSITION_IDS, q_out, k_out, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta,
            name=f"/layers.{layer}/partial_rotary",
        )  # fmt: skip
        g.nodes.append(node)
        return q_out, k_out
    return rotary_plain(g, q, *tables, cfg), rotary_plain(g, k, *tables, cfg)


def concat_attention(p: Parts, h: str, layer: int, rotary: Rotary, tables: tuple[str, str], allowed: str) -> str:
    """Attention with present = concat(past, new) and ``allowed`` (:func:`causal_padding_mask`)."""
    g, cfg = p.g, p.cfg
    kv_width = cfg.num_kv_heads * cfg.head_dim
    split = g.const([cfg.hidden_size, kv_width, kv_width])
    q, k, v = g.op("Split", qkv_projection(p, h, layer), split, axis=2, outputs=3)
    q, k, v = _heads(p, q, cfg.num_heads), _heads(p, k, cfg.num_kv_heads), _heads(p, v, cfg.num_kv_heads)
    q, k = _rotate(p, q, k, layer, rotary, tables)
    # The cache keeps the weight dtype at the boundary; attention reads it back in the compute dtype.
    keys = g.op("Concat", past(layer, "key"), g.cast(k, g.weights), axis=2, out_names=[present(layer, "key")])
    values = g.op("Concat", past(layer, "value"), g.cast(v, g.weights), axis=2, out_names=[present(layer, "value")])
    keys, values = _repeat_kv(p, g.cast(keys, g.compute)), _repeat_kv(p, g.cast(values, g.compute))
    scores = g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 3, 2]))
    scores = g.op("Mul", scores, g.const(cfg.head_dim**-0.5, g.compute))
    scores = g.op("Where", allowed, scores, g.const(float(ml_dtypes.finfo(g.compute).min), g.compute))
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), values)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, cfg.hidden_size]))
    return output_projection(p, ctx, layer)


def inplace_attention(
    p: Parts, h: str, layer: int, kv: np.dtype, caches: tuple[str, str], head_order: np.ndarray
) -> str:
    """GroupQueryAttention: KV (in dtype ``kv``, which the op also computes in) written in place,
    rotary fused (``caches`` from :func:`stlm.export.rotary.rotary_caches`, Q/K dims in ``head_order``)."""
    g, cfg = p.g, p.cfg
    qkv = qkv_projection(p, h, layer, head_order)
    if kv != g.compute:
        qkv = g.op("Cast", qkv, to=ONNX_ELEM[kv.name])
    inputs = [qkv, "", "", past(layer, "key"), past(layer, "value"), SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *caches]
    ctx, _, _ = g.op(
        "GroupQueryAttention",
        *inputs,
        domain="com.microsoft",
        name=f"/layers.{layer}/attention",
        out_names=[f"/layers.{layer}/attention/out", present(layer, "key"), present(layer, "value")],
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=cfg.head_dim**-0.5,
    )
    if kv != g.compute:
        ctx = g.op("Cast", ctx, to=ONNX_ELEM[g.compute.name])
    return output_projection(p, ctx, layer)
