"""Build the StableLM decoder as an ONNX graph, tensor by tensor from the checkpoint.

The graph is written directly (no tracing): one merged prefill/decode graph whose inputs and
outputs are exactly :func:`stlm.contract.decoder_contract`. Weights stream from safetensors into
the initializer store one at a time, so memory stays at about one tensor, whatever the model size.
The rotary embedding is plain ONNX ops, fused into GroupQueryAttention (in-place variant), a
``stlm::partial_rotary`` plugin node per layer, or ONNX's own ``RotaryEmbedding`` (opset 23).
Weights are stored in the package dtype; where the graph computes in another dtype
(:mod:`stlm.export.precision`), each weight is followed by a Cast to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from stlm.config import ModelConfig
from stlm.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    QUERY_SEQLENS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Contract,
    past_name,
    present_name,
)
from stlm.dtypes import DType
from stlm.export.onnx_builder import NP_DTYPE, ONNX_ELEM, GraphBuilder, InitializerStore
from stlm.export.precision import Precision
from stlm.export.quantize import Quantization, quantize_weight
from stlm.export.rotary import gqa_rotary_layout, rope_tables, rotary_caches, rotary_plain
from stlm.export.weights import SafetensorsCheckpoint

log = logging.getLogger(__name__)

Rotary = Literal["plain", "plugin", "native"]
TENSORRT_ROTARIES = ("plugin", "native")
Progress = Callable[[str, int, int], None]


def estimate_weight_bytes(cfg: ModelConfig, dtype: DType) -> int:
    """Bytes of all weights of ``cfg`` in ``dtype`` (to choose inline vs external data)."""
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 4 * h
    heads = v * h * (1 if cfg.tie_word_embeddings else 2) + 2 * h
    return (per_layer * layers + heads) * NP_DTYPE[dtype].itemsize


def _weights_nk(ckpt: SafetensorsCheckpoint, names: Sequence[str]) -> np.ndarray:
    """Linear weights (out, in) as float32, concatenated along 'out' (fused projections)."""
    return np.concatenate([ckpt.read(n, np.float32) for n in names], axis=0)


def _linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray, quant: Quantization | None) -> str:
    """``x @ weight.T``: a MatMul on a (in, out) initializer, or MatMulNBits on ``quant``'s blocks."""
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


def _layer_norm(g: GraphBuilder, x: str, ckpt: SafetensorsCheckpoint, prefix: str, cfg: ModelConfig) -> str:
    w = g.weight(f"{prefix}.weight", ckpt.read(f"{prefix}.weight", g.weights))
    b = g.weight(f"{prefix}.bias", ckpt.read(f"{prefix}.bias", g.weights))
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=cfg.layer_norm_eps)


def _heads(g: GraphBuilder, x: str, n: int, cfg: ModelConfig) -> str:
    """(batch, seq, n*head_dim) → (batch, n, seq, head_dim)."""
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, cfg.head_dim])), perm=[0, 2, 1, 3])


def _repeat_kv(g: GraphBuilder, x: str, cfg: ModelConfig) -> str:
    rep = cfg.num_heads // cfg.num_kv_heads
    if rep == 1:
        return x
    shape = g.op("Shape", x)
    b_kv = g.op("Slice", shape, g.const([0]), g.const([2]), g.const([0]))
    t_d = g.op("Slice", shape, g.const([2]), g.const([4]), g.const([0]))
    expanded = g.op("Expand", g.op("Unsqueeze", x, g.const([2])), g.op("Concat", b_kv, g.const([rep]), t_d, axis=0))
    return g.op("Reshape", expanded, g.const([0, cfg.num_heads, -1, cfg.head_dim]))


