"""Build the StableLM decoder as an ONNX graph, tensor by tensor from the checkpoint.

The graph is written directly (no tracing): one merged prefill/decode graph whose inputs and
outputs are exactly :func:`stlm.package.contract.decoder_contract` of its :class:`~stlm.package.variant.Variant`.
Weights stream from safetensors into the initializer store one at a time, so memory stays at
about one tensor, whatever the model size. Weights are stored in the variant's weight dtype;
where the graph computes in another dtype (:mod:`stlm.export.precision`), each weight is followed
by a Cast to it. The hidden states are gathered at ``logits_index`` before the final LayerNorm
and the LM head, so a decode step computes the head for one position per row only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from stlm.export.attention import causal_padding_mask, concat_attention, inplace_attention
from stlm.export.layers import Parts, layer_norm, linear, mlp, read_linear
from stlm.export.onnx_builder import GraphBuilder, InitializerStore
from stlm.export.rotary import gqa_rotary_layout, rope_tables, rotary_caches
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import ModelConfig
from stlm.package.contract import INPUT_IDS, LOGITS, LOGITS_INDEX, TensorSpec, decoder_contract
from stlm.package.dtypes import ONNX_ELEM, DType, numpy_dtype
from stlm.package.variant import Variant
from stlm.support.progress import Progress

log = logging.getLogger(__name__)

GRAPH_NAME = "stlm_stablelm_decoder"
MAX_IR_VERSION = 10  # onnxruntime 1.20 reads IR ≤ 10


def estimate_weight_bytes(cfg: ModelConfig, dtype: DType) -> int:
    """Bytes of all weights of ``cfg`` in ``dtype`` (to choose inline vs external data)."""
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 4 * h
    heads = v * h * (1 if cfg.tie_word_embeddings else 2) + 2 * h
    return (per_layer * layers + heads) * numpy_dtype(dtype).itemsize


def _embed(p: Parts) -> str:
    """Token embeddings in the compute dtype. The table stays in the weight dtype (Gather has fp16/bf16
    CPU kernels); only the rows gathered are cast."""
    g = p.g
    table = g.store.add("model.embed_tokens.weight", p.ckpt.read("model.embed_tokens.weight", g.weights))
    return g.cast(g.op("Gather", table, INPUT_IDS, axis=0), g.compute)


def _layers(p: Parts, x: str, variant: Variant, progress: Progress | None) -> str:
    """Every decoder layer over the hidden states ``x`` (batch, seq, hidden)."""
    g, cfg = p.g, p.cfg
    if variant.inplace:
        width, head_order = gqa_rotary_layout(cfg)
        caches = rotary_caches(g, cfg, variant.kv_dtype, width)
    else:
        tables, allowed = rope_tables(g, cfg, variant.compute_dtype, variant.rotary), causal_padding_mask(p)
    for i in range(cfg.num_layers):
        if progress:
            progress("layers", i, cfg.num_layers)
        h = layer_norm(p, x, f"model.layers.{i}.input_layernorm")
        if variant.inplace:
            attn = inplace_attention(p, h, i, numpy_dtype(variant.kv_dtype), caches, head_order)
        else:
            attn = concat_attention(p, h, i, variant.rotary, tables, allowed)
        if cfg.use_parallel_residual:
            x = g.op("Add", g.op("Add", x, attn), mlp(p, h, i))
        else:
            x = g.op("Add", x, attn)
            x = g.op("Add", x, mlp(p, layer_norm(p, x, f"model.layers.{i}.post_attention_layernorm"), i))
    if progress:
        progress("layers", cfg.num_layers, cfg.num_layers)
    return x


def _select_positions(p: Parts, x: str) -> str:
    """(batch, seq, hidden) → (batch, num_logits, hidden): the rows at ``logits_index``."""
    g = p.g
    index = g.op("Expand", g.op("Unsqueeze", LOGITS_INDEX, g.const([2])), g.const([1, 1, p.cfg.hidden_size]))
    return g.op("GatherElements", x, index, axis=1)


def _lm_head(p: Parts, x: str) -> None:
    """Final LayerNorm and the LM head into the float32 ``logits`` output."""
    g, cfg = p.g, p.cfg
    x = layer_norm(p, x, "model.norm")
    untied = not cfg.tie_word_embeddings and "lm_head.weight" in p.ckpt
    weight = read_linear(p.ckpt, ["lm_head.weight" if untied else "model.embed_tokens.weight"])
    quant = None if p.quantization is None else p.quantization.for_lm_head()
    logits = linear(p, x, "lm_head.weight", weight, quant)
    if g.compute != numpy_dtype("fp32"):
        g.op("Cast", logits, to=TensorProto.FLOAT, out_names=[LOGITS])
    else:
        g.op("Identity", logits, out_names=[LOGITS])


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, ONNX_ELEM[spec.dtype], list(spec.axes))


def _opset_imports(variant: Variant, opset: int) -> list[onnx.OperatorSetIdProto]:
    imports = [helper.make_opsetid("", opset)]
    if variant.inplace or variant.quantization is not None:
        imports.append(helper.make_opsetid("com.microsoft", 1))
    if variant.rotary == "plugin":
        from stlm.plugins.partial_rotary.spec import onnx_opset_import

        imports.append(onnx_opset_import())
    return imports


def build_decoder(
    cfg: ModelConfig,
    ckpt: SafetensorsCheckpoint,
    variant: Variant,
    *,
    opset: int,
    data_path: Path | None,
    progress: Progress | None = None,
) -> onnx.ModelProto:
    """The decoder graph of ``cfg`` with ``ckpt``'s weights, as ``variant`` describes it.

    ``data_path`` set: weights go to that external data file; None: weights are inline.
    """
    store = InitializerStore(data_path)
    g = GraphBuilder(store, numpy_dtype(variant.weight_dtype), numpy_dtype(variant.compute_dtype))
    p = Parts(g, ckpt, cfg, variant.quantization)
    try:
        _lm_head(p, _select_positions(p, _layers(p, _embed(p), variant, progress)))
    finally:
        store.close()
    contract = decoder_contract(cfg, variant)
    graph = helper.make_graph(
        g.nodes,
        GRAPH_NAME,
        [_value_info(s) for s in contract.inputs],
        [_value_info(s) for s in contract.outputs],
        initializer=store.tensors,
    )
    model = helper.make_model(graph, opset_imports=_opset_imports(variant, opset), producer_name="stlm")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    log.info("built graph: %d nodes, %.1f MB of weights", len(g.nodes), store.nbytes / 1e6)
    return model
