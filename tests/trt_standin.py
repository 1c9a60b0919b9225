"""TensorRT's own pure-Python ``tensorrt.plugin`` layer on a CPU, under a stand-in for its native module.

The ``tensorrt-cu12-bindings`` wheel (pinned below, from PyPI) holds ``tensorrt_bindings/plugin/*.py``:
the code behind ``import tensorrt.plugin`` (registration, TensorRT's signature validator, the plugin
classes TensorRT's builder calls). Only its native ``tensorrt.so`` needs a GPU machine. This module

* fetches the wheel once into a cache with pip and extracts only ``plugin/*.py`` (the wheel is never
  installed: every ``tensorrt-cuXX-bindings`` wheel owns the same ``tensorrt_bindings/`` folder, so
  installing it beside a real TensorRT would overwrite that TensorRT's native module);
* builds a ``tensorrt`` stand-in with the native names that layer uses (enums, ``Dims``, plugin
  field and descriptor types, the plugin registry, symbolic dimension expressions that can be
  evaluated), strict where pybind11 is (types are checked, duplicate creators are refused);
* loads the real layer as ``tensorrt.plugin`` on top of it (:func:`tensorrt_plugin_layer`).

``tests/trt_builder.py`` drives a registered plugin the way TensorRT's ONNX parser and builder do.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WHEEL_NAME = "tensorrt-cu12-bindings"
WHEEL_VERSION = "11.4.0.106"
WHEEL_FILE = "tensorrt_cu12_bindings-11.4.0.106-cp311-none-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "e2ab48f316bbff6a7a44a30e94a9ceb0d2cf6645ff39feadecfa68d7cb7a94bf"
CACHE_ENV = "STLM_TEST_CACHE"


# ---------------------------------------------------------------- the wheel's plugin layer


def cache_dir() -> Path:
    """``$STLM_TEST_CACHE`` or ``~/.cache/stlm-test``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stlm-test")