def _attention(
    g: GraphBuilder,
    h: str,
    i: int,
    ckpt: SafetensorsCheckpoint,
    cfg: ModelConfig,
    rope: tuple[str, str],
    allowed: str,
    rotary: Rotary,
    quant: Quantization | None,
) -> str:
    p = f"model.layers.{i}.self_attn"
    dtype = g.compute
    qkv = _linear(g, h, f"{p}.qkv_proj.weight", _weights_nk(ckpt, [f"{p}.{n}_proj.weight" for n in "qkv"]), quant)
    if cfg.use_qkv_bias:
        bias = np.concatenate([ckpt.read(f"{p}.{n}_proj.bias", np.float32) for n in "qkv"])
        qkv = g.op("Add", qkv, g.weight(f"{p}.qkv_proj.bias", bias))
    kv_width = cfg.num_kv_heads * cfg.head_dim
    q, k, v = g.op("Split", qkv, g.const([cfg.hidden_size, kv_width, kv_width]), axis=2, outputs=3)
    q, k, v = _heads(g, q, cfg.num_heads, cfg), _heads(g, k, cfg.num_kv_heads, cfg), _heads(g, v, cfg.num_kv_heads, cfg)
    if rotary == "native":  # ONNX RotaryEmbedding-23: (batch, heads, seq, head_dim), partial via rotary_embedding_dim
        q, k = (
            g.op("RotaryEmbedding", x, *rope, POSITION_IDS, interleaved=0, rotary_embedding_dim=cfg.rotary_dim)
            for x in (q, k)
        )
    elif rotary == "plugin":
        from stlm.plugins.partial_rotary.spec import make_onnx_node

        q_r, k_r = f"/layers.{i}/rotary/q_out", f"/layers.{i}/rotary/k_out"
        g.nodes.append(
            make_onnx_node(
                q,
                k,
                POSITION_IDS,
                q_r,
                k_r,
                rotary_dim=cfg.rotary_dim,
                theta=cfg.rope_theta,
                name=f"/layers.{i}/partial_rotary",
            )
        )
        q, k = q_r, k_r
    else:
        q, k = rotary_plain(g, q, *rope, cfg), rotary_plain(g, k, *rope, cfg)
    # The cache keeps the weight dtype at the boundary; attention reads it back in the compute dtype.
    k_all = g.op("Concat", past_name(i, "key"), g.cast(k, g.weights), axis=2, out_names=[present_name(i, "key")])
    v_all = g.op("Concat", past_name(i, "value"), g.cast(v, g.weights), axis=2, out_names=[present_name(i, "value")])
    k_all, v_all = _repeat_kv(g, g.cast(k_all, dtype), cfg), _repeat_kv(g, g.cast(v_all, dtype), cfg)
    scores = g.op("MatMul", q, g.op("Transpose", k_all, perm=[0, 1, 3, 2]))
    scores = g.op("Mul", scores, g.const(cfg.head_dim**-0.5, dtype))
    scores = g.op("Where", allowed, scores, g.const(float(ml_dtypes.finfo(dtype).min), dtype))
    probs = g.op("Softmax", scores, axis=-1)
    ctx = g.op("MatMul", probs, v_all)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, cfg.hidden_size]))
    return _linear(g, ctx, f"{p}.o_proj.weight", _weights_nk(ckpt, [f"{p}.o_proj.weight"]), quant)


