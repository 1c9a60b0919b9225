"""Model configuration: one frozen dataclass, built in one place from a checkpoint's config.json.

Both config styles are read: transformers 5.x (``rope_parameters``) and the 4.38 style the
published StableLM-3B-4E1T repository uses (top-level ``rope_theta`` / ``partial_rotary_factor``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from stlm.errors import CheckpointError, UnsupportedModelError

STABLELM_MODEL_TYPES = ("stablelm", "stablelm_epoch")
STABLELM_ARCHITECTURES = ("StableLmForCausalLM", "StableLMEpochForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts export and runtime need; ``head_dim``/``rotary_dim`` are derived."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    partial_rotary_factor: float
    layer_norm_eps: float
    use_qkv_bias: bool
    use_parallel_residual: bool
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_id: int
    head_dim: int
    rotary_dim: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in package manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (manifest → config)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _first_int(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, list):
        return int(value[0]) if value else default
    return int(value)


def _check_supported(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """:class:`UnsupportedModelError` unless ``hf`` is a StableLM stlm exports; returns its rope parameters."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in STABLELM_MODEL_TYPES and not any(a in STABLELM_ARCHITECTURES for a in archs):
        raise UnsupportedModelError(
            f"{source} describes model_type={model_type!r}, architectures={archs!r}; "
            f"expected a StableLM (model_type 'stablelm', StableLmForCausalLM)",
            fix="pass the folder of a StableLM checkpoint such as stabilityai/stablelm-3b-4e1t",
        )
    if hf.get("qk_layernorm"):
        raise UnsupportedModelError(
            f"{source} sets qk_layernorm=true (per-head LayerNorm on Q/K, StableLM 2 12B); "
            "stlm exports StableLM-3B-4E1T-style models without it",
            fix="use a checkpoint with qk_layernorm=false",
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(
            f"{source} sets hidden_act={act!r}; expected 'silu' (SwiGLU MLP)",
            fix="use a StableLM checkpoint with the standard SwiGLU MLP",
        )
    rope: dict[str, Any] = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(
            f"{source} uses rope_type={rope_type!r}; stlm supports the default rotary embedding",
            fix="use a checkpoint without rope scaling",
        )
    return rope


def _heads(hf: dict[str, Any], source: str) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim), checked against the hidden size."""
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        raise UnsupportedModelError(
            f"{source}: hidden_size {hidden} is not num_attention_heads {heads} × head_dim {head_dim}",
            fix="use a checkpoint whose hidden size is heads × head dim",
        )
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
            fix="use a consistent config.json",
        )
    return heads, kv_heads, head_dim


def _rotary_dim(head_dim: int, factor: float, source: str) -> int:
    rotary_dim = int(head_dim * factor)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise UnsupportedModelError(
            f"{source}: partial_rotary_factor {factor} gives rotary dim {rotary_dim} of head dim "
            f"{head_dim}; expected a positive even number",
            fix="use a partial_rotary_factor that gives an even rotary dimension",
        )
    return rotary_dim


def model_config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Validate a Hugging Face ``config.json`` dict as a StableLM and derive the shapes stlm uses."""
    rope = _check_supported(hf, source)
    try:
        heads, kv_heads, head_dim = _heads(hf, source)
        layers, vocab, inter = int(hf["num_hidden_layers"]), int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as exc:
        raise CheckpointError(
            f"{source} lacks the field {exc.args[0]!r}",
            fix="pass a complete Hugging Face config.json",
        ) from None
    factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))
    eos = _first_int(hf.get("eos_token_id"), 0)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=factor,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        use_qkv_bias=bool(hf.get("use_qkv_bias", False)),
        use_parallel_residual=bool(hf.get("use_parallel_residual", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first_int(hf.get("bos_token_id"), eos),
        eos_token_id=eos,
        head_dim=head_dim,
        rotary_dim=_rotary_dim(head_dim, factor, source),
    )


def load_model_config(checkpoint: Path) -> ModelConfig:
    """Read ``checkpoint/config.json`` and return its :class:`ModelConfig`."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {checkpoint}",
            fix="pass a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})", fix="restore the file") from None
    return model_config_from_hf(data, source=str(path))
