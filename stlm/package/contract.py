"""The ONNX I/O contract: names, dtypes and symbolic axes, as data.

Export builds the graph's inputs/outputs from this table, engine profiles derive their shape
ranges from it, and the runtime feeds and reads tensors by it. Names follow Optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from stlm.package.config import ModelConfig
from stlm.package.dtypes import NUMPY_NAME
from stlm.package.variant import Variant

# Symbolic axis names.
BATCH: Final = "batch"
SEQUENCE: Final = "sequence"
PAST: Final = "past_sequence"
TOTAL: Final = "total_sequence"  # = past_sequence + sequence

INPUT_IDS: Final = "input_ids"
ATTENTION_MASK: Final = "attention_mask"
POSITION_IDS: Final = "position_ids"
LOGITS: Final = "logits"
# In-place (shared past/present buffer) variant only:
SEQLENS_K: Final = "seqlens_k"  # (batch,) int32: tokens in the cache after this step, minus 1
TOTAL_SEQUENCE_LENGTH: Final = "total_sequence_length"  # () int32: an upper bound of seqlens_k + 1
CAPACITY: Final = "capacity"  # the preallocated KV length
# Both variants: which positions of this step's chunk return logits.
LOGITS_INDEX: Final = "logits_index"  # (batch, num_logits) int64
NUM_LOGITS: Final = "num_logits"


PAST_PREFIX: Final = "past_key_values."
PRESENT_PREFIX: Final = "present."


def past_name(layer: int, kind: str) -> str:
    """Input name of a layer's past ``kind`` ('key' or 'value')."""
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Output name of a layer's present ``kind`` ('key' or 'value')."""
    return f"{PRESENT_PREFIX}{layer}.{kind}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, axes (symbolic names or fixed sizes)."""

    name: str
    dtype: str
    axes: tuple[str | int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(data["name"], data["dtype"], tuple(data["axes"]))


@dataclass(frozen=True)
class Contract:
    """Inputs and outputs of the decoder graph, in graph order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def kv_dtype(self) -> str:
        """numpy dtype name of the KV cache tensors."""
        return next(s.dtype for s in self.inputs if s.name.startswith(PAST_PREFIX))

    @property
    def past(self) -> list[str]:
        """The past KV inputs, in graph order."""
        return [s.name for s in self.inputs if s.name.startswith(PAST_PREFIX)]

    @property
    def present(self) -> list[str]:
        """The present KV outputs, in graph order (pairs with :attr:`past`)."""
        return [s.name for s in self.outputs if s.name.startswith(PRESENT_PREFIX)]

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Contract:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
            tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
        )


def decoder_contract(cfg: ModelConfig, variant: Variant) -> Contract:
    """The merged prefill/decode decoder's I/O for ``variant``; logits are always float32.

    Both KV variants take ``logits_index`` (batch, num_logits): the positions within this step's
    chunk whose logits are returned, as ``logits`` (batch, num_logits, vocab). ``concat``: past
    (batch, kv_heads, past, head_dim) in, present = past + new out, with an attention mask and
    position ids (left padding). ``inplace``: one preallocated (batch, kv_heads, capacity,
    head_dim) buffer per tensor, bound as both past and present and written in place; each row's
    length comes from ``seqlens_k`` (right-padded chunks) and ``total_sequence_length``.
    """
    kv = NUMPY_NAME[variant.kv_dtype]
    if variant.inplace:
        inputs = [
            TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
            TensorSpec(SEQLENS_K, "int32", (BATCH,)),
            TensorSpec(TOTAL_SEQUENCE_LENGTH, "int32", ()),
        ]
        kv_in = kv_out = (BATCH, cfg.num_kv_heads, CAPACITY, cfg.head_dim)
    else:
        inputs = [
            TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
            TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
            TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE)),
        ]
        kv_in = (BATCH, cfg.num_kv_heads, PAST, cfg.head_dim)
        kv_out = (BATCH, cfg.num_kv_heads, TOTAL, cfg.head_dim)
    inputs.append(TensorSpec(LOGITS_INDEX, "int64", (BATCH, NUM_LOGITS)))
    outputs = [TensorSpec(LOGITS, "float32", (BATCH, NUM_LOGITS, cfg.vocab_size))]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(past_name(i, kind), kv, kv_in))
            outputs.append(TensorSpec(present_name(i, kind), kv, kv_out))
    return Contract(tuple(inputs), tuple(outputs))