def _attention_inplace(
    g: GraphBuilder,
    h: str,
    i: int,
    ckpt: SafetensorsCheckpoint,
    cfg: ModelConfig,
    kv: np.dtype,
    caches: tuple[str, str],
    perm: np.ndarray,
    quant: Quantization | None,
) -> str:
    """Attention through ONNX Runtime's GroupQueryAttention: KV (in dtype ``kv``, which the op also
    computes in) written in place, rotary fused."""
    p = f"model.layers.{i}.self_attn"

    def permuted(name: str, heads: int) -> np.ndarray:  # rows (heads*head_dim, ...) in the fused-rotary layout
        w = ckpt.read(name, np.float32)
        return w.reshape(heads, cfg.head_dim, -1)[:, perm].reshape(w.shape)

    weights = [
        permuted(f"{p}.q_proj.weight", cfg.num_heads),
        permuted(f"{p}.k_proj.weight", cfg.num_kv_heads),
        ckpt.read(f"{p}.v_proj.weight", np.float32),
    ]
    qkv = _linear(g, h, f"{p}.qkv_proj.weight", np.concatenate(weights), quant)
    if cfg.use_qkv_bias:
        biases = [
            permuted(f"{p}.q_proj.bias", cfg.num_heads),
            permuted(f"{p}.k_proj.bias", cfg.num_kv_heads),
            ckpt.read(f"{p}.v_proj.bias", np.float32),
        ]
        qkv = g.op("Add", qkv, g.weight(f"{p}.qkv_proj.bias", np.concatenate(biases)))
    if kv != g.compute:
        qkv = g.op("Cast", qkv, to=ONNX_ELEM[kv.name])
    inputs = [
        qkv,
        "",
        "",
        past_name(i, "key"),
        past_name(i, "value"),
        SEQLENS_K,
        TOTAL_SEQUENCE_LENGTH,
        *caches,
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        QUERY_SEQLENS,
    ]
    ctx, _, _ = g.op(
        "GroupQueryAttention",
        *inputs,
        domain="com.microsoft",
        name=f"/layers.{i}/attention",
        out_names=[f"/layers.{i}/attention/out", present_name(i, "key"), present_name(i, "value")],
        num_heads=cfg.num_heads,
        kv_num_heads=cfg.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=cfg.head_dim**-0.5,
    )
    if kv != g.compute:
        ctx = g.op("Cast", ctx, to=ONNX_ELEM[g.compute.name])
    return _linear(g, ctx, f"{p}.o_proj.weight", _weights_nk(ckpt, [f"{p}.o_proj.weight"]), quant)


def _last_valid(g: GraphBuilder, x: str, cfg: ModelConfig) -> str:
    """(batch, seq, hidden) → (batch, 1, hidden): each row's last valid token (query_seqlens - 1)."""
    index = g.op("Sub", g.op("Cast", QUERY_SEQLENS, to=TensorProto.INT64), g.const(1))
    index = g.op("Expand", g.op("Reshape", index, g.const([-1, 1, 1])), g.const([1, 1, cfg.hidden_size]))
    return g.op("GatherElements", x, index, axis=1)


def _mlp(
    g: GraphBuilder, h: str, i: int, ckpt: SafetensorsCheckpoint, cfg: ModelConfig, quant: Quantization | None
) -> str:
    p = f"model.layers.{i}.mlp"
    gate_up = _linear(
        g, h, f"{p}.gate_up_proj.weight", _weights_nk(ckpt, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"]), quant
    )
    gate, up = g.op("Split", gate_up, g.const([cfg.intermediate_size] * 2), axis=2, outputs=2)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    return _linear(g, act, f"{p}.down_proj.weight", _weights_nk(ckpt, [f"{p}.down_proj.weight"]), quant)


def _causal_padding_mask(g: GraphBuilder) -> str:
    """(batch, 1, seq, total) bool: causal over past + new positions, and not padding."""
    seq = g.op("Squeeze", g.op("Shape", INPUT_IDS, start=1, end=2), g.const([0]))
    total = g.op("Squeeze", g.op("Shape", ATTENTION_MASK, start=1, end=2), g.const([0]))
    zero, one = g.const(0), g.const(1)
    k_pos = g.op("Range", zero, total, one)
    q_pos = g.op("Add", g.op("Range", zero, seq, one), g.op("Sub", total, seq))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.const([0])), g.op("Unsqueeze", q_pos, g.const([1])))
    keep = g.op("Cast", g.op("Unsqueeze", ATTENTION_MASK, g.const([1, 2])), to=TensorProto.BOOL)
    return g.op("And", causal, keep)


