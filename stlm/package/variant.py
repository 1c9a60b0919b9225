"""What a package's graph does, as one typed, validated record: :class:`Variant` (and its
:class:`Quantization`).

The exporter fills it in, the manifest stores it (``stlm.json`` → ``variant``), and every consumer
(runtime, engine builder, server, verify, bench) reads its fields; nobody interprets strings.

* ``target``: who runs the graph, ``onnxruntime`` or ``tensorrt`` (the ``--target tensorrt``
  ONNX graph, and the engines built from any concat graph).
* ``kv_cache``: ``inplace`` (one preallocated buffer per KV tensor bound as past and present,
  updated by ONNX Runtime's GroupQueryAttention) or ``concat`` (past in, past + new out).
* ``rotary``: where the rotary embedding is computed: ``fused`` (inside GroupQueryAttention: every
  in-place graph), ``plain`` (ONNX ops), ``plugin`` (the ``stlm::partial_rotary`` TensorRT plugin)
  or ``native`` (ONNX ``RotaryEmbedding``, opset 23).
* ``logits``: how the graph chooses the positions it returns logits for. ``logits_index``: an
  int64 input ``(batch, num_logits)`` of positions within the step's chunk; the hidden states are
  gathered there before the final LayerNorm and LM head, and ``logits`` is
  ``(batch, num_logits, vocab)``. Decoding asks for one position per row, perplexity and prompt
  log-probabilities for all of them.
* dtypes: stored weights, computation, KV cache at the graph boundary, and why
  (:mod:`stlm.export.precision`).
* ``min_onnxruntime``: the oldest onnxruntime that runs the graph (:mod:`stlm.package.ort_versions`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from stlm.errors import PackageError
from stlm.package.dtypes import DTYPES, DType

Target = Literal["onnxruntime", "tensorrt"]
KVCache = Literal["inplace", "concat"]
Rotary = Literal["fused", "plain", "plugin", "native"]
LogitsSelection = Literal["logits_index"]

TARGETS: Final[tuple[Target, ...]] = ("onnxruntime", "tensorrt")
KV_CACHES: Final[tuple[KVCache, ...]] = ("inplace", "concat")
ROTARIES: Final[tuple[Rotary, ...]] = ("fused", "plain", "plugin", "native")
LOGITS_SELECTIONS: Final[tuple[LogitsSelection, ...]] = ("logits_index",)
#: Rotary forms the ``--target tensorrt`` ONNX graph is written with.
TENSORRT_ROTARIES: Final[tuple[Rotary, ...]] = ("plugin", "native")

#: rtn: round to nearest on a per-block grid; hqq: Half-Quadratic (float zero points, 4 bits);
#: mse: per-block range search (see :mod:`stlm.export.quantize`).
QUANTIZATION_METHODS: Final = ("rtn", "hqq", "mse")
QUANTIZATION_BITS: Final = (4, 8)

_T = TypeVar("_T")
_FIX = "export the package again with this version of stlm"


def _invalid(field: str, value: object, expected: str) -> PackageError:
    return PackageError(f"variant.{field} is {value!r}; expected {expected}", fix=_FIX)


def _choice(field: str, value: object, choices: tuple[_T, ...]) -> _T:
    if value not in choices:
        raise _invalid(field, value, "one of " + ", ".join(map(str, choices)))
    return value


def _int(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(field, value, f"an int in {low}..{high}")
    return value


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _invalid(field, value, "true or false")
    return value


def _str(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise _invalid(field, value, "a string")
    return value


def _fields(data: object, cls: type, prefix: str) -> dict[str, Any]:
    """``data`` as a dict with only ``cls``'s field names (the required ones present)."""
    if not isinstance(data, Mapping):
        raise PackageError(f"{prefix} is {data!r}; expected a JSON object", fix=_FIX)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PackageError(f"{prefix} has unknown fields {unknown}", fix=_FIX)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise PackageError(f"{prefix} lacks the fields {missing}", fix=_FIX)
    return dict(data)


@dataclass(frozen=True)
class Quantization:
    """Weight-only block quantization of the linear layers (ONNX Runtime ``MatMulNBits``).

    ``method`` (:data:`QUANTIZATION_METHODS`); ``bits`` per weight; ``block_size`` weights per scale
    along the input axis; ``symmetric``: zero point fixed at the grid's middle (rtn only);
    ``lm_head_bits``: the LM head's bits (it decides every token); ``edge_bits``: the first and last
    decoder layers' bits (None: ``bits``); ``accuracy_level``: MatMulNBits' compute type
    (0: fp32 activations, 4: int8 activations).
    """

    method: str = "rtn"
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    lm_head_bits: int = 8
    edge_bits: int | None = None
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        _choice("quantization.method", self.method, QUANTIZATION_METHODS)
        _choice("quantization.bits", self.bits, QUANTIZATION_BITS)
        _choice("quantization.lm_head_bits", self.lm_head_bits, QUANTIZATION_BITS)
        if self.edge_bits is not None:
            _choice("quantization.edge_bits", self.edge_bits, QUANTIZATION_BITS)
        block = _int("quantization.block_size", self.block_size, 16, 4096)
        if block & (block - 1):
            raise _invalid("quantization.block_size", block, "a power of two ≥ 16")
        _bool("quantization.symmetric", self.symmetric)
        _int("quantization.accuracy_level", self.accuracy_level, 0, 4)

    @classmethod
    def preset(cls, name: str) -> Quantization:
        """The quantization ``--quantize NAME`` means (:data:`QUANTIZE_PRESETS`)."""
        return QUANTIZE_PRESETS[name]

    @property
    def name(self) -> str:
        """``int4`` / ``int8``: the accuracy class of the package."""
        return f"int{self.bits}"

    @property
    def all_bits(self) -> tuple[int, ...]:
        """Every bit width the graph's MatMulNBits use (layers, edge layers, LM head)."""
        return tuple(sorted({self.bits, self.lm_head_bits, self.edge_bits or self.bits}))

    def for_layer(self, layer: int, num_layers: int) -> Quantization:
        """The quantization of decoder layer ``layer`` (edge layers may take more bits)."""
        if self.edge_bits is not None and layer in (0, num_layers - 1):
            return dataclasses.replace(self, bits=self.edge_bits)
        return self

    def for_lm_head(self) -> Quantization:
        """The quantization of the LM head."""
        return dataclasses.replace(self, bits=self.lm_head_bits)

    @property
    def fast_cpu_kernels(self) -> bool:
        """Whether every MatMulNBits runs on ONNX Runtime's fast CPU kernels: int8 activations (accuracy
        level 4) and integer zero points (not HQQ's float ones at 4 bits). Measured: fp32 activations
        decode ~3× slower at 4 bits and ~20× at 8 bits, float zero points ~5× slower (docs/quality.md)."""
        return self.accuracy_level == 4 and not (self.method == "hqq" and 4 in (self.bits, self.lm_head_bits))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Quantization:
        """Inverse of :meth:`to_dict`; a malformed record is a :class:`PackageError` naming the field."""
        return cls(**_fields(data, cls, "variant.quantization"))


