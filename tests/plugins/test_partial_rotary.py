"""The partial-rotary plugin: reference vs transformers, Triton kernel (interpreter / GPU), AOT PTX, ONNX nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.plugins.partial_rotary import (
    ATTR_AOT,
    ONNX_DOMAIN,
    PLUGIN_NAME,
    make_onnx_node,
    onnx_opset_import,
    partial_rotary_reference,
    register_plugin,
    rotary_inv_freq,
)

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(80, 20), (64, 16)]  # (head_dim, rotary_dim): the real model, and a second shape
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _inputs(seed: int, head_dim: int, dtype: str, *, batch: int = 2, heads: int = 4, kv_heads: int = 2, seq: int = 9):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((batch, heads, seq, head_dim)) * 3).astype(np.float32).astype(_numpy_dtype(dtype))
    k = (rng.standard_normal((batch, kv_heads, seq, head_dim)) * 3).astype(np.float32).astype(_numpy_dtype(dtype))
    pos = rng.integers(0, 4096, (batch, seq), dtype=np.int64)
    pos[0, :2] = (0, 4095)
    return q, k, pos


def _pair_scale(x: np.ndarray, rotary_dim: int) -> np.ndarray:
    """Per output element, the magnitude of the inputs it is made of: max(|x_j|, |x_j+half|) when rotated."""
    mag = np.abs(x.astype(np.float64))
    half = rotary_dim // 2
    pair = np.maximum(mag[..., :half], mag[..., half:rotary_dim])
    return np.concatenate([pair, pair, mag[..., rotary_dim:]], axis=-1)


def _max_ulps(actual: np.ndarray, expected: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> float:
    """Largest difference in units of the dtype's last place at the magnitude of ``scale`` (or the expected value)."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    magnitude = np.abs(e) if scale is None else np.maximum(np.abs(e), scale)
    exponent = np.floor(np.log2(np.maximum(magnitude, 2.0**-14)))
    return float(np.max(np.abs(a - e) / 2.0 ** (exponent - MANTISSA_BITS[dtype]), initial=0.0))


# ---------------------------------------------------------------- reference vs transformers


def _transformers_rotary(q: np.ndarray, k: np.ndarray, pos: np.ndarray, head_dim: int, rotary_dim: int, theta: float):
    import torch
    from transformers import StableLmConfig
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding, apply_rotary_pos_emb

    heads = q.shape[1]
    config = StableLmConfig(
        hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=k.shape[1], num_hidden_layers=1,
        intermediate_size=64, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": rotary_dim / head_dim},
    )  # fmt: skip
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[q.dtype.name]
    qt = torch.from_numpy(q.astype(np.float32)).to(torch_dtype)
    kt = torch.from_numpy(k.astype(np.float32)).to(torch_dtype)
    cos, sin = StableLmRotaryEmbedding(config)(qt, torch.from_numpy(pos))
    q_rot, k_rot = apply_rotary_pos_emb(qt[..., :rotary_dim], kt[..., :rotary_dim], cos, sin)
    q_out = torch.cat([q_rot, qt[..., rotary_dim:]], dim=-1).float().numpy()
    k_out = torch.cat([k_rot, kt[..., rotary_dim:]], dim=-1).float().numpy()
    return q_out, k_out


