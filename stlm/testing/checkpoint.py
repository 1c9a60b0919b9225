"""A random-weight StableLM checkpoint at any scale, written with numpy one tensor at a time.

The folder has the layout transformers reads (``config.json``, safetensors, ``tokenizer.json``)
in either config style:

* ``transformers-5``: ``rope_parameters`` in config.json, one ``model.safetensors`` (shards with
  an index beyond ``max_shard_bytes``), as ``save_pretrained`` writes it;
* ``4.38``: the way stabilityai/stablelm-3b-4e1t is published: top-level ``rope_theta`` and
  ``partial_rotary_factor``, ``torch_dtype``, shards with ``model.safetensors.index.json``,
  ``generation_config.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

Weights are N(0, 0.02) like transformers' initializer; LayerNorm weights 1 + N(0, 0.1) and biases
N(0, 0.1), so that the bias path is exercised. Tensors are generated and streamed into the files
one at a time, so even the full 2.8B-parameter model needs about one tensor of memory.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.package.dtypes import SAFETENSORS_NAME, DType, numpy_dtype, parse_dtype
from stlm.support.staging import CHECKPOINT_MARKER, checkpoint_files, staged_folder
from stlm.testing.tokenizer import train_small_tokenizer

log = logging.getLogger(__name__)

ConfigStyle = Literal["transformers-5", "4.38"]
CONFIG_STYLES: Final[tuple[ConfigStyle, ...]] = ("transformers-5", "4.38")
SPECIAL_TOKEN: Final = "<|endoftext|>"
INIT_STD: Final = 0.02  # the checkpoint's initializer_range
DEFAULT_MAX_SHARD_BYTES: Final = 5_000_000_000


@dataclass(frozen=True)
class Shape:
    """The architecture of a checkpoint (StableLM-3B-4E1T's by default). ``num_kv_heads`` None:
    one per head; ``vocab_size`` None: the tokenizer's size rounded up to 64 (50304 for GPT-NeoX)."""

    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    intermediate_size: int = 6912
    num_kv_heads: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    use_parallel_residual: bool = False

    @property
    def kv_heads(self) -> int:
        """Key/value heads."""
        return self.num_kv_heads or self.num_heads


PRESETS: Final[dict[str, Shape]] = {
    "tiny": Shape(64, 2, 4, 172),  # head dim 16, rotary dim 4
    "tiny-hd64": Shape(128, 2, 2, 344),  # head dim 64, rotary dim 16
    "small": Shape(256, 4, 4, 688),  # head dim 64, rotary dim 16
    "medium": Shape(1024, 8, 16, 2752),  # head dim 64, rotary dim 16
    "stablelm-3b-4e1t": Shape(),  # the real architecture: head dim 80, rotary dim 20
}


def _config(shape: Shape, vocab: int, dtype: DType, style: str) -> dict[str, Any]:
    """config.json of ``shape`` in ``style``."""
    rope = {"rope_theta": shape.rope_theta, "partial_rotary_factor": shape.partial_rotary_factor}
    config: dict[str, Any] = {
        "architectures": ["StableLmForCausalLM"],
        "model_type": "stablelm",
        "vocab_size": vocab,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "initializer_range": INIT_STD,
        "layer_norm_eps": shape.layer_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": False,
        "use_qkv_bias": shape.use_qkv_bias,
        "qk_layernorm": False,
        "use_parallel_residual": shape.use_parallel_residual,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    torch_name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    if style == "4.38":
        return {**config, **rope, "rope_scaling": None, "torch_dtype": torch_name, "transformers_version": "4.38.0"}
    return {**config, "rope_parameters": {"rope_type": "default", **rope}, "dtype": torch_name}


def tensor_shapes(shape: Shape, vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the order written."""
    h, head_dim = shape.hidden_size, shape.hidden_size // shape.num_heads
    kv = shape.kv_heads * head_dim
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{norm}.weight", (h,)
            yield f"{p}.{norm}.bias", (h,)
        for proj, rows in (("q", h), ("k", kv), ("v", kv)):
            yield f"{p}.self_attn.{proj}_proj.weight", (rows, h)
            if shape.use_qkv_bias:
                yield f"{p}.self_attn.{proj}_proj.bias", (rows,)
        yield f"{p}.self_attn.o_proj.weight", (h, h)
        yield f"{p}.mlp.gate_proj.weight", (shape.intermediate_size, h)
        yield f"{p}.mlp.up_proj.weight", (shape.intermediate_size, h)
        yield f"{p}.mlp.down_proj.weight", (h, shape.intermediate_size)
    yield "model.norm.weight", (h,)
    yield "model.norm.bias", (h,)
    yield "lm_head.weight", (vocab, h)


def random_tensor(rng: np.random.Generator, name: str, dims: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A tensor at a trained one's scale (see the module docstring), in ``dtype``."""
    values = rng.standard_normal(dims, dtype=np.float32)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * values
    elif name.endswith(("norm.bias", "proj.bias")):
        values *= 0.1
    else:
        values *= INIT_STD
    return values.astype(dtype)


def _shards(
    tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = int(np.prod(dims, dtype=np.int64)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator, dtype: np.dtype
) -> None:
    """One safetensors file: header (offsets known from the shapes), then each tensor as generated."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_NAME[dtype.name],
            "shape": list(dims),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dims in tensors:
            f.write(random_tensor(rng, name, dims, dtype).tobytes())


def _write_weights(
    out: Path, shape: Shape, vocab: int, dtype: np.dtype, seed: int, sharded: bool, max_bytes: int
) -> None:
    tensors = list(tensor_shapes(shape, vocab))
    shards = _shards(tensors, dtype.itemsize, max_bytes)
    rng = np.random.default_rng(seed)
    if not sharded and len(shards) == 1:
        _write_safetensors(out / "model.safetensors", tensors, rng, dtype)
        return
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / file, names, rng, dtype)
        weight_map.update({name: file for name, _ in names})
        log.info("wrote %s (%d tensors)", file, len(names))
    total = sum(int(np.prod(d, dtype=np.int64)) * dtype.itemsize for _, d in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_published_extras(out: Path) -> None:
    """generation_config.json, tokenizer_config.json and special_tokens_map.json as published."""
    special = {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN, "unk_token": SPECIAL_TOKEN}
    tokenizer_config = {
        "add_prefix_space": False,
        **special,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPTNeoXTokenizer",
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special)
    generation = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 0, "transformers_version": "4.38.0"}
    _write_json(out / "generation_config.json", generation)


def _resolve_shape(shape: Shape | str) -> Shape:
    if isinstance(shape, Shape):
        return shape
    if shape not in PRESETS:
        raise InvalidArgumentError(
            f"unknown preset {shape!r}; expected one of {', '.join(PRESETS)}", fix="pass --preset " + "|".join(PRESETS)
        )
    return PRESETS[shape]


def _check_arguments(config_style: str, tokenizer: Path | None) -> None:
    if config_style not in CONFIG_STYLES:
        raise InvalidArgumentError(
            f"unknown config style {config_style!r}; expected one of {', '.join(CONFIG_STYLES)}",
            fix="pass --config-style transformers-5 or 4.38",
        )
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise InvalidArgumentError(
            f"tokenizer file {str(tokenizer)!r} does not exist",
            fix="pass the path of a tokenizer.json, or omit it to train a small one",
        )


def _write_checkpoint(
    out: Path, resolved: Shape, kind: DType, config_style: str, tokenizer: Path | None, seed: int, max_bytes: int
) -> None:
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    else:
        train_small_tokenizer(out / "tokenizer.json")
    if resolved.vocab_size is None:
        from tokenizers import Tokenizer

        resolved = replace(
            resolved, vocab_size=-(-Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() // 64) * 64
        )
    assert resolved.vocab_size is not None
    published = config_style == "4.38"
    _write_weights(out, resolved, resolved.vocab_size, numpy_dtype(kind), seed, published, max_bytes)
    _write_json(out / "config.json", _config(resolved, resolved.vocab_size, kind, config_style))
    if published:
        _write_published_extras(out)
    files = sorted(p.name for p in out.iterdir())
    _write_json(out / CHECKPOINT_MARKER, {"format": "stlm-checkpoint", "files": files})


def write_random_checkpoint(
    out: Path,
    *,
    shape: Shape | str = "small",
    tokenizer: Path | None = None,
    seed: int = 0,
    dtype: str = "fp32",
    config_style: str = "transformers-5",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight StableLM checkpoint of ``shape`` (a :class:`Shape` or a preset name) to
    ``out`` and return it. ``tokenizer``: a tokenizer.json to ship (default: a small byte-level BPE
    trained here); ``dtype``: the safetensors storage type; ``config_style``: see the module docstring.

    The folder is written atomically (:func:`stlm.support.staging.staged_folder`); a non-empty
    ``out`` is refused unless ``overwrite`` and it is a checkpoint this function wrote."""
    resolved = _resolve_shape(shape)
    kind = parse_dtype(dtype)
    _check_arguments(config_style, tokenizer)
    out = Path(out)
    protect = [Path(tokenizer).parent] if tokenizer is not None else []
    with staged_folder(out, overwrite=overwrite, owner=checkpoint_files, protect=protect) as tmp:
        _write_checkpoint(tmp, resolved, kind, config_style, tokenizer, seed, max_shard_bytes)
    log.info(
        "wrote a random %s checkpoint (%s, %s config) to %s",
        shape if isinstance(shape, str) else "custom",
        kind,
        config_style,
        out,
    )
    return out