def _download_wheel(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    wheel = target / WHEEL_FILE
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "none", f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(target), "--quiet"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed: {proc.stderr.strip()[-500:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def plugin_layer_dir() -> Path:
    """A folder holding TensorRT 11.4's ``plugin/*.py`` (downloaded and extracted once).

    Raises ``RuntimeError`` saying why when the wheel cannot be had (no network, no pip).
    """
    base = cache_dir() / f"tensorrt_bindings-{WHEEL_VERSION}"
    if (base / "plugin" / "_validate.py").is_file():
        return base
    wheel = _download_wheel(cache_dir() / "wheels")
    base.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tensorrt_bindings-", dir=base.parent))
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
                (staging / "plugin").mkdir(exist_ok=True)
                (staging / "plugin" / Path(name).name).write_bytes(zf.read(name))
    if not (staging / "plugin" / "_validate.py").is_file():
        raise RuntimeError(f"{WHEEL_FILE} has no tensorrt_bindings/plugin/_validate.py")
    try:
        staging.rename(base)  # atomic; another process may have won the race
    except OSError:
        if not (base / "plugin" / "_validate.py").is_file():
            raise
    return base


# ---------------------------------------------------------------- symbolic dimension expressions


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_OPS: dict[DimensionOperation, Callable[[int, int], int]] = {
    DimensionOperation.SUM: lambda a, b: a + b,
    DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max,
    DimensionOperation.MIN: min,
    DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b),
    DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b,
    DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}


class IDimensionExpr:
    """A dimension expression over named symbols (``batch``, ``seq``, ...), evaluable for any binding."""

    def __init__(self, fn: Callable[[Mapping[str, int]], int], text: str, constant: int | None = None) -> None:
        self._fn, self.text, self._constant = fn, text, constant

    def is_constant(self) -> bool:
        return self._constant is not None

    def get_constant_value(self) -> int:
        if self._constant is None:
            raise RuntimeError(f"{self.text} is not a build-time constant")
        return self._constant

    def is_size_tensor(self) -> bool:
        return False

    def evaluate(self, env: Mapping[str, int]) -> int:
        """The value for concrete symbols."""
        return self._fn(env)

    def __repr__(self) -> str:
        return f"IDimensionExpr({self.text})"


def symbol(name: str) -> IDimensionExpr:
    """A runtime dimension (dynamic axis of a network input)."""
    return IDimensionExpr(lambda env: int(env[name]), name)


class IExprBuilder:
    """``trt.IExprBuilder``: constants and operations, folding constants as TensorRT does."""

    def constant(self, value: int) -> IDimensionExpr:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"IExprBuilder.constant(): incompatible argument {value!r} (expected int)")
        return IDimensionExpr(lambda env: value, str(value), value)

    def operation(self, op: DimensionOperation, first: IDimensionExpr, second: IDimensionExpr) -> IDimensionExpr:
        if not isinstance(op, DimensionOperation):
            raise TypeError(f"IExprBuilder.operation(): {op!r} is not a DimensionOperation")
        if not isinstance(first, IDimensionExpr) or not isinstance(second, IDimensionExpr):
            raise TypeError(f"IExprBuilder.operation(): operands must be IDimensionExpr, got {first!r}, {second!r}")
        fn = _OPS[op]
        text = f"{op.name}({first.text}, {second.text})"
        if first.is_constant() and second.is_constant():
            return self.constant(fn(first.get_constant_value(), second.get_constant_value()))
        return IDimensionExpr(lambda env: fn(first.evaluate(env), second.evaluate(env)), text)

    def declare_size_tensor(self, *args: Any) -> IDimensionExpr:
        raise NotImplementedError("size tensors are not used by stlm plugins")


class DimsExprs:
    """``trt.DimsExprs(n)``: n slots of IDimensionExpr."""

    def __init__(self, n: int | Sequence[IDimensionExpr]) -> None:
        self._exprs: list[IDimensionExpr | None] = [None] * n if isinstance(n, int) else list(n)

    def __len__(self) -> int:
        return len(self._exprs)

    def __getitem__(self, i: int) -> IDimensionExpr:
        expr = self._exprs[i]
        assert expr is not None, f"DimsExprs slot {i} was never set"
        return expr

    def __setitem__(self, i: int, expr: IDimensionExpr) -> None:
        if not isinstance(expr, IDimensionExpr):
            raise TypeError(f"DimsExprs[{i}] = {expr!r}: expected IDimensionExpr")
        self._exprs[i] = expr

    def __iter__(self) -> Iterator[IDimensionExpr]:
        return (self[i] for i in range(len(self)))


# ---------------------------------------------------------------- the stand-in module


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


_FIELD_DTYPES = {
    PluginFieldType.FLOAT16: np.float16, PluginFieldType.FLOAT32: np.float32, PluginFieldType.FLOAT64: np.float64,
    PluginFieldType.INT8: np.int8, PluginFieldType.INT16: np.int16, PluginFieldType.INT32: np.int32,
    PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8, PluginFieldType.UNKNOWN: np.uint8,
}  # fmt: skip


class Dims:
    """``trt.Dims``: a shape of at most ``MAX_DIMS`` ints (-1 = dynamic)."""

    MAX_DIMS = 8

    def __init__(self, shape: int | Sequence[int] = ()) -> None:
        values = [0] * shape if isinstance(shape, int) else [int(d) for d in shape]
        if len(values) > self.MAX_DIMS:
            raise ValueError(f"Dims holds at most {self.MAX_DIMS} dimensions")
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i: int) -> int:
        return self._values[i]

    def __setitem__(self, i: int, value: int) -> None:
        self._values[i] = int(value)

    def __iter__(self) -> Iterator[int]:
        return iter(self._values)

    def __repr__(self) -> str:
        return f"Dims{tuple(self._values)}"


class PluginTensorDesc:
    """``trt.PluginTensorDesc`` (type-checked like the pybind11 properties)."""

    def __init__(self) -> None:
        self.dims, self._type, self._format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0

    @property
    def type(self) -> DataType:
        return self._type

    @type.setter
    def type(self, value: DataType) -> None:
        if not isinstance(value, DataType):
            raise TypeError(f"PluginTensorDesc.type = {value!r}: expected DataType")
        self._type = value

    @property
    def format(self) -> TensorFormat:
        return self._format

    @format.setter
    def format(self, value: TensorFormat) -> None:
        if not isinstance(value, TensorFormat):
            raise TypeError(f"PluginTensorDesc.format = {value!r}: expected TensorFormat")
        self._format = value


@dataclass
class DynamicPluginTensorDesc:
    """``trt.DynamicPluginTensorDesc``: the desc plus the profile's min/opt/max."""

    desc: PluginTensorDesc
    min: Dims
    opt: Dims
    max: Dims