@pytest.mark.parametrize("rotary_dim,theta", [(20, 10000.0), (16, 10000.0), (32, 500000.0), (64, 1e6), (2, 10000.0)])
def test_inv_freq_is_pytorch_exact(rotary_dim: int, theta: float) -> None:
    import torch

    expected = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    assert np.array_equal(rotary_inv_freq(rotary_dim, theta), expected.numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("head_dim,rotary_dim", SHAPES)
def test_reference_matches_transformers(head_dim: int, rotary_dim: int, dtype: str) -> None:
    q, k, pos = _inputs(1, head_dim, dtype)
    q_out, k_out = partial_rotary_reference(q, k, pos, rotary_dim=rotary_dim, theta=10000.0)
    assert q_out.dtype == q.dtype and q_out.shape == q.shape and k_out.shape == k.shape
    q_ref, k_ref = _transformers_rotary(q, k, pos, head_dim, rotary_dim, 10000.0)
    # Only float32 cos/sin may differ (numpy vs PyTorch, in the last bit): that moves an output by
    # at most ~one ulp of the inputs it is made of (here it is mostly bit-exact).
    assert _max_ulps(q_out, q_ref, dtype, _pair_scale(q, rotary_dim)) <= 2.0
    assert _max_ulps(k_out, k_ref, dtype, _pair_scale(k, rotary_dim)) <= 2.0
    if dtype == "float32":
        assert max(np.abs(q_out - q_ref).max(), np.abs(k_out - k_ref).max()) <= 1e-5
    np.testing.assert_array_equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_reference_rejects_bad_arguments() -> None:
    q, k, pos = _inputs(0, 80, "float32")
    with pytest.raises(InvalidArgumentError):
        partial_rotary_reference(q, k, pos, rotary_dim=21, theta=10000.0)
    with pytest.raises(InvalidArgumentError):
        partial_rotary_reference(q, k, pos, rotary_dim=96, theta=10000.0)
    with pytest.raises(InvalidArgumentError):
        partial_rotary_reference(q, k.astype(np.float16), pos, rotary_dim=20, theta=10000.0)
    with pytest.raises(InvalidArgumentError):
        partial_rotary_reference(q, k, pos[:, :3], rotary_dim=20, theta=10000.0)


# ---------------------------------------------------------------- Triton kernel, interpreted on CPU

INTERPRETER_SCRIPT = """
import importlib.util, json, sys
import numpy as np, torch
spec = importlib.util.spec_from_file_location("partial_rotary_tests", sys.argv[1])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
_inputs, _max_ulps, _pair_scale = helpers._inputs, helpers._max_ulps, helpers._pair_scale
from stlm.plugins.partial_rotary import partial_rotary_reference, partial_rotary_triton
results = {}
for head_dim, rotary_dim in [(80, 20), (64, 16)]:
    for dtype in ("float32", "float16", "bfloat16"):
        q, k, pos = _inputs(7, head_dim, dtype)
        to_torch = lambda a: torch.from_numpy(a.astype(np.float32)).to(getattr(torch, dtype))
        q_out, k_out = partial_rotary_triton(
            to_torch(q), to_torch(k), torch.from_numpy(pos), rotary_dim=rotary_dim, theta=10000.0
        )
        q_ref, k_ref = partial_rotary_reference(q, k, pos, rotary_dim=rotary_dim, theta=10000.0)
        got = [q_out.float().numpy(), k_out.float().numpy()]
        ref = [q_ref.astype(np.float32), k_ref.astype(np.float32)]
        scales = [_pair_scale(q, rotary_dim), _pair_scale(k, rotary_dim)]
        results[f"{head_dim}/{rotary_dim}/{dtype}"] = {
            "max_abs": max(float(np.abs(g - r).max()) for g, r in zip(got, ref)),
            "max_ulps": max(_max_ulps(g, r, dtype, sc) for g, r, sc in zip(got, ref, scales)),
            "mismatched": sum(int((g != r).sum()) for g, r in zip(got, ref)) / sum(g.size for g in got),
            "dtype_ok": str(q_out.dtype) == f"torch.{dtype}" and q_out.shape == q.shape and k_out.shape == k.shape,
        }
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, float]]:
    """Run the kernel under TRITON_INTERPRET=1 in a subprocess (the variable must precede importing triton)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "0"}
    command = [sys.executable, "-c", INTERPRETER_SCRIPT, __file__]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", None)])
@pytest.mark.parametrize("head_dim,rotary_dim", SHAPES)
def test_triton_kernel_interpreted(
    interpreted: dict[str, dict[str, float]], head_dim: int, rotary_dim: int, dtype: str, tolerance: float | None
) -> None:
    result = interpreted[f"{head_dim}/{rotary_dim}/{dtype}"]
    assert result["dtype_ok"]
    if tolerance is not None:
        assert result["max_abs"] <= tolerance
    # The kernel rounds where the model rounds, and the interpreter's cos/sin are numpy's: the bits
    # match the reference (a rounding mistake would change a large share of the elements).
    assert result["max_ulps"] <= 2.0
    assert result["mismatched"] <= 1e-3


# ---------------------------------------------------------------- AOT PTX


