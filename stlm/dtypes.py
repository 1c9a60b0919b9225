"""Precision names used across stlm, and their ONNX / numpy equivalents (no heavy imports)."""

from __future__ import annotations

from typing import Final, Literal

from stlm.errors import InvalidArgumentError

DType = Literal["fp32", "fp16", "bf16"]

DTYPES: Final[tuple[DType, ...]] = ("fp32", "fp16", "bf16")

# onnx.TensorProto data type numbers (kept here so the runtime need not import onnx).
ONNX_FLOAT: Final = 1
ONNX_INT64: Final = 7
ONNX_FLOAT16: Final = 10
ONNX_BFLOAT16: Final = 16

ONNX_TYPE: Final[dict[DType, int]] = {"fp32": ONNX_FLOAT, "fp16": ONNX_FLOAT16, "bf16": ONNX_BFLOAT16}

# ONNX Runtime's type strings, as `InferenceSession.get_inputs()[i].type` reports them.
ORT_TYPE: Final[dict[str, str]] = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
    "int64": "tensor(int64)",
}

NUMPY_NAME: Final[dict[DType, str]] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_dtype(value: str) -> DType:
    """Return ``value`` as a :data:`DType`, or raise :class:`InvalidArgumentError`."""
    if value not in DTYPES:
        raise InvalidArgumentError(
            f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}",
            fix="pass --dtype fp32, --dtype fp16 or --dtype bf16",
        )
    return value  # type: ignore[return-value]
