"""Model configuration: one frozen dataclass, built in one place from a checkpoint's config.json.

Both config styles are read: transformers 5.x (``rope_parameters``) and the 4.38 style the
published StableLM-3B-4E1T repository uses (top-level ``rope_theta`` / ``partial_rotary_factor``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

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

    def __post_init__(self) -> None:
        """Every field of the right type and in range, and the derived shapes consistent; else a
        ``ValueError`` naming the field (callers add where it was read)."""
        for f in fields(self):
            if f.name == "rotary_dim" and isinstance(self.rotary_dim, int) and self.rotary_dim < 2:
                raise ValueError(
                    f"partial_rotary_factor {self.partial_rotary_factor} gives a rotary dimension of "
                    f"{self.rotary_dim} of head_dim {self.head_dim}; expected a positive even number"
                )
            _check_field(f.name, getattr(self, f.name))
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not num_heads {self.num_heads} × head_dim {self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rotary_dim != int(self.head_dim * self.partial_rotary_factor) or self.rotary_dim % 2:
            raise ValueError(
                f"rotary_dim {self.rotary_dim} is not an even head_dim {self.head_dim} × "
                f"partial_rotary_factor {self.partial_rotary_factor}"
            )
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is not below vocab_size {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in package manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (manifest → config)."""
        if not isinstance(data, dict):
            raise TypeError(f"the model record is {type(data).__name__}, expected an object")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise KeyError(f"model.{missing[0]}")
        return cls(**{k: v for k, v in data.items() if k in names})


#: (smallest, largest) allowed value of each integer field
_INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 18),
    "num_layers": (1, 1024),
    "num_heads": (1, 4096),
    "num_kv_heads": (1, 4096),
    "intermediate_size": (1, 1 << 20),
    "max_position_embeddings": (1, 1 << 24),
    "bos_token_id": (0, 1 << 24),
    "eos_token_id": (0, 1 << 24),
    "head_dim": (2, 1 << 14),
    "rotary_dim": (2, 1 << 14),
}
#: (exclusive lower, inclusive upper) bound of each float field
_FLOAT_RANGES: Final[dict[str, tuple[float, float]]] = {
    "rope_theta": (0.0, 1e12),
    "partial_rotary_factor": (0.0, 1.0),
    "layer_norm_eps": (0.0, 1.0),
}


def _check_field(name: str, value: Any) -> None:
    if name in _INT_RANGES:
        low, high = _INT_RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} is {value!r}, expected an integer")
        if not low <= value <= high:
            raise ValueError(f"{name} is {value}, expected {low}..{high}")
    elif name in _FLOAT_RANGES:
        low_f, high_f = _FLOAT_RANGES[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"{name} is {value!r}, expected a number")
        if not (math.isfinite(value) and low_f < value <= high_f):
            raise ValueError(f"{name} is {value}, expected a finite number in ({low_f:g}, {high_f:g}]")
    elif not isinstance(value, bool):
        raise TypeError(f"{name} is {value!r}, expected true or false")


def _int(value: Any, name: str) -> int:
    """``value`` as an int (an integral float too); a ``TypeError`` naming ``name`` for anything else."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} is {value!r}, expected an integer")
    return value


def _float(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} is {value!r}, expected a number")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} is {value!r}, expected true or false")
    return value


def _first_int(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if isinstance(value, list):
        return _int(value[0], name) if value else default
    return _int(value, name)


def _check_supported(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """:class:`UnsupportedModelError` unless ``hf`` is a StableLM stlm exports; returns its rope parameters."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in STABLELM_MODEL_TYPES and not (
        isinstance(archs, list) and any(a in STABLELM_ARCHITECTURES for a in archs if isinstance(a, str))
    ):
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
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(
            f"{source}: rope_parameters is {type(rope).__name__}, expected an object", fix="restore the config.json"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(
            f"{source} uses rope_type={rope_type!r}; stlm supports the default rotary embedding",
            fix="use a checkpoint without rope scaling",
        )
    return rope


def _heads(hf: dict[str, Any]) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim); the consistency checks are :class:`ModelConfig`'s."""
    hidden, heads = _int(hf["hidden_size"], "hidden_size"), _int(hf["num_attention_heads"], "num_attention_heads")
    if heads <= 0:
        raise ValueError(f"num_attention_heads is {heads}, expected at least 1")
    kv_heads = _int(hf.get("num_key_value_heads") or heads, "num_key_value_heads")
    head_dim = _int(hf.get("head_dim") or hidden // heads, "head_dim")
    return heads, kv_heads, head_dim


def _fields_from_hf(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """The :class:`ModelConfig` fields ``hf`` gives (``KeyError``/``TypeError``/``ValueError`` naming a field)."""
    heads, kv_heads, head_dim = _heads(hf)
    factor = _float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)), "partial_rotary_factor")
    eos = _first_int(hf.get("eos_token_id"), 0, "eos_token_id")
    return {
        "vocab_size": _int(hf["vocab_size"], "vocab_size"),
        "hidden_size": _int(hf["hidden_size"], "hidden_size"),
        "num_layers": _int(hf["num_hidden_layers"], "num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "intermediate_size": _int(hf["intermediate_size"], "intermediate_size"),
        "max_position_embeddings": _int(hf.get("max_position_embeddings", 4096), "max_position_embeddings"),
        "rope_theta": _float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta"),
        "partial_rotary_factor": factor,
        "layer_norm_eps": _float(hf.get("layer_norm_eps", 1e-5), "layer_norm_eps"),
        "use_qkv_bias": _bool(hf.get("use_qkv_bias", False), "use_qkv_bias"),
        "use_parallel_residual": _bool(hf.get("use_parallel_residual", False), "use_parallel_residual"),
        "tie_word_embeddings": _bool(hf.get("tie_word_embeddings", False), "tie_word_embeddings"),
        "bos_token_id": _first_int(hf.get("bos_token_id"), eos, "bos_token_id"),
        "eos_token_id": eos,
        "head_dim": head_dim,
        "rotary_dim": int(head_dim * factor) if math.isfinite(factor) else 0,
    }


def model_config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Validate a Hugging Face ``config.json`` dict as a StableLM and derive the shapes stlm uses.
    Every missing, mistyped or out-of-range field is a :class:`CheckpointError` naming it."""
    if not isinstance(hf, dict):
        raise CheckpointError(
            f"{source} holds {type(hf).__name__}, expected a JSON object", fix="pass a Hugging Face config.json"
        )
    rope = _check_supported(hf, source)
    try:
        return ModelConfig(**_fields_from_hf(hf, rope))
    except KeyError as exc:
        raise CheckpointError(
            f"{source} lacks the field {exc.args[0]!r}",
            fix="pass a complete Hugging Face config.json",
        ) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{source}: {exc}", fix="correct the field in config.json (or download the checkpoint again)"
        ) from None


def load_model_config(checkpoint: Path) -> ModelConfig:
    """Read ``checkpoint/config.json`` and return its :class:`ModelConfig`."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {checkpoint}",
            fix="pass a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)",
        )
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})", fix="restore the file") from None
    return model_config_from_hf(data, source=str(path))


def read_json(path: Path, *, max_bytes: int = 64 << 20) -> Any:
    """Parse the JSON file ``path`` (at most ``max_bytes``); ``ValueError`` for a file too large, not
    UTF-8 or not JSON, ``RecursionError`` for nesting too deep, ``OSError`` for an unreadable one."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{size} bytes, more than the {max_bytes} a JSON file of a checkpoint may have")
    return json.loads(path.read_bytes().decode("utf-8"))
