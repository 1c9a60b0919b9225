"""Precision names used across stlm and every map from them to numpy, ONNX and safetensors types.

The one place dtypes are translated: export, runtime, the TensorRT builder and the test-support
checkpoint writer all read these tables. bfloat16 is ``ml_dtypes.bfloat16`` (a base dependency).
"""

from __future__ import annotations

from typing import Final, Literal

import ml_dtypes
import numpy as np

from stlm.errors import InvalidArgumentError

DType = Literal["fp32", "fp16", "bf16"]

DTYPES: Final[tuple[DType, ...]] = ("fp32", "fp16", "bf16")

#: numpy's name of each precision (the names the I/O contract uses).
NUMPY_NAME: Final[dict[DType, str]] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# onnx.TensorProto data type numbers (kept here so the runtime need not import onnx).
ONNX_FLOAT: Final = 1
ONNX_FLOAT16: Final = 10
ONNX_BFLOAT16: Final = 16

#: numpy dtype name → onnx.TensorProto data type.
ONNX_ELEM: Final[dict[str, int]] = {
    "float32": ONNX_FLOAT,
    "uint8": 2,
    "int32": 6,
    "int64": 7,
    "bool": 9,
    "float16": ONNX_FLOAT16,
    "bfloat16": ONNX_BFLOAT16,
}
#: precision → onnx.TensorProto data type, and back.
ONNX_TYPE: Final[dict[DType, int]] = {d: ONNX_ELEM[NUMPY_NAME[d]] for d in DTYPES}
DTYPE_OF_ONNX: Final[dict[int, DType]] = {v: k for k, v in ONNX_TYPE.items()}

#: numpy dtype name → safetensors dtype string (both directions are used).
SAFETENSORS_NAME: Final[dict[str, str]] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}

#: TensorRT ``DataType`` member name → numpy dtype name.
TENSORRT_NAME: Final[dict[str, str]] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
}

_ALIASES: Final[dict[str, DType]] = {**{d: d for d in DTYPES}, **{v: k for k, v in NUMPY_NAME.items()}}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a precision (``'bf16'``) or numpy name (``'bfloat16'``, ``'int64'``)."""
    if name in _ALIASES:
        name = NUMPY_NAME[_ALIASES[name]]
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_of(array_dtype: np.dtype) -> DType:
    """The precision of a float numpy dtype (``float32`` → ``'fp32'``)."""
    return parse_dtype(np.dtype(array_dtype).name)


def parse_dtype(value: str) -> DType:
    """``value`` (``fp32|fp16|bf16`` or ``float32|float16|bfloat16``) as a :data:`DType`."""
    if value not in _ALIASES:
        raise InvalidArgumentError(
            f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)} (or {', '.join(NUMPY_NAME.values())})",
            fix="pass --dtype fp32, --dtype fp16 or --dtype bf16",
        )
    return _ALIASES[value]
