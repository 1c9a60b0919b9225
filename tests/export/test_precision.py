"""fp16/bf16 packages on CPU: weights stored in the package dtype, computed in fp32, KV cache in the
package dtype at the graph boundary (fp32 for bf16 in place), matching transformers (fp32) within the
tolerance for the dtype; the TensorRT target stays a true fp16/bf16 graph."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from stlm.errors import BackendUnavailableError
from stlm.export.graph import build_decoder
from stlm.export.onnx_export import export_onnx
from stlm.export.precision import CPU_KERNEL_GAPS, plan_precision
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import load_model_config
from stlm.package.dtypes import NUMPY_NAME, ONNX_TYPE
from stlm.package.manifest import read_manifest
from stlm.quality.verify import DEFAULT_STEPS, PROMPTS, Reference, transformers_reference, verify_package
from stlm.runtime import Generator
from stlm.runtime.tokenizer import Tokenizer

LOW = ("fp16", "bf16")
KV = ("concat", "inplace")


@pytest.fixture(scope="module")
def low_packages(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """fp16 and bf16 packages of the tiny checkpoint, both graph variants (ONNX Runtime target)."""
    base = tmp_path_factory.mktemp("low_precision")
    return {(d, kv): export_onnx(checkpoint, base / f"{d}-{kv}", dtype=d, kv_cache=kv) for d in LOW for kv in KV}


@pytest.fixture(scope="module")
def reference(checkpoint: Path, package: Path) -> Reference:
    """transformers fp32 on the verify prompts, computed once for every package of the checkpoint."""
    tokenizer = Tokenizer.from_file(package / "tokenizer.json")
    return transformers_reference(checkpoint, [tokenizer.encode(p) for p in PROMPTS[:4]], DEFAULT_STEPS)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_package_generates_and_matches_transformers(
    dtype: str, kv: str, reference: Reference, low_packages: dict[tuple[str, str], Path]
) -> None:
    report = verify_package(reference, low_packages[dtype, kv])
    assert report.accuracy_class == dtype
    assert report.passed, report.format()
    # Generation on CPU; its greedy tokens share with transformers' exactly the prefix verify reports.
    gen = Generator.load(low_packages[dtype, kv])
    got = list(gen.complete([PROMPTS[0]], temperature=0, max_new_tokens=DEFAULT_STEPS)[0].token_ids)
    want = list(reference.tokens[0])
    shared = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), min(len(got), len(want)))
    assert shared == min(report.prompts[0].greedy_agree, len(got))


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", LOW)
def test_weights_are_stored_low_and_cast_to_fp32(
    dtype: str, kv: str, package: Path, low_packages: dict[tuple[str, str], Path]
) -> None:
    pkg = low_packages[dtype, kv]
    manifest = read_manifest(pkg)
    kv_dtype = "fp32" if (dtype, kv) == ("bf16", "inplace") else dtype
    variant = manifest.variant
    assert manifest.dtype == dtype
    assert (variant.weight_dtype, variant.compute_dtype, variant.kv_dtype) == (dtype, "fp32", kv_dtype)
    assert manifest.contract.kv_dtype == NUMPY_NAME[kv_dtype] and "fp32" in variant.precision_note  # type: ignore[index]
    model = onnx.load(str(pkg / "model.onnx"))
    low = {t.name for t in model.graph.initializer if t.data_type == ONNX_TYPE[dtype]}  # type: ignore[index]
    assert "lm_head.weight" in low and "model.layers.0.mlp.down_proj.weight" in low
    cast_of = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for name in low - {"model.embed_tokens.weight", "rotary.cos_cache", "rotary.sin_cache"}:
        assert name in cast_of and cast_of[name].attribute[0].i == TensorProto.FLOAT, name
        assert [n.op_type for n in model.graph.node if name in n.input] == ["Cast"], name
    assert (pkg / "model.onnx").stat().st_size < 0.55 * (package / "model.onnx").stat().st_size


@pytest.mark.parametrize("dtype", LOW)
def test_tensorrt_target_stays_a_true_low_precision_graph(dtype: str, checkpoint: Path, tmp_path: Path) -> None:
    pkg = export_onnx(checkpoint, tmp_path / dtype, dtype=dtype, rotary="plugin")
    manifest = read_manifest(pkg)
    assert manifest.variant.compute_dtype == dtype and manifest.contract.kv_dtype == NUMPY_NAME[dtype]  # type: ignore[index]
    model = onnx.load(str(pkg / "model.onnx"))
    floats = {t.name for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, ONNX_TYPE[dtype])}  # type: ignore[index]
    weights = {t.name for t in model.graph.initializer if t.name.endswith(".weight")}
    assert weights and all(t.data_type == ONNX_TYPE[dtype] for t in model.graph.initializer if t.name in weights)  # type: ignore[index]
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in floats]
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(matmul_weights) == 4 * load_model_config(checkpoint).num_layers + 1  # qkv, o, gate_up, down; LM head


def test_precision_plan() -> None:
    plan = {
        (d, t, kv): plan_precision(d, target=t, kv_cache=kv)  # type: ignore[arg-type]
        for d in ("fp32", "fp16", "bf16")
        for t in ("onnxruntime", "tensorrt")
        for kv in KV
    }
    for (d, t, kv), p in plan.items():
        assert p.weights == d
        assert p.compute == (d if t == "tensorrt" else "fp32")
        assert p.kv == ("fp32" if (d, t, kv) == ("bf16", "onnxruntime", "inplace") else d)
    assert "GroupQueryAttention" in plan["bf16", "onnxruntime", "inplace"].note


def _one_node_session(
    op: str, elem: int, inputs: list[int | None], outputs: int, domain: str = "", **attrs: object
) -> None:
    names = [f"i{k}" if t is not None else "" for k, t in enumerate(inputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, [f"o{k}" for k in range(outputs)], domain=domain, **attrs)],
        "probe",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, inputs, strict=True) if t is not None],
        [helper.make_tensor_value_info(f"o{k}", elem, None) for k in range(outputs)],
    )
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_cpu_kernel_facts_the_design_rests_on() -> None:
    """ORT's CPU provider: no bf16 MatMul / GroupQueryAttention (so bf16 computes in fp32 with an fp32
    in-place cache), an fp16 GroupQueryAttention (so the fp16 in-place cache stays fp16). If ORT
    gains the kernels, this fails: revisit stlm.export.precision."""
    bf, fp16, i32 = TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.INT32
    assert "MatMul" in CPU_KERNEL_GAPS["bf16"] and "GroupQueryAttention" in CPU_KERNEL_GAPS["bf16"]
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED.*MatMul"):
        _one_node_session("MatMul", bf, [bf, bf], 1)
    gqa = dict(domain="com.microsoft", num_heads=4, kv_num_heads=4, do_rotary=1)
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED.*GroupQueryAttention"):
        _one_node_session("GroupQueryAttention", bf, [bf, None, None, bf, bf, i32, i32, bf, bf], 3, **gqa)
    _one_node_session("GroupQueryAttention", fp16, [fp16, None, None, fp16, fp16, i32, i32, fp16, fp16], 3, **gqa)
    _one_node_session("LayerNormalization", bf, [bf, bf, bf], 1, axis=-1)


def test_a_bf16_compute_graph_on_cpu_is_a_clear_error(
    checkpoint: Path, low_packages: dict[tuple[str, str], Path]
) -> None:
    """A graph that computes in bf16 (what --dtype bf16 wrote before, and still writes for TensorRT)
    cannot run on ONNX Runtime's CPU provider: BackendUnavailableError naming the op and the fix."""
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "bf16-compute"
        shutil.copytree(low_packages["bf16", "concat"], pkg)
        manifest = read_manifest(pkg)
        bf16_compute = dataclasses.replace(manifest.variant, compute_dtype="bf16")
        graph = build_decoder(
            load_model_config(checkpoint), SafetensorsCheckpoint(checkpoint), bf16_compute, opset=18, data_path=None
        )
        assert {t.data_type for t in graph.graph.initializer if t.name == "lm_head.weight"} == {TensorProto.BFLOAT16}
        onnx.save(graph, str(pkg / "model.onnx"))
        with pytest.raises(BackendUnavailableError, match="MatMul") as info:
            Generator.load(pkg)
    assert "--target onnxruntime" in str(info.value) and "fp32" in str(info.value)


def test_bf16_concat_cache_stays_in_ortvalues_on_the_cuda_code_path(low_packages: dict[tuple[str, str], Path]) -> None:
    """numpy cannot feed bfloat16 to ONNX Runtime (``bind_cpu_input`` raises "Numpy_type 256 can't be
    converted"): the backend keeps a bf16 cache in OrtValues, also the empty past of the first step.
    ``device='cpu'`` runs the code ``device='cuda'`` runs, on the CPU provider."""
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend

    folder = low_packages["bf16", "concat"]
    backend = OnnxRuntimeBackend(folder, read_manifest(folder), device="cpu")
    cache = backend.new_cache(2, 16)
    token = int(np.argmax(backend.forward(cache, [[5, 6, 7], [9]])[0]))
    logits = backend.forward(cache, [[token], [3]])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert {v.data_type() for v in cache.values} == {"tensor(bfloat16)"} and cache.values[0].shape()[2] == 4
    every = backend.forward_all(backend.new_cache(2, 16), [[5, 6, 7, token], [9, 3]])
    np.testing.assert_allclose(every[0][-1], logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(every[1][-1], logits[1], rtol=1e-5, atol=1e-5)
