"""TensorRT's ONNX parser and builder, driven by hand on a plugin registered through the real
``tensorrt.plugin`` layer (loaded by :mod:`trt_standin`): what they call, in their order, with the
arguments they pass (onnx-tensorrt's ``FallbackPluginImporter`` / ``loadFields`` / ``createPlugin``
for the parser; the plugin interfaces' build-time methods for the builder)."""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from trt_standin import (
    DataType,
    Dims,
    DimsExprs,
    DynamicPluginTensorDesc,
    IDimensionExpr,
    IExprBuilder,
    PluginTensorDesc,
    TensorFormat,
)


@dataclass
class BuiltKernel:
    """What TensorRT would bake into the engine for one tactic."""

    tactic: int
    kernel_name: str
    ptx: bytes
    grid: tuple[IDimensionExpr, IDimensionExpr, IDimensionExpr]
    block: tuple[IDimensionExpr, IDimensionExpr, IDimensionExpr]
    shared_mem: IDimensionExpr
    extra_args: list[Any]


@dataclass
class BuiltPlugin:
    """The outcome of :func:`build_plugin_node`."""

    plugin: Any
    output_types: list[DataType]
    output_shapes: list[list[IDimensionExpr]]
    combinations: list[list[tuple[DataType, TensorFormat]]]
    tactics: list[int]
    kernels: list[BuiltKernel]


def _parser_fields(trt: types.ModuleType, creator: Any, node: Any) -> Any:
    """onnx-tensorrt's ``loadFields``: the creator's fields from same-named node attributes
    (INT -> INT32, FLOAT -> FLOAT32, STRING -> CHAR); other attributes are not passed."""
    from onnx import AttributeProto

    attrs = {a.name: a for a in node.attribute}
    fields = []
    for wanted in creator.field_names:
        attr = attrs.get(wanted.name)
        if attr is None:
            continue
        if attr.type == AttributeProto.INT:
            fields.append(trt.PluginField(attr.name, np.array([attr.i], np.int32), trt.PluginFieldType.INT32))
        elif attr.type == AttributeProto.FLOAT:
            fields.append(trt.PluginField(attr.name, np.array([attr.f], np.float32), trt.PluginFieldType.FLOAT32))
        elif attr.type == AttributeProto.STRING:
            fields.append(trt.PluginField(attr.name, attr.s, trt.PluginFieldType.CHAR))
        else:
            raise AssertionError(f"attribute {attr.name} of type {attr.type} is not a plugin field type")
    return trt.PluginFieldCollection(fields)


def _desc(dtype: DataType, dims: Sequence[int], fmt: TensorFormat = TensorFormat.LINEAR) -> PluginTensorDesc:
    desc = PluginTensorDesc()
    desc.type, desc.format, desc.dims = dtype, fmt, Dims(dims)
    return desc


def create_from_node(trt: types.ModuleType, node: Any) -> Any:
    """The parser: find the creator by ``(op_type, plugin_version, plugin_namespace)`` and create the
    plugin from the node's attributes; ``aot`` picks STRICT_AOT / STRICT_JIT."""
    attrs = {a.name: a for a in node.attribute}
    version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
    namespace = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else ""
    creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
    assert creator is not None, f"Plugin not found: {node.op_type} version {version} namespace {namespace!r}"
    request = trt.QuickPluginCreationRequest
    if "aot" in attrs:  # the node's choice overrides the network's PREFER_*_PYTHON_PLUGINS flags
        qpcr = request.STRICT_AOT if attrs["aot"].i else request.STRICT_JIT
    else:
        qpcr = request.UNKNOWN
    fields = _parser_fields(trt, creator, node)
    # onnx-tensorrt passes the op type, not the node name: the QDP framework looks the plugin up by it.
    return creator.create_plugin(node.op_type, namespace, fields, trt.TensorRTPhase.BUILD, qpcr)


