"""Weight-only MatMulNBits quantization: the packing ONNX Runtime reads, and model quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from stlm.export.onnx_export import export_onnx
from stlm.export.quantize import dequantize, quantize_blockwise
from stlm.manifest import read_manifest
from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 100])  # 100: K not a multiple of the block size
def test_round_trip_error_is_within_half_a_step(bits: int, k: int) -> None:
    w = np.random.default_rng(0).normal(0, 0.02, (48, k)).astype(np.float32)
    q = quantize_blockwise(w, bits)
    blocks = q.packed.shape[1]
    step = np.repeat(q.scales.reshape(48, blocks), q.block_size, axis=1)[:, :k]
    assert np.all(np.abs(dequantize(q) - w) <= step / 2 + 1e-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_onnxruntime_reads_our_packing(bits: int) -> None:
    """A MatMulNBits node on our packed weight computes x @ dequantize(q).T (fp32 compute)."""
    rng = np.random.default_rng(1)
    n, k = 40, 96
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    q = quantize_blockwise(w, bits)
    inits = [
        numpy_helper.from_array(q.packed, "B"),
        numpy_helper.from_array(q.scales, "scales"),
        numpy_helper.from_array(q.zero_points, "zp"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "scales", "zp"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=q.block_size,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize(q).T, atol=1e-4)


def _teacher_forced_logits(package: Path, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    backend = OnnxRuntimeBackend(package, read_manifest(package))
    cache = backend.new_cache(1, len(prompt) + len(tokens) + 1)
    out = [backend.forward(cache, [prompt])[0]]
    out += [backend.forward(cache, [[t]])[0] for t in tokens]
    return out


@pytest.fixture(scope="module")
def quantized(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("quantized")
    return {q: export_onnx(checkpoint, base / q, quantize=q) for q in ("int8", "int4")}


@pytest.mark.parametrize("quant, min_agreement, min_cosine", [("int8", 0.9, 0.999), ("int4", 0.75, 0.99)])
def test_quantized_tiny_model_tracks_fp32(
    quant: str, min_agreement: float, min_cosine: float, quantized: dict[str, Path], packages: dict[str, Path]
) -> None:
    """Top-1 agreement over 64 positions (teacher-forced on the fp32 greedy tokens) and logit cosine."""
    reference = packages["hd16-inplace"]
    prompt = np.random.default_rng(2).integers(0, 50000, 8).tolist()
    ref_backend = OnnxRuntimeBackend(reference, read_manifest(reference))
    cache = ref_backend.new_cache(1, 80)
    logits, tokens = ref_backend.forward(cache, [prompt])[0], []
    for _ in range(63):
        tokens.append(int(logits.argmax()))
        logits = ref_backend.forward(cache, [[tokens[-1]]])[0]
    want = _teacher_forced_logits(reference, prompt, tokens)
    got = _teacher_forced_logits(quantized[quant], prompt, tokens)
    agreement = np.mean([g.argmax() == w.argmax() for g, w in zip(got, want, strict=True)])
    cosine = np.mean([g @ w / np.linalg.norm(g) / np.linalg.norm(w) for g, w in zip(got, want, strict=True)])
    assert agreement >= min_agreement and cosine >= min_cosine, (agreement, cosine)
    manifest = read_manifest(quantized[quant])
    assert manifest.variant.quantization is not None
    assert manifest.variant.quantization.bits == {"int8": 8, "int4": 4}[quant]


def test_quantized_package_is_smaller_and_generates(quantized: dict[str, Path], packages: dict[str, Path]) -> None:
    from stlm.runtime import Generator

    fp32 = (packages["hd16-inplace"] / "model.onnx").stat().st_size
    assert (quantized["int4"] / "model.onnx").stat().st_size < (quantized["int8"] / "model.onnx").stat().st_size < fp32
    gen = Generator.load(quantized["int4"])
    completion = gen.complete(["The quick brown fox jumps over"], max_new_tokens=6, temperature=0)[0]
    prompt = gen.encode_prompt("The quick brown fox jumps over")
    logits = gen.logits([prompt + list(completion.token_ids)])[0]
    greedy = logits[len(prompt) - 1 : -1].argmax(axis=-1)  # the int4 graph's own choices, teacher-forced
    assert list(completion.token_ids) == greedy.tolist() and completion.text == gen.tokenizer.decode(greedy.tolist())


def test_bench_json_fields(package: Path) -> None:
    import json

    from click.testing import CliRunner

    from stlm.cli import cli

    result = CliRunner().invoke(
        cli,
        ["-q", "bench", str(package), "--prompt-len", "8", "--gen-len", "4", "--runs", "1", "--warmup", "0", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in (
        "ttft_ms",
        "prefill_tok_s",
        "decode_tok_s",
        "token_ms_p50",
        "token_ms_p90",
        "token_ms_p99",
        "peak_rss_mb",
    ):
        assert data[key] > 0, key
    assert data["backend"] == "onnxruntime" and data["batch"] == 1 and data["variant"]["kv_cache"] == "concat"
    assert data["variant"]["logits"] == "logits_index"