def build_decoder(
    cfg: ModelConfig,
    ckpt: SafetensorsCheckpoint,
    contract: Contract,
    dtype: DType,
    *,
    opset: int,
    data_path: Path | None,
    rotary: Rotary = "plain",
    kv_cache: str = "concat",
    quantize: Quantization | None = None,
    precision: Precision | None = None,
    progress: Progress | None = None,
) -> onnx.ModelProto:
    """Build the decoder graph for ``cfg`` with ``ckpt``'s weights in ``dtype``.

    ``precision``: the weight / compute / KV dtypes (:func:`stlm.export.precision.plan_precision`);
    None computes and caches in ``dtype`` too.
    ``data_path`` set: weights go to that external data file; None: weights are inline.
    ``kv_cache``: 'concat' (portable ONNX ops, present = past + new) or 'inplace' (ONNX Runtime's
    GroupQueryAttention over a preallocated buffer shared by past and present).
    ``quantize``: weight-only MatMulNBits for the linear layers (:class:`stlm.export.quantize.Quantization`).
    """
    inplace = kv_cache == "inplace"
    assert not (inplace and rotary != "plain"), "the TensorRT rotaries are for the concat graph"
    plan = precision or Precision(dtype, dtype, dtype)
    assert plan.weights == dtype, "the package dtype is the weight dtype"
    store = InitializerStore(data_path)
    g = GraphBuilder(store, NP_DTYPE[plan.weights], NP_DTYPE[plan.compute])
    try:
        # The table stays in the weight dtype (Gather has fp16/bf16 CPU kernels); only the rows gathered are cast.
        embed = store.add("model.embed_tokens.weight", ckpt.read("model.embed_tokens.weight", g.weights))
        x = g.cast(g.op("Gather", embed, INPUT_IDS, axis=0), g.compute)
        if inplace:
            width, perm = gqa_rotary_layout(cfg)
            caches = rotary_caches(g, cfg, NP_DTYPE[plan.kv], width)
        else:
            rope, allowed = rope_tables(g, cfg, plan.compute, rotary), _causal_padding_mask(g)
        for i in range(cfg.num_layers):
            if progress:
                progress("layers", i, cfg.num_layers)
            layer_quant = quantize.for_layer(i, cfg.num_layers) if quantize else None
            h = _layer_norm(g, x, ckpt, f"model.layers.{i}.input_layernorm", cfg)
            if inplace:
                attn = _attention_inplace(g, h, i, ckpt, cfg, NP_DTYPE[plan.kv], caches, perm, layer_quant)
            else:
                attn = _attention(g, h, i, ckpt, cfg, rope, allowed, rotary, layer_quant)
            if cfg.use_parallel_residual:
                x = g.op("Add", g.op("Add", x, attn), _mlp(g, h, i, ckpt, cfg, layer_quant))
            else:
                x = g.op("Add", x, attn)
                h2 = _layer_norm(g, x, ckpt, f"model.layers.{i}.post_attention_layernorm", cfg)
                x = g.op("Add", x, _mlp(g, h2, i, ckpt, cfg, layer_quant))
        if progress:
            progress("layers", cfg.num_layers, cfg.num_layers)
        if inplace:
            x = _last_valid(g, x, cfg)
        x = _layer_norm(g, x, ckpt, "model.norm", cfg)
        head_name = (
            "model.embed_tokens.weight" if cfg.tie_word_embeddings or "lm_head.weight" not in ckpt else "lm_head.weight"
        )
        logits = _linear(
            g, x, "lm_head.weight", _weights_nk(ckpt, [head_name]), quantize.for_lm_head() if quantize else None
        )
        if plan.compute != "fp32":
            g.op("Cast", logits, to=TensorProto.FLOAT, out_names=[LOGITS])
        else:
            g.op("Identity", logits, out_names=[LOGITS])
    finally:
        store.close()

    def value_info(spec: Any) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(spec.name, ONNX_ELEM[spec.dtype], list(spec.axes))

    graph = helper.make_graph(
        g.nodes,
        "stlm_stablelm_decoder",
        [value_info(s) for s in contract.inputs],
        [value_info(s) for s in contract.outputs],
        initializer=store.tensors,
    )
    imports = [helper.make_opsetid("", opset)]
    if inplace or quantize:
        imports.append(helper.make_opsetid("com.microsoft", 1))
    if rotary == "plugin":
        from stlm.plugins.partial_rotary.spec import ONNX_DOMAIN

        if ONNX_DOMAIN:
            imports.append(helper.make_opsetid(ONNX_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=imports, producer_name="stlm")
    model.ir_version = min(model.ir_version, 10)
    log.info("built graph: %d nodes, %.1f MB of weights", len(g.nodes), store.nbytes / 1e6)
    return model