def build_plugin_node(
    trt: types.ModuleType,
    node: Any,
    inputs: Sequence[tuple[DataType, Sequence[IDimensionExpr | int]]],
    profile: Mapping[str, tuple[int, int, int]],
) -> BuiltPlugin:
    """Parse ``node`` and run the builder's calls on its plugin for inputs of the given (dtype, dims).

    ``profile`` gives each symbol's (min, opt, max). The order is TensorRT's: output types, output
    shapes, supported type/format combinations, configure, tactics; for an AOT plugin then, per
    tactic, launch parameters and the kernel.
    """
    builder = IExprBuilder()
    plugin = create_from_node(trt, node).clone()  # the builder works on clones
    n_in = len(inputs)
    n_out = plugin.get_num_outputs()
    assert n_out == len(node.output), f"the plugin has {n_out} outputs, the ONNX node {len(node.output)}"
    dims_in = [DimsExprs([d if isinstance(d, IDimensionExpr) else builder.constant(d) for d in dims])
               for _, dims in inputs]  # fmt: skip
    output_types = list(plugin.get_output_data_types([t for t, _ in inputs], [len(d) for d in dims_in]))
    assert len(output_types) == n_out and all(isinstance(t, DataType) for t in output_types), output_types
    out_exprs = plugin.get_output_shapes(dims_in, [], builder)
    assert len(out_exprs) == n_out, out_exprs
    output_shapes = [list(e) for e in out_exprs]

    def bounds(exprs: Sequence[IDimensionExpr]) -> tuple[Dims, Dims, Dims]:
        return tuple(Dims([e.evaluate({k: v[i] for k, v in profile.items()}) for e in exprs]) for i in range(3))  # type: ignore[return-value]

    def dynamic(dtype: DataType, exprs: Sequence[IDimensionExpr], fmt: TensorFormat) -> DynamicPluginTensorDesc:
        lo, opt, hi = bounds(exprs)
        shape = [e.get_constant_value() if e.is_constant() else -1 for e in exprs]
        return DynamicPluginTensorDesc(_desc(dtype, shape, fmt), lo, opt, hi)

    io_exprs = [list(d) for d in dims_in] + output_shapes
    io_types = [t for t, _ in inputs] + output_types
    flat = plugin.get_supported_format_combinations(
        [dynamic(t, e, TensorFormat.LINEAR) for t, e in zip(io_types, io_exprs, strict=True)], n_in
    )
    n_io = n_in + n_out
    assert len(flat) % n_io == 0, f"{len(flat)} descriptors for {n_io} I/O tensors"
    combinations = [[(d.type, d.format) for d in flat[i : i + n_io]] for i in range(0, len(flat), n_io)]
    wanted = [(t, TensorFormat.LINEAR) for t in io_types]
    assert wanted in combinations, f"the network's types {wanted} are not among the plugin's {combinations}"
    in_out = [dynamic(t, e, f) for (t, f), e in zip(wanted, io_exprs, strict=True)]
    plugin.configure_plugin(in_out[:n_in], in_out[n_in:])
    tactics = sorted(plugin.get_valid_tactics())
    kernels = []
    if isinstance(plugin, trt.IPluginV3QuickAOTBuild):
        for tactic in tactics or [0]:
            kernels.append(_aot_kernel(plugin, tactic, dims_in, in_out, n_in, builder))
    return BuiltPlugin(plugin, output_types, output_shapes, combinations, tactics, kernels)


class _LaunchParamsSink:
    """TensorRT's ``KernelLaunchParams`` receiver: every field must be a symbolic int32 expression."""

    FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.FIELDS:
            raise AttributeError(f"KernelLaunchParams has no field {name!r}")
        if not isinstance(getattr(value, "expr", None), IDimensionExpr):
            raise TypeError(f"KernelLaunchParams.{name} = {value!r}: expected an ISymExpr")
        object.__setattr__(self, name, value.expr)


class _SymExprSetter:
    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.values: dict[int, Any] = {}

    def __setitem__(self, index: int, value: Any) -> None:
        if not 0 <= index < self.nbSymExprs:
            raise IndexError(f"extra argument {index} of {self.nbSymExprs}")
        if not isinstance(getattr(value, "expr", None), IDimensionExpr):
            raise TypeError(f"extra argument {index} = {value!r}: expected an ISymExpr")
        self.values[index] = value


def _aot_kernel(plugin: Any, tactic: int, dims_in: Any, in_out: Any, n_in: int, builder: Any) -> BuiltKernel:
    plugin.set_tactic(tactic)
    sink, setter = _LaunchParamsSink(), _SymExprSetter()
    plugin.get_launch_params(dims_in, in_out, n_in, sink, setter, builder)
    assert sorted(setter.values) == list(range(setter.nbSymExprs)), "every extra argument must be set"
    name, ptx = plugin.get_kernel([d.desc for d in in_out[:n_in]], [d.desc for d in in_out[n_in:]])
    assert isinstance(name, str | bytes) and isinstance(ptx, bytes), (type(name), type(ptx))
    return BuiltKernel(
        tactic=tactic,
        kernel_name=name.decode() if isinstance(name, bytes) else name,
        ptx=ptx,
        grid=(sink.grid_x, sink.grid_y, sink.grid_z),  # type: ignore[attr-defined]
        block=(sink.block_x, sink.block_y, sink.block_z),  # type: ignore[attr-defined]
        shared_mem=sink.shared_mem,  # type: ignore[attr-defined]
        extra_args=[setter.values[i] for i in range(setter.nbSymExprs)],
    )