def _ptxas(ptx: str, target: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    from stlm.plugins.partial_rotary.aot import find_ptxas

    ptxas = find_ptxas()  # PATH, else the one in triton's wheel
    if ptxas is None:
        pytest.skip("no ptxas: none on PATH and the triton wheel has none")
    source = tmp_path / f"partial_rotary_{target}.ptx"
    source.write_text(ptx)
    return subprocess.run([ptxas, "--gpu-name", target, str(source), "-o", str(tmp_path / "out.cubin")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_ptxas_is_found_in_the_triton_wheel_without_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    triton = pytest.importorskip("triton")
    from stlm.plugins.partial_rotary.aot import find_ptxas

    monkeypatch.setenv("PATH", str(tmp_path))  # no ptxas here
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    found = find_ptxas()
    assert found is not None, "triton's wheel bundles ptxas"
    assert Path(found).resolve().is_relative_to(Path(triton.__file__).resolve().parent)
    proc = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Cuda compilation tools" in proc.stdout


@pytest.mark.parametrize("arch,dtype", [(80, "fp16"), (80, "fp32"), (80, "bf16"), (90, "fp16"), (90, "bf16")])
def test_compile_ptx_assembles(arch: int, dtype: str, tmp_path: Path) -> None:
    from stlm.plugins.partial_rotary.aot import NUM_KERNEL_PARAMS, compile_ptx, entry_params

    compiled = compile_ptx(dtype, arch=arch)
    name, params = entry_params(compiled.ptx)
    assert name == compiled.kernel_name and dtype in name
    assert len(params) == NUM_KERNEL_PARAMS  # TensorRT passes q, k, position_ids, 3 int32 scalars, q_out, k_out
    assert compiled.ptx_target == f"sm_{arch}"  # never sm_90a: that PTX loads only on sm_90 exactly
    assert f"\n.target sm_{arch}\n" in compiled.ptx
    assert ".version 8.0" in compiled.ptx
    assert f".reqntid {compiled.block[0]}" in compiled.ptx and compiled.shared_mem == 0
    assert compiled.grid(2, 512, 32, 32) == (1024, 8, 1)
    proc = _ptxas(compiled.ptx, compiled.ptx_target, tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("arch", [90, 100, 120])
def test_ptx_for_sm90_and_later_runs_on_later_gpus(arch: int, tmp_path: Path) -> None:
    """PTX for sm_NN must assemble for sm_NN and every later architecture (what the driver's JIT does
    on a newer GPU); Triton's own target sm_NNa would be refused there."""
    from stlm.plugins.partial_rotary.aot import compile_ptx

    compiled = compile_ptx("bf16", arch=arch)
    assert compiled.ptx_target == f"sm_{arch}"
    for later in sorted({arch, 100, 120} - {a for a in (100, 120) if a < arch}):
        proc = _ptxas(compiled.ptx, f"sm_{later}", tmp_path)
        assert proc.returncode == 0, (later, proc.stderr)
    arch_specific = compiled.ptx.replace(f".target sm_{arch}", f".target sm_{arch}a")
    proc = _ptxas(arch_specific, "sm_120" if arch < 120 else "sm_121", tmp_path)
    assert proc.returncode != 0, "the test must be able to fail: sm_NNa PTX does not run on later GPUs"


def test_portable_target_rewrite() -> None:
    from stlm.plugins.partial_rotary.aot import portable_target

    assert portable_target(".version 8.0\n.target sm_90a\n.address_size 64\n") == (
        ".version 8.0\n.target sm_90\n.address_size 64\n",
        "sm_90",
    )
    assert portable_target(".target sm_100f, debug\n")[1] == "sm_100"
    assert portable_target(".target sm_80\n") == (".target sm_80\n", "sm_80")
    with pytest.raises(ValueError):
        portable_target(".version 8.0\n")


def test_hardware_compat_refused_for_sm90_ptx(monkeypatch: pytest.MonkeyPatch) -> None:
    from stlm.plugins.partial_rotary.plugin import ARCH_ENV, check_hardware_compat

    check_hardware_compat("ampere_plus")  # default sm_80 PTX: portable to every Ampere-or-newer GPU
    monkeypatch.setenv(ARCH_ENV, "90")
    check_hardware_compat("none")
    with pytest.raises(InvalidArgumentError, match="ampere_plus") as err:
        check_hardware_compat("ampere_plus")
    assert ARCH_ENV in str(err.value) and "fix:" in str(err.value)


def test_every_tactic_tile_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stlm.plugins.partial_rotary.aot import compile_ptx
    from stlm.plugins.partial_rotary.plugin import ARCH_ENV, TACTICS, aot_arch, tile_for_tactic

    assert tile_for_tactic(0) == tile_for_tactic(1) and aot_arch() == 80
    monkeypatch.setenv(ARCH_ENV, "90")
    assert aot_arch() == 90
    names = set()
    for tactic in TACTICS:
        block_h, num_warps = tile_for_tactic(tactic)
        compiled = compile_ptx("fp16", arch=80, block_h=block_h, num_warps=num_warps)
        names.add(compiled.kernel_name)
        assert compiled.block == (num_warps * 32, 1, 1)
        proc = _ptxas(compiled.ptx, compiled.ptx_target, tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert len(names) == len(TACTICS)  # TensorRT tells kernels apart by name


def test_ptx_rewrites() -> None:
    from stlm.plugins.partial_rotary.aot import entry_params, rename_entry, strip_trailing_params

    ptx = (
        ".visible .entry kern(\n\t.param .u64 kern_param_0,\n\t.param .u32 kern_param_1,\n"
        "\t.param .u64 kern_param_2\n)\n"
        "{\n\tld.param.b64 %rd1, [kern_param_0];\n\tld.param.b32 %r1, [kern_param_1];\n}\n"
    )
    stripped = rename_entry(strip_trailing_params(ptx, 2), "kern", "stlm_k")
    assert entry_params(stripped) == ("stlm_k", ["stlm_k_param_0", "stlm_k_param_1"])
    assert "[stlm_k_param_1]" in stripped and "kern" not in stripped
    with pytest.raises(ValueError):
        strip_trailing_params(ptx, 1)  # kern_param_1 is used by the body


def test_compile_ptx_rejects_bad_arguments() -> None:
    from stlm.plugins.partial_rotary.aot import compile_ptx

    with pytest.raises(InvalidArgumentError):
        compile_ptx("int8")
    with pytest.raises(InvalidArgumentError):
        compile_ptx("fp16", arch=61)
    with pytest.raises(InvalidArgumentError):
        compile_ptx("fp16", rotary_dim=19)


# ---------------------------------------------------------------- ONNX node and ONNX Runtime custom op


def test_make_onnx_node_attributes() -> None:
    from onnx import helper

    node = make_onnx_node("q", "k", "pos", "q_out", "k_out", rotary_dim=20, theta=10000.0, name="layer0/rope")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain, node.name) == (PLUGIN_NAME, ONNX_DOMAIN, "layer0/rope")
    assert list(node.input) == ["q", "k", "pos"] and list(node.output) == ["q_out", "k_out"]
    assert attrs == {"rotary_dim": 20, "theta": 10000.0, "plugin_namespace": b"stlm", "plugin_version": b"1", "aot": 1}
    jit = make_onnx_node("q", "k", "pos", "a", "b", rotary_dim=20, theta=10000.0, name="n", aot=False)
    assert [helper.get_attribute_value(a) for a in jit.attribute if a.name == ATTR_AOT] == [0]
    with pytest.raises(InvalidArgumentError):
        make_onnx_node("q", "k", "pos", "a", "b", rotary_dim=7, theta=10000.0, name="n")


def _plugin_model(elem_type: int, plugin_type: int, head_dim: int, rotary_dim: int):
    """A graph holding one plugin node; Casts to ``plugin_type`` around it when it differs from the I/O type."""
    import onnx
    from onnx import TensorProto, helper

    nodes, q, k, q_out, k_out = [], "q", "k", "q_out", "k_out"
    if plugin_type != elem_type:
        nodes += [helper.make_node("Cast", [x], [f"{x}_c"], to=plugin_type) for x in ("q", "k")]
        q, k, q_out, k_out = "q_c", "k_c", "q_out_c", "k_out_c"
    nodes.append(make_onnx_node(q, k, "position_ids", q_out, k_out, rotary_dim=rotary_dim, theta=10000.0, name="rope"))
    if plugin_type != elem_type:
        nodes += [helper.make_node("Cast", [f"{x}_c"], [x], to=elem_type) for x in ("q_out", "k_out")]
    io = [("q", 4), ("k", 2), ("q_out", 4), ("k_out", 2)]
    values = {n: helper.make_tensor_value_info(n, elem_type, ["batch", h, "seq", head_dim]) for n, h in io}
    pos = helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])
    graph = helper.make_graph(nodes, "rope", [values["q"], values["k"], pos], [values["q_out"], values["k_out"]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), onnx_opset_import()])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("head_dim,rotary_dim", SHAPES)
def test_ort_custom_op_matches_reference(head_dim: int, rotary_dim: int, dtype: str) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from stlm.plugins.partial_rotary.ort_op import ort_session_options_with_plugin_op, to_ort_extensions_model

    plugin_types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
    plugin_type = plugin_types[dtype]
    # ONNX Runtime's Python API cannot feed bfloat16 arrays: that graph takes float32 and casts inside.
    elem_type = TensorProto.FLOAT if dtype == "bfloat16" else plugin_type
    model = to_ort_extensions_model(_plugin_model(elem_type, plugin_type, head_dim, rotary_dim))
    onnx.checker.check_model(model)
    assert all(n.domain != ONNX_DOMAIN for n in model.graph.node)
    options = ort_session_options_with_plugin_op()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    q, k, pos = _inputs(3, head_dim, dtype)
    feed_dtype = np.float32 if dtype == "bfloat16" else q.dtype
    q_out, k_out = session.run(None, {"q": q.astype(feed_dtype), "k": k.astype(feed_dtype), "position_ids": pos})
    # Held to transformers (not to the reference the op is built on), as tightly as the reference is.
    q_ref, k_ref = _transformers_rotary(q, k, pos, head_dim, rotary_dim, 10000.0)
    q_out, k_out = q_out.astype(q.dtype), k_out.astype(k.dtype)
    assert _max_ulps(q_out, q_ref, dtype, _pair_scale(q, rotary_dim)) <= 2.0
    assert _max_ulps(k_out, k_ref, dtype, _pair_scale(k, rotary_dim)) <= 2.0
    np.testing.assert_array_equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


# ---------------------------------------------------------------- TensorRT registration and import cost

IMPORT_SCRIPT = """
import json, sys
import stlm.plugins.partial_rotary
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "tensorrt", "triton", "transformers", "onnxruntime"})
print(json.dumps(heavy))
"""


def test_import_is_light() -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_register_plugin_without_tensorrt() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        register_plugin()
    with pytest.raises(BackendUnavailableError):  # still raising on a second call: nothing half-registered
        register_plugin()
    assert register_plugin(required=False) is False  # an AOT engine runs without the registration


def test_register_plugin_not_required_tolerates_a_tensorrt_that_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT installed but unusable (its native library missing, or too old for tensorrt.plugin):
    required=False logs and returns False; required=True raises BackendUnavailableError."""
    import types

    from stlm.plugins.partial_rotary import plugin

    broken = types.ModuleType("tensorrt")
    broken.__path__ = []  # a package whose native part fails to load
    monkeypatch.setitem(sys.modules, "tensorrt", broken)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)  # import tensorrt.plugin -> ImportError
    monkeypatch.setattr(plugin, "_registered", False)
    assert plugin.register_plugin(required=False) is False
    with pytest.raises(BackendUnavailableError, match="TensorRT is installed but unusable"):
        plugin.register_plugin(required=True)
    old = types.ModuleType("tensorrt.plugin")  # TensorRT 10.0-10.9: tensorrt.plugin without aot_impl
    old.register = old.impl = old.autotune = lambda *a, **k: None  # type: ignore[attr-defined]
    broken.__version__ = "10.3.0"  # type: ignore[attr-defined]
    broken.plugin = old  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", old)
    assert plugin.register_plugin(required=False) is False
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 11 or newer; found 10\.3\.0"):
        plugin.register_plugin()  # stlm.tensorrt.gpu's one importer applies the version floor
    assert plugin._registered is False


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_triton_kernel_and_aot_ptx_on_gpu(dtype: str) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch.cuda is not available (no NVIDIA GPU / CUDA build of torch)")
    from stlm.plugins.partial_rotary.aot import compile_ptx, launch_with_cuda_driver
    from stlm.plugins.partial_rotary.kernel import partial_rotary_triton

    q, k, pos = _inputs(11, 80, dtype, batch=3, heads=32, kv_heads=32, seq=64)
    torch_dtype = getattr(torch, dtype)
    qt, kt = (torch.from_numpy(a.astype(np.float32)).to(torch_dtype).cuda() for a in (q, k))
    post = torch.from_numpy(pos).cuda()
    q_ref, k_ref = partial_rotary_reference(q, k, pos, rotary_dim=20, theta=10000.0)
    major, minor = torch.cuda.get_device_capability()
    compiled = compile_ptx({"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype], arch=80)
    aot_q, aot_k = torch.empty_like(qt), torch.empty_like(kt)
    launch_with_cuda_driver(compiled, qt, kt, post, aot_q, aot_k)
    for q_out, k_out in (partial_rotary_triton(qt, kt, post, rotary_dim=20, theta=10000.0), (aot_q, aot_k)):
        got = [q_out.float().cpu().numpy(), k_out.float().cpu().numpy()]
        # GPU float32 cos/sin (libdevice) may differ from numpy's in the last bit (see the transformers test).
        assert _max_ulps(got[0], q_ref.astype(np.float32), dtype, _pair_scale(q, 20)) <= 2.0, (major, minor)
        assert _max_ulps(got[1], k_ref.astype(np.float32), dtype, _pair_scale(k, 20)) <= 2.0
        if dtype == "float32":
            assert max(np.abs(got[0] - q_ref).max(), np.abs(got[1] - k_ref).max()) <= 1e-5