class PluginField:
    """``trt.PluginField(name, data, type)``; ``data`` is kept as a numpy array like pybind11 does."""

    def __init__(self, name: str, data: Any = None, type: PluginFieldType = PluginFieldType.UNKNOWN) -> None:
        if not isinstance(type, PluginFieldType):
            raise TypeError(f"PluginField type {type!r} is not a PluginFieldType")
        self.name, self.type = name, type
        if isinstance(data, bytes | bytearray):
            self.data = np.frombuffer(bytes(data), dtype=_FIELD_DTYPES.get(type, np.uint8)).copy()
        else:
            self.data = np.asarray([] if data is None else data)
        self.size = int(self.data.size)


class PluginFieldCollection(list):  # type: ignore[type-arg]
    """``trt.PluginFieldCollection``: a list of :class:`PluginField`."""

    def __init__(self, fields: Sequence[PluginField] = ()) -> None:
        if not all(isinstance(f, PluginField) for f in fields):
            raise TypeError("PluginFieldCollection holds PluginField objects only")
        super().__init__(fields)


class PluginRegistry:
    """``trt.get_plugin_registry()``: creators by ``(name, version, namespace)``; duplicates refused."""

    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, version, namespace))


class _Interface:
    def __init__(self) -> None:
        pass


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2) -> None:
        self.messages: list[tuple[int, str]] = []

    def log(self, severity: int, msg: str) -> None:
        self.messages.append((severity, msg))


def make_standin(layer_dir: Path) -> types.ModuleType:
    """A ``tensorrt`` module whose ``plugin`` subpackage is the wheel's ``plugin/`` folder."""
    trt = types.ModuleType("tensorrt")
    trt.__path__ = [str(layer_dir)]  # type: ignore[attr-defined]
    trt.__version__ = WHEEL_VERSION  # type: ignore[attr-defined]
    names: dict[str, Any] = {
        "DataType": DataType, "TensorFormat": TensorFormat, "PluginFieldType": PluginFieldType,
        "DimensionOperation": DimensionOperation, "IDimensionExpr": IDimensionExpr, "IExprBuilder": IExprBuilder,
        "DimsExprs": DimsExprs, "Dims": Dims, "PluginTensorDesc": PluginTensorDesc,
        "DynamicPluginTensorDesc": DynamicPluginTensorDesc, "PluginField": PluginField,
        "PluginFieldCollection": PluginFieldCollection, "Logger": Logger,
        "float32": DataType.FLOAT, "float16": DataType.HALF, "bfloat16": DataType.BF16, "int8": DataType.INT8,
        "int32": DataType.INT32, "int64": DataType.INT64, "bool": DataType.BOOL, "uint8": DataType.UINT8,
        "TensorRTPhase": enum.Enum("TensorRTPhase", "BUILD RUNTIME"),
        "QuickPluginCreationRequest": enum.Enum(
            "QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT"
        ),
        "PluginArgType": enum.Enum("PluginArgType", "INT"),
        "PluginArgDataType": enum.Enum("PluginArgDataType", "INT8 INT16 INT32"),
    }  # fmt: skip
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr", "ITensor"):  # fmt: skip
        names[name] = type(name, (_Interface,), {})
    registry = PluginRegistry()
    names["get_plugin_registry"] = lambda: registry
    nptypes = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
               DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
               DataType.UINT8: np.uint8}  # fmt: skip

    def nptype(dtype: DataType) -> Any:
        if dtype not in nptypes:
            raise TypeError(f"{dtype} has no numpy type")
        return nptypes[dtype]

    names["nptype"] = nptype
    for name, value in names.items():
        setattr(trt, name, value)
    return trt


@contextlib.contextmanager
def tensorrt_plugin_layer(layer_dir: Path) -> Iterator[tuple[types.ModuleType, types.ModuleType]]:
    """Install the stand-in as ``tensorrt`` and import the real ``tensorrt.plugin``; restore on exit."""
    saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith("tensorrt.")}
    for key in saved:
        del sys.modules[key]
    trt = make_standin(layer_dir)
    sys.modules["tensorrt"] = trt
    try:
        with warnings.catch_warnings():  # NVIDIA's docstrings have invalid escapes (\s)
            warnings.simplefilter("ignore", DeprecationWarning)
            import tensorrt.plugin as trtp

        assert Path(trtp.__file__).parent == layer_dir / "plugin", trtp.__file__
        yield trt, trtp
    finally:
        for key in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
            del sys.modules[key]
        sys.modules.update(saved)
