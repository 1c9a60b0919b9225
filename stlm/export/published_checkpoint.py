"""A random-weight checkpoint written the way stabilityai/stablelm-3b-4e1t is published.

That is: a transformers-4.38-style ``config.json`` (model_type 'stablelm', top-level ``rope_theta``
and ``partial_rotary_factor``, ``torch_dtype: "bfloat16"``, no ``rope_parameters``), bfloat16
safetensors in shards with ``model.safetensors.index.json``, and the tokenizer as ``tokenizer.json``
+ ``tokenizer_config.json`` + ``special_tokens_map.json``. Tensors are generated one at a time
with numpy and streamed into the shards, so even the full 2.8B-parameter model needs no torch and
about one tensor of memory (the largest, the 50304 × 2560 embedding, is 0.5 GB in fp32).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import ml_dtypes
import numpy as np

from stlm.errors import InvalidArgumentError

log = logging.getLogger(__name__)

SPECIAL_TOKEN: Final = "<|endoftext|>"
INIT_STD: Final = 0.02  # the checkpoint's initializer_range


@dataclass(frozen=True)
class Shape:
    """The architecture fields of the published config."""

    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 6912
    vocab_size: int = 50304
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    layer_norm_eps: float = 1e-5


STABLELM_3B_4E1T: Final = Shape()


def published_config(shape: Shape) -> dict[str, Any]:
    """config.json as the published repository has it (transformers 4.38 style)."""
    return {
        "architectures": ["StableLmForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_dropout": 0.0,
        "hidden_size": shape.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate_size,
        "layer_norm_eps": shape.layer_norm_eps,
        "max_position_embeddings": shape.max_position_embeddings,
        "model_type": "stablelm",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "partial_rotary_factor": shape.partial_rotary_factor,
        "qk_layernorm": False,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.0",
        "use_cache": True,
        "use_parallel_residual": False,
        "use_qkv_bias": False,
        "vocab_size": shape.vocab_size,
    }


def tensor_shapes(shape: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the order written."""
    h, head_dim = shape.hidden_size, shape.hidden_size // shape.num_heads
    kv = shape.num_kv_heads * head_dim
    yield "model.embed_tokens.weight", (shape.vocab_size, h)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{norm}.weight", (h,)
            yield f"{p}.{norm}.bias", (h,)
        yield f"{p}.self_attn.q_proj.weight", (h, h)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", (h, h)
        yield f"{p}.mlp.gate_proj.weight", (shape.intermediate_size, h)
        yield f"{p}.mlp.up_proj.weight", (shape.intermediate_size, h)
        yield f"{p}.mlp.down_proj.weight", (h, shape.intermediate_size)
    yield "model.norm.weight", (h,)
    yield "model.norm.bias", (h,)
    yield "lm_head.weight", (shape.vocab_size, h)


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A bfloat16 tensor like a trained one's scale: N(0, 0.02) matrices, LayerNorm 1 + N(0, 0.1) / N(0, 0.1)."""
    values = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * values
    elif name.endswith("norm.bias"):
        values *= 0.1
    else:
        values *= INIT_STD
    return values.astype(ml_dtypes.bfloat16)


def _write_shard(path: Path, names: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """One safetensors file: header (offsets known from the shapes), then each tensor as generated."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in names:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in names:
            f.write(random_tensor(rng, name, shape).tobytes())


def write_tokenizer_files(folder: Path, tokenizer_json: Path) -> None:
    """tokenizer.json (copied) + tokenizer_config.json + special_tokens_map.json as published."""
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    special = {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN, "unk_token": SPECIAL_TOKEN}
    config = {
        "add_prefix_space": False,
        **special,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPTNeoXTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def make_published_checkpoint(
    out: Path,
    tokenizer_json: Path,
    *,
    shape: Shape = STABLELM_3B_4E1T,
    seed: int = 0,
    max_shard_bytes: int = 5_000_000_000,
) -> Path:
    """Write a random checkpoint of ``shape`` in the published format to ``out``; return ``out``."""
    if not Path(tokenizer_json).is_file():
        raise InvalidArgumentError(
            f"tokenizer file {str(tokenizer_json)!r} does not exist",
            fix="pass the path of a tokenizer.json (e.g. GPT-NeoX-20B's)",
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensor_shapes(shape):
        nbytes = int(np.prod(dims, dtype=np.int64)) * 2
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / file, names, rng)
        weight_map.update({name: file for name, _ in names})
        log.info("wrote %s (%d tensors)", file, len(names))
    total = sum(int(np.prod(d, dtype=np.int64)) * 2 for _, d in tensor_shapes(shape))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps(published_config(shape), indent=2) + "\n", encoding="utf-8")
    generation = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 0, "transformers_version": "4.38.0"}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    write_tokenizer_files(out, tokenizer_json)
    return out