#: ``--quantize`` presets. ``int4`` is the default chosen by mean KLD on the trained model
#: (docs/quality.md): RTN with the first and last decoder layers at 8 bits.
QUANTIZE_PRESETS: Final[dict[str, Quantization]] = {
    "int8": Quantization(bits=8, lm_head_bits=8),
    "int4": Quantization(bits=4, edge_bits=8),
    "int4-rtn": Quantization(bits=4),
    "int4-sym": Quantization(bits=4, symmetric=True),
    "int4-hqq": Quantization(method="hqq", bits=4),
    "int4-mse": Quantization(method="mse", bits=4),
    "int4-edge8": Quantization(bits=4, edge_bits=8),
}


@dataclass(frozen=True)
class Variant:
    """What the graph of a package does (see the module docstring)."""

    target: Target
    kv_cache: KVCache
    rotary: Rotary
    weight_dtype: DType
    compute_dtype: DType
    kv_dtype: DType
    logits: LogitsSelection = "logits_index"
    quantization: Quantization | None = None
    precision_note: str = ""
    external_data: bool = False
    min_onnxruntime: str | None = None

    def __post_init__(self) -> None:
        _choice("target", self.target, TARGETS)
        _choice("kv_cache", self.kv_cache, KV_CACHES)
        _choice("rotary", self.rotary, ROTARIES)
        for name in ("weight_dtype", "compute_dtype", "kv_dtype"):
            _choice(name, getattr(self, name), DTYPES)
        _choice("logits", self.logits, LOGITS_SELECTIONS)
        if self.quantization is not None and not isinstance(self.quantization, Quantization):
            raise _invalid("quantization", self.quantization, "a Quantization or null")
        _str("precision_note", self.precision_note)
        _bool("external_data", self.external_data)
        if self.min_onnxruntime is not None and not re.fullmatch(
            r"\d+(\.\d+){1,2}", _str("min_onnxruntime", self.min_onnxruntime)
        ):
            raise _invalid("min_onnxruntime", self.min_onnxruntime, "a version such as '1.20.1'")
        self._check_consistent()

    def _check_consistent(self) -> None:
        inplace = self.kv_cache == "inplace"
        if inplace != (self.rotary == "fused"):
            raise _invalid("rotary", self.rotary, "'fused' exactly when kv_cache is 'inplace'")
        if self.target == "tensorrt" and (inplace or self.quantization is not None):
            raise _invalid("target", self.target, "'onnxruntime' for an in-place KV cache or a quantized graph")
        if self.target == "onnxruntime" and self.rotary in TENSORRT_ROTARIES:
            raise _invalid("target", self.target, f"'tensorrt' for rotary {self.rotary!r}")
        if inplace and self.kv_dtype == "bf16":
            raise _invalid("kv_dtype", self.kv_dtype, "fp32 or fp16 (GroupQueryAttention has no bf16 CPU kernel)")

    @property
    def inplace(self) -> bool:
        """Whether the KV cache is updated in place."""
        return self.kv_cache == "inplace"

    @property
    def accuracy_class(self) -> str:
        """The tolerance class (:mod:`stlm.quality.tolerance`): the quantization, else the weight dtype."""
        return self.weight_dtype if self.quantization is None else self.quantization.name

    def describe(self) -> str:
        """One line for reports: ``fp16 weights, compute fp32, KV fp16, inplace KV cache``."""
        parts = [f"{self.weight_dtype} weights"]
        if self.quantization is not None:
            parts.append(
                f"{self.quantization.name} {self.quantization.method} blocks of {self.quantization.block_size}"
            )
        parts += [f"compute {self.compute_dtype}", f"KV {self.kv_dtype}", f"{self.kv_cache} KV cache"]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the manifest's ``variant``)."""
        data = dataclasses.asdict(self)
        data["quantization"] = None if self.quantization is None else self.quantization.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: object) -> Variant:
        """Inverse of :meth:`to_dict`; every malformed value is a :class:`PackageError` naming its field."""
        fields = _fields(data, cls, "variant")
        quantization = fields.get("quantization")
        fields["quantization"] = None if quantization is None else Quantization.from_dict(quantization)
        return cls(**fields)
