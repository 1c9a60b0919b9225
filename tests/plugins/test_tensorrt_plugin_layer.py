"""The partial_rotary plugin through TensorRT's own Python plugin layer (``tensorrt.plugin`` 11.4).

TensorRT's validator (``tensorrt/plugin/_validate.py``) checks stlm's register / autotune /
aot_impl / impl definitions when :func:`register_plugin` runs; then the plugin is created from the
ONNX node stlm exports, as TensorRT's ONNX parser does, and driven through the builder's calls on
symbolic shapes (``tests/trt_builder.py``). Only TensorRT's native module is a stand-in
(``tests/trt_standin.py``); the wheel is fetched from PyPI once into a cache. Deliberately broken
copies of ``plugin.py`` must fail.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from trt_builder import BuiltPlugin, build_plugin_node
from trt_standin import DataType, TensorFormat, plugin_layer_dir, symbol
from trt_standin import tensorrt_plugin_layer as load_layer

from stlm.errors import InvalidArgumentError
from stlm.plugins.partial_rotary import plugin as stlm_plugin
from stlm.plugins.partial_rotary.spec import PLUGIN_ID, make_onnx_node

PLUGIN_SOURCE = Path(stlm_plugin.__file__)
DTYPES = {"fp32": DataType.FLOAT, "fp16": DataType.HALF, "bf16": DataType.BF16}
HEADS, KV_HEADS, HEAD_DIM, ROTARY_DIM, THETA = 32, 8, 80, 20, 10000.0
PROFILE = {"batch": (1, 2, 4), "seq": (1, 64, 512)}


@pytest.fixture(scope="module")
def layer_dir() -> Path:
    try:
        return plugin_layer_dir()
    except (RuntimeError, OSError, ValueError) as exc:  # no network / no pip: the only reason to skip
        pytest.skip(f"the tensorrt-cu12-bindings wheel cannot be had: {exc}")


@pytest.fixture
def layer(layer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[types.ModuleType, types.ModuleType]]:
    """A fresh TensorRT plugin layer (empty registry) and an unregistered stlm plugin module."""
    monkeypatch.setattr(stlm_plugin, "_registered", False)
    with load_layer(layer_dir) as (trt, trtp):
        yield trt, trtp


def _node(aot: bool) -> Any:
    return make_onnx_node(
        "q", "k", "position_ids", "q_out", "k_out", rotary_dim=ROTARY_DIM, theta=THETA, name="rope0", aot=aot
    )


def _inputs(dtype: DataType, head_dim: Any = HEAD_DIM) -> list[tuple[DataType, list[Any]]]:
    batch, seq = symbol("batch"), symbol("seq")
    return [
        (dtype, [batch, HEADS, seq, head_dim]),
        (dtype, [batch, KV_HEADS, seq, head_dim]),
        (DataType.INT64, [batch, seq]),
    ]


def _build(trt: Any, dtype: DataType, *, aot: bool = True) -> BuiltPlugin:
    return build_plugin_node(trt, _node(aot), _inputs(dtype), PROFILE)


def test_register_plugin_passes_tensorrts_validator(layer: tuple[Any, Any]) -> None:
    trt, trtp = layer
    from tensorrt.plugin._lib import QDP_CREATORS, QDP_REGISTRY

    assert stlm_plugin.register_plugin() is True
    definition = QDP_REGISTRY[PLUGIN_ID]
    assert definition.input_tensor_names == ["q", "k", "position_ids"]
    assert list(definition.input_attrs) == ["rotary_dim", "theta"]
    assert definition.input_attrs == {"rotary_dim": int, "theta": float}
    assert definition.num_outputs == 2
    assert definition.impl_attr_names == definition.aot_impl_attr_names == ["rotary_dim", "theta"]
    assert definition.autotune_attr_names == [] and definition.expects_tactic is True
    assert None not in (definition.impl_func, definition.aot_impl_func, definition.autotune_func)
    creator = trt.get_plugin_registry().get_creator("partial_rotary", "1", "stlm")
    assert creator is QDP_CREATORS[PLUGIN_ID]
    assert [(f.name, f.type) for f in creator.field_names] == [
        ("rotary_dim", trt.PluginFieldType.INT64),
        ("theta", trt.PluginFieldType.FLOAT64),
    ]
    assert stlm_plugin.register_plugin() is True  # idempotent: TensorRT would refuse a second definition
    assert trtp.op.stlm.partial_rotary is definition


@pytest.mark.parametrize("name", list(DTYPES))
def test_builder_drives_the_aot_plugin(layer: tuple[Any, Any], name: str) -> None:
    """create -> output types/shapes -> combinations -> tactics -> launch params -> kernel, as the builder does."""
    from stlm.plugins.partial_rotary.aot import compile_ptx, entry_params

    trt, _ = layer
    stlm_plugin.register_plugin()
    dtype = DTYPES[name]
    built = _build(trt, dtype)
    assert isinstance(built.plugin, trt.IPluginV3QuickAOTBuild)
    assert built.output_types == [dtype, dtype]
    env = {"batch": 3, "seq": 7}
    shapes = [[e.evaluate(env) for e in shape] for shape in built.output_shapes]
    assert shapes == [[3, HEADS, 7, HEAD_DIM], [3, KV_HEADS, 7, HEAD_DIM]]
    linear = TensorFormat.LINEAR
    assert sorted(built.combinations, key=str) == sorted(
        ([(t, linear), (t, linear), (DataType.INT64, linear), (t, linear), (t, linear)] for t in DTYPES.values()),
        key=str,
    )
    assert built.tactics == sorted(stlm_plugin.TACTICS)
    for kernel in built.kernels:
        block_h, num_warps = stlm_plugin.TACTICS[kernel.tactic]
        compiled = compile_ptx(name, arch=80, head_dim=HEAD_DIM, rotary_dim=ROTARY_DIM, theta=THETA,
                               block_h=block_h, num_warps=num_warps)  # fmt: skip
        assert kernel.kernel_name == compiled.kernel_name and kernel.ptx == compiled.ptx.encode()
        entry, params = entry_params(kernel.ptx.decode())
        assert entry == kernel.kernel_name
        # TensorRT's AOT launch: inputs, then the int32 extra arguments, then outputs.
        assert len(params) == 3 + len(kernel.extra_args) + 2 == 8
        for batch, seq in ((1, 1), (2, 512), (4, 33)):
            env = {"batch": batch, "seq": seq}
            assert tuple(e.evaluate(env) for e in kernel.grid) == compiled.grid(batch, seq, HEADS, KV_HEADS)
            assert [a.expr.evaluate(env) for a in kernel.extra_args] == [seq, HEADS, KV_HEADS]
        assert [a.dtype for a in kernel.extra_args] == [trt.PluginArgDataType.INT32] * 3
        assert tuple(e.get_constant_value() for e in kernel.block) == compiled.block
        assert kernel.shared_mem.get_constant_value() == compiled.shared_mem == 0


def test_builder_drives_the_jit_plugin_and_its_serialization(layer: tuple[Any, Any]) -> None:
    trt, _ = layer
    stlm_plugin.register_plugin()
    built = _build(trt, DataType.HALF, aot=False)
    assert isinstance(built.plugin, trt.IPluginV3QuickRuntime)
    assert not isinstance(built.plugin, trt.IPluginV3QuickAOTBuild)
    assert built.output_types == [DataType.HALF] * 2 and built.tactics == [1, 2, 3] and built.kernels == []
    fields = built.plugin.get_fields_to_serialize()  # what the engine stores for the Python impl
    assert {f.name: f.data.tolist() for f in fields} == {"rotary_dim": [ROTARY_DIM], "theta": [THETA]}
    creator = trt.get_plugin_registry().get_creator("partial_rotary", "1", "stlm")
    restored = creator.create_plugin("partial_rotary", "stlm", fields, trt.TensorRTPhase.RUNTIME)  # deserialization
    assert restored.attrs == {"rotary_dim": ROTARY_DIM, "theta": THETA}
    assert type(restored.attrs["rotary_dim"]) is int and type(restored.attrs["theta"]) is float


def test_aot_plugin_with_a_dynamic_head_dim_is_a_clear_error(layer: tuple[Any, Any]) -> None:
    trt, _ = layer
    stlm_plugin.register_plugin()
    with pytest.raises(InvalidArgumentError, match="static head_dim"):
        build_plugin_node(
            trt, _node(True), _inputs(DataType.HALF, head_dim=symbol("head_dim")), {**PROFILE, "head_dim": (80, 80, 80)}
        )


def test_the_driver_refuses_types_the_plugin_does_not_declare(layer: tuple[Any, Any]) -> None:
    trt, _ = layer
    stlm_plugin.register_plugin()
    inputs = _inputs(DataType.HALF)
    inputs[2] = (DataType.INT32, inputs[2][1])  # int32 position ids: not in the autotune combinations
    with pytest.raises(AssertionError, match="not among the plugin's"):
        build_plugin_node(trt, _node(True), inputs, PROFILE)


# ---------------------------------------------------------------- broken definitions must fail

AOT_ATTRS = "        rotary_dim: int,\n        theta: float,\n        outputs: tuple[TensorDesc, TensorDesc],\n"
MUTATIONS = {
    "aot_impl attributes out of order": (
        AOT_ATTRS,
        "        theta: float,\n        rotary_dim: int,\n        outputs: tuple[TensorDesc, TensorDesc],\n",
        "does not match the expected input arg schema",
    ),
    "impl without its stream argument": (
        "        stream: int,\n        tactic: int,\n    ) -> None:",
        "        tactic: int,\n    ) -> None:",
        "does not match the expected input arg schema",
    ),
    "autotune attribute with another type": (
        "q: TensorDesc, k: TensorDesc, position_ids: TensorDesc, outputs: tuple[TensorDesc, TensorDesc]\n"
        "    ) -> list[trtp.AutoTuneCombination]:",
        "q: TensorDesc, k: TensorDesc, position_ids: TensorDesc, theta: int, outputs: tuple[TensorDesc, TensorDesc]\n"
        "    ) -> list[trtp.AutoTuneCombination]:",
        "type annotation different from the one specified at registration",
    ),
    "aot_impl returning three values": (
        ") -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:",
        ") -> tuple[str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:",
        "Return annotation",
    ),
    "register declaring one output": (
        "    ) -> tuple[TensorDesc, TensorDesc]:\n        return q.like(), k.like()",
        "    ) -> TensorDesc:\n        return q.like(), k.like()",
        "the plugin has 1 outputs, the ONNX node 2",
    ),
    "autotune without the position_ids type": (
        'IO_TYPES: Final = "FP32|FP16|BF16, FP32|FP16|BF16, INT64, FP32|FP16|BF16, FP32|FP16|BF16"',
        'IO_TYPES: Final = "FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16"',
        "not among the plugin's",
    ),
    "grid without the key heads": (
        "launch.grid_y = trtp.cdiv(n_q_heads, block_h) + trtp.cdiv(n_k_heads, block_h)",
        "launch.grid_y = trtp.cdiv(n_q_heads, block_h)",
        "grid",
    ),
}


def _mutant(old: str, new: str) -> types.ModuleType:
    """plugin.py with one edit, loaded as a separate module (the edit must apply exactly once)."""
    source = PLUGIN_SOURCE.read_text()
    assert source.count(old) == 1, f"mutation target not found exactly once in plugin.py: {old!r}"
    module = types.ModuleType("stlm_partial_rotary_mutant")
    module.__file__ = str(PLUGIN_SOURCE)
    # dont_inherit: this test module's `from __future__ import annotations` would turn the annotations
    # into strings, which TensorRT's validator rejects (plugin.py deliberately has no such import).
    exec(compile(source.replace(old, new), str(PLUGIN_SOURCE), "exec", dont_inherit=True), module.__dict__)
    return module


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_broken_definitions_are_caught(layer: tuple[Any, Any], mutation: str) -> None:
    from stlm.plugins.partial_rotary.aot import compile_ptx

    trt, _ = layer
    old, new, needle = MUTATIONS[mutation]
    module = _mutant(old, new)
    with pytest.raises((ValueError, AssertionError)) as err:
        module.register_plugin()  # TensorRT's validator
        built = _build(trt, DataType.HALF)  # the parser and builder
        compiled = compile_ptx("fp16", arch=80, block_h=8, num_warps=2)
        grid = tuple(e.evaluate({"batch": 2, "seq": 5}) for e in built.kernels[0].grid)
        assert grid == compiled.grid(2, 5, HEADS, KV_HEADS), f"grid {grid}"
    assert needle in str(err.value), str(err.value)


def test_unmutated_source_passes_the_same_checks(layer: tuple[Any, Any]) -> None:
    """The mutation test's control: plugin.py loaded the same way passes everything."""
    trt, _ = layer
    module = _mutant("IO_TYPES: Final", "IO_TYPES: Final")
    assert module.register_plugin() is True
    built = _build(trt, DataType.BF16)
    assert [k.tactic for k in built.kernels] == [1, 2, 3]
    assert np.all([k.ptx.startswith(b"//") for k in built.kernels])
