"""Rotary embedding pieces of the decoder graph (NeoX rotate_half on the first rotary_dim dims).

Three forms: plain ONNX ops (:func:`rotary_plain` on :func:`rope_tables`), ONNX RotaryEmbedding
(tables from :func:`rotary_caches`), and the fused rotary of ONNX Runtime's GroupQueryAttention,
which needs the head-dim permutation of :func:`gqa_rotary_layout`. Frequencies and angles come
from :mod:`stlm.package.rope`.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from stlm.errors import UnsupportedModelError
from stlm.export.onnx_builder import GraphBuilder
from stlm.package import rope
from stlm.package.config import ModelConfig
from stlm.package.contract import POSITION_IDS
from stlm.package.dtypes import ONNX_TYPE, DType, numpy_dtype
from stlm.package.variant import Rotary


def rotary_plain(g: GraphBuilder, x: str, cos: str, sin: str, cfg: ModelConfig) -> str:
    """NeoX rotate_half rotary on the first rotary_dim dims of the last axis of ``x``."""
    rot, half = cfg.rotary_dim, cfg.rotary_dim // 2
    axis = g.const([3])
    x_rot = g.op("Slice", x, g.const([0]), g.const([rot]), axis)
    x_pass = g.op("Slice", x, g.const([rot]), g.const([cfg.head_dim]), axis)
    x1 = g.op("Slice", x_rot, g.const([0]), g.const([half]), axis)
    x2 = g.op("Slice", x_rot, g.const([half]), g.const([rot]), axis)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=3)
    emb = g.op("Add", g.op("Mul", x_rot, cos), g.op("Mul", rotated, sin))
    return g.op("Concat", emb, x_pass, axis=3)


def gqa_rotary_layout(cfg: ModelConfig) -> tuple[int, np.ndarray]:
    """ONNX Runtime's fused rotary needs a cos/sin width that is a multiple of 8 (StableLM-3B has
    rotary_dim/2 = 10). Pick the width ``c`` = rotary_dim/2 rounded up to 8 and a permutation of
    each Q/K head's dims that puts the rotary pairs (j, j + rotary_dim/2) at (j, j + c); the extra
    table columns are cos 1 / sin 0, i.e. pass-through. Q·K is unchanged by permuting both alike,
    so attention is exact; only the in-place K cache is stored in the permuted layout."""
    half = cfg.rotary_dim // 2
    width = -(-half // 8) * 8
    if 2 * width > cfg.head_dim:
        raise UnsupportedModelError(
            f"head dim {cfg.head_dim} is too small for ONNX Runtime's fused rotary (needs ≥ {2 * width})",
            fix="export with --kv-cache concat",
        )
    perm = list(range(half)) + list(range(2 * half, 2 * half + width - half))
    perm += list(range(half, 2 * half)) + list(range(2 * half + width - half, cfg.head_dim))
    assert sorted(perm) == list(range(cfg.head_dim))
    return width, np.array(perm)


def rotary_caches(g: GraphBuilder, cfg: ModelConfig, dtype: DType, width: int) -> tuple[str, str]:
    """(max_positions, width) cos/sin tables in ``dtype`` (GroupQueryAttention's and RotaryEmbedding's),
    computed in fp32 like transformers; padded columns are cos 1 / sin 0 (identity)."""
    positions = np.arange(cfg.max_position_embeddings)
    cos_half, sin_half = rope.cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)
    cos = np.ones((cfg.max_position_embeddings, width), np.float32)
    sin = np.zeros((cfg.max_position_embeddings, width), np.float32)
    cos[:, : cos_half.shape[1]], sin[:, : sin_half.shape[1]] = cos_half, sin_half
    stored = numpy_dtype(dtype)
    return g.store.add("rotary.cos_cache", cos.astype(stored)), g.store.add("rotary.sin_cache", sin.astype(stored))


def rope_tables(g: GraphBuilder, cfg: ModelConfig, dtype: DType, rotary: Rotary) -> tuple[str, str]:
    """The cos/sin the concat graph's rotary reads, in the compute ``dtype``: 'plain' → (batch, 1,
    seq, rotary_dim) from position_ids; 'native' → the (max_positions, rotary_dim/2) tables ONNX
    RotaryEmbedding indexes; 'plugin' → ('', ''), the plugin computes its own."""
    if rotary == "plugin":
        return "", ""
    if rotary == "native":
        return rotary_caches(g, cfg, dtype, cfg.rotary_dim // 2)
    freqs = g.op(
        "Mul",
        g.op("Unsqueeze", g.op("Cast", POSITION_IDS, to=TensorProto.FLOAT), g.const([2])),
        g.const(rope.inv_freq(cfg.rotary_dim, cfg.rope_theta), np.float32),
    )
    emb = g.op("Concat", freqs, freqs, axis=2)
    cos, sin = (
        g.op("Unsqueeze", g.op("Cast", g.op(fn, emb), to=ONNX_TYPE[dtype]), g.const([1])) for fn in ("Cos", "Sin")
    )
    return cos, sin
