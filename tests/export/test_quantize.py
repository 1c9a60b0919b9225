"""Weight-only MatMulNBits quantization: the packing ONNX Runtime reads, and model quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from stlm.errors import InvalidArgumentError
from stlm.export.onnx_export import export_onnx
from stlm.export.quantize import (
    PRESETS,
    Quantization,
    dequantize,
    parse_quantization,
    quantize_hqq,
    quantize_mse,
    quantize_rtn,
    quantize_weight,
    unpack,
)
from stlm.package.manifest import read_manifest
from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend


def _reference_rtn(weight: np.ndarray, bits: int, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An independent asymmetric round-to-nearest (stlm's hand-written quantizer before ONNX Runtime's):
    integers (N, K), scales (N, blocks), zero points (N, blocks)."""
    n, k = weight.shape
    blocks = -(-k // block)
    w = np.zeros((n, blocks * block), np.float32)
    w[:, :k] = weight
    w = w.reshape(n, blocks, block)
    qmax = (1 << bits) - 1
    lo, hi = np.minimum(w.min(axis=2), 0.0), np.maximum(w.max(axis=2), 0.0)
    scale = (hi - lo) / qmax
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, qmax)
    return q.reshape(n, -1)[:, :k], scale, zero


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 100, 256])  # 100: K not a multiple of the block size
def test_onnxruntime_rtn_matches_the_reference_quantizer(bits: int, k: int) -> None:
    """ONNX Runtime's quantizer = the hand-written one: identical scales and zero points; identical integers at 4
    bits; at 8 bits a value may differ by one level where w/scale sits within float rounding of a .5 tie."""
    w = np.random.default_rng(k).standard_t(3, (96, k)).astype(np.float32) * 0.02
    q = quantize_rtn(w, bits)
    want_q, want_scale, want_zero = _reference_rtn(w, bits)
    blocks = want_scale.shape[1]
    assert q.zero_points is not None
    np.testing.assert_array_equal(q.scales.reshape(96, blocks), want_scale.astype(np.float32))
    np.testing.assert_array_equal(unpack(q.zero_points, bits, blocks), want_zero)
    got_q = unpack(q.packed, bits, q.block_size).reshape(96, -1)[:, :k].astype(int)
    diff = np.abs(got_q - want_q)
    assert diff.max() <= (0 if bits == 4 else 1) and np.mean(diff > 0) < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method, symmetric", [("rtn", False), ("rtn", True), ("mse", False), ("hqq", False)])
def test_round_trip_error_is_within_one_step(bits: int, method: str, symmetric: bool) -> None:
    w = np.random.default_rng(0).normal(0, 0.02, (48, 100)).astype(np.float32)
    q = quantize_weight(w, bits, method=method, symmetric=symmetric)
    step = np.abs(np.repeat(q.scales.reshape(48, -1), q.block_size, axis=1)[:, :100])
    # rtn: half a step (symmetric: the grid -8..7 steps clips the far side by up to one step; MLAS
    # gives a signed scale); mse and hqq trade a few clipped values for a smaller total error.
    bound = {("rtn", False): 0.5, ("rtn", True): 1.0}.get((method, symmetric), 4.0)
    assert np.all(np.abs(dequantize(q) - w) <= step * bound + 1e-7)


def test_hqq_and_mse_beat_round_to_nearest_on_their_own_objectives() -> None:
    w = np.random.default_rng(3).standard_t(3, (128, 256)).astype(np.float32) * 0.02
    rtn, hqq, mse = quantize_rtn(w, 4), quantize_hqq(w, 4), quantize_mse(w, 4)

    def lp(q: object) -> float:
        return float(np.sum(np.abs(dequantize(q) - w) ** 0.7))  # type: ignore[arg-type]

    def sq(q: object) -> float:
        return float(np.sum((dequantize(q) - w) ** 2))  # type: ignore[arg-type]

    assert lp(hqq) < 0.97 * lp(rtn)
    assert sq(mse) < 0.98 * sq(rtn)
    per_block = [np.square(dequantize(q) - w).reshape(128, -1, 32).sum(axis=-1) for q in (mse, rtn)]
    assert np.all(per_block[0] <= per_block[1] * (1 + 1e-5))  # min/max (rtn's grid) is one of mse's candidates
    assert hqq.zero_points is not None and hqq.zero_points.dtype == np.float32  # HQQ's float zero points
    rtn8 = quantize_rtn(w, 8)  # 8-bit parts of an hqq quantization: rtn (no float zero points at 8 bits)
    assert np.array_equal(dequantize(quantize_weight(w, 8, method="hqq")), dequantize(rtn8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method, symmetric", [("rtn", False), ("rtn", True), ("mse", False), ("hqq", False)])
def test_onnxruntime_reads_our_packing(bits: int, method: str, symmetric: bool) -> None:
    """A MatMulNBits node on each method's arrays computes x @ dequantize(q).T (fp32 compute)."""
    rng = np.random.default_rng(1)
    n, k = 40, 96
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    q = quantize_weight(w, bits, method=method, symmetric=symmetric)
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zp"))
    node = helper.make_node(
        "MatMulNBits",
        ["x", *(i.name for i in inits)],
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


def test_quantize_specs() -> None:
    assert parse_quantization("int8") == PRESETS["int8"] and parse_quantization("int8").bits == 8
    assert parse_quantization("int4-rtn:block=64,head=4,edge=8,acc=0") == Quantization(
        bits=4, block_size=64, lm_head_bits=4, edge_bits=8, accuracy_level=0
    )
    assert parse_quantization("int4-rtn:sym=1").symmetric
    edge = parse_quantization("int4:edge=8")
    assert [edge.for_layer(i, 4).bits for i in range(4)] == [8, 4, 4, 8] and edge.for_lm_head().bits == 8
    for bad in (
        "int3",
        "int4:block=48",
        "int4:block=512",
        "int4:head=2",
        "int4:nope=1",
        "int4:method=gptq",
        "int4-hqq:sym=1",
        "int4:acc",
    ):
        with pytest.raises(InvalidArgumentError):
            parse_quantization(bad)


def _teacher_forced_logits(package: Path, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    backend = OnnxRuntimeBackend(package, read_manifest(package))
    cache = backend.new_cache(1, len(prompt) + len(tokens) + 1)
    out = [backend.forward(cache, [prompt])[0]]
    out += [backend.forward(cache, [[t]])[0] for t in tokens]
    return out


@pytest.fixture(scope="module")
def quantized(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("quantized")
    return {q: export_onnx(checkpoint, base / q, quantize=q) for q in ("int8", "int4", "int4-rtn")}


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
    size = {name: (folder / "model.onnx").stat().st_size for name, folder in quantized.items()}
    # The default int4 keeps the first and last layer at 8 bits: all of this 2-layer model.
    assert size["int4-rtn"] < size["int8"] < fp32 and size["int4"] <= size["int8"]
    gen = Generator.load(quantized["int4-rtn"])
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
