"""Stage: check a checkpoint before anything is written: every weight's shape and dtype against
config.json, no layers beyond it, and the tokenizer against the embedding.

A package export writes is a package that loads and runs: a config that disagrees with its
weights (layers, heads, KV heads, intermediate size, a transposed embedding) or a tokenizer with
more tokens than the embedding has rows is refused here, with the tensor or field named.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from stlm.errors import CheckpointError
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import ModelConfig

_FLOAT_DTYPES: Final = ("F32", "F16", "BF16", "F64")
_LAYER: Final = re.compile(r"^model\.layers\.(\d+)\.")
_FIX: Final = "use the config.json that came with these weights (or download the checkpoint again)"


def expected_shapes(cfg: ModelConfig, ckpt: SafetensorsCheckpoint) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(tensor, shape, the config fields that shape follows from) for every tensor export reads."""
    h, q, kv, inter = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    yield "model.embed_tokens.weight", (cfg.vocab_size, h), "vocab_size × hidden_size"
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{norm}.weight", (h,), "hidden_size"
            yield f"{p}.{norm}.bias", (h,), "hidden_size"
        for proj, rows, why in (("q", q, "num_attention_heads"), ("k", kv, "num_key_value_heads"), ("v", kv, "")):
            why = why or "num_key_value_heads"
            yield f"{p}.self_attn.{proj}_proj.weight", (rows, h), f"{why} × head_dim, hidden_size"
            if cfg.use_qkv_bias:
                yield f"{p}.self_attn.{proj}_proj.bias", (rows,), f"{why} × head_dim"
        yield f"{p}.self_attn.o_proj.weight", (h, q), "hidden_size, num_attention_heads × head_dim"
        yield f"{p}.mlp.gate_proj.weight", (inter, h), "intermediate_size × hidden_size"
        yield f"{p}.mlp.up_proj.weight", (inter, h), "intermediate_size × hidden_size"
        yield f"{p}.mlp.down_proj.weight", (h, inter), "hidden_size × intermediate_size"
    yield "model.norm.weight", (h,), "hidden_size"
    yield "model.norm.bias", (h,), "hidden_size"
    if not cfg.tie_word_embeddings and "lm_head.weight" in ckpt:
        yield "lm_head.weight", (cfg.vocab_size, h), "vocab_size × hidden_size"


def check_weights(cfg: ModelConfig, ckpt: SafetensorsCheckpoint, source: str) -> None:
    """:class:`CheckpointError` unless every tensor export reads is present, float, and shaped as
    ``cfg`` says, and the checkpoint has no decoder layer beyond ``cfg.num_layers``."""
    for name, shape, why in expected_shapes(cfg, ckpt):
        if name not in ckpt:
            raise CheckpointError(
                f"{source} has no tensor {name!r}, which config.json implies",
                fix="download every shard of the checkpoint, or " + _FIX,
            )
        found, dtype = ckpt.shape(name), ckpt.dtype(name)
        if found != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(found)}, but config.json implies {list(shape)} ({why})",
                fix=_FIX,
            )
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} is stored as {dtype}; expected one of {', '.join(_FLOAT_DTYPES)}",
                fix="use a floating-point checkpoint (stlm quantizes at export with --quantize)",
            )
    extra = sorted({int(m.group(1)) for n in ckpt.names() if (m := _LAYER.match(n))} - set(range(cfg.num_layers)))
    if extra:
        raise CheckpointError(
            f"{source} has weights for decoder layer {extra[0]}, but config.json says num_hidden_layers "
            f"{cfg.num_layers}",
            fix=_FIX,
        )


def check_tokenizer(cfg: ModelConfig, tokenizer: Path) -> None:
    """:class:`CheckpointError` unless ``tokenizer`` parses and every id it can produce (and the
    bos/eos ids) has a row in the embedding."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for any malformed file
        raise CheckpointError(
            f"{tokenizer} is not a valid tokenizer.json ({str(exc)[:200]})",
            fix="copy the checkpoint's tokenizer.json (the fast tokenizer file) again",
        ) from None
    ids = tok.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if top >= cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer} has token id {top}, but the embedding has {cfg.vocab_size} rows (config.json vocab_size)",
            fix="use the tokenizer.json that came with these weights",
        )
