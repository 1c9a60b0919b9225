"""The ONNX package against transformers on the same weights: logits, KV cache, greedy tokens.

Shapes: head dim 16 (rotary 4), 64 (rotary 16) and StableLM-3B's own head, 80 with rotary 20 (where
ONNX Runtime's fused rotary needs the padded, permuted layout), in every graph form: concat with
plain ONNX rotary, in place (GroupQueryAttention's fused rotary), the TensorRT target's plugin
(run in ONNX Runtime by the test op) and native (ONNX RotaryEmbedding) rotary."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import build_checkpoint

from stlm.export.onnx_export import export_onnx
from stlm.package.manifest import read_manifest
from stlm.runtime import Generator, SamplingParams
from stlm.testing import Shape

ATOL = 1e-4


@functools.lru_cache(maxsize=4)
def hf_model(checkpoint: Path) -> torch.nn.Module:
    from transformers import StableLmForCausalLM

    return StableLmForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_step(
    model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray] | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers forward with a flat past list; returns logits and the flat present list."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if past:
        cache = DynamicCache(
            ddp_cache_data=[(torch.from_numpy(past[i]), torch.from_numpy(past[i + 1])) for i in range(0, len(past), 2)],
            config=model.config,
        )
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            cache=cache,
            use_cache=True,
        )
    presents = []
    for layer in out.cache.layers:
        presents += [layer.keys.numpy(), layer.values.numpy()]
    return out.logits.numpy(), presents


HD80 = Shape(hidden_size=160, num_layers=2, num_heads=2, intermediate_size=432, vocab_size=50304)


@pytest.fixture(scope="module")
def hd80(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The head-dim-80 / rotary-20 checkpoint and its packages in every graph form."""
    base = tmp_path_factory.mktemp("hd80")
    ckpt = build_checkpoint(base / "checkpoint", HD80, seed=5)
    forms: dict[str, dict[str, str]] = {
        "plain": {"kv_cache": "concat"},
        "inplace": {},
        "plugin": {"rotary": "plugin"},
        "native": {"rotary": "native"},
    }
    return {"checkpoint": ckpt, **{k: export_onnx(ckpt, base / k, **kw) for k, kw in forms.items()}}


def ort_session(package: Path) -> tuple[ort.InferenceSession, list[str], list[str]]:
    manifest = read_manifest(package)
    if manifest.variant.rotary == "plugin":
        import onnx

        from stlm.plugins.partial_rotary.ort_op import ort_session_options_with_plugin_op, to_ort_extensions_model

        model = to_ort_extensions_model(onnx.load(str(package / manifest.graph)))
        session = ort.InferenceSession(
            model.SerializeToString(), ort_session_options_with_plugin_op(), providers=["CPUExecutionProvider"]
        )
    else:
        session = ort.InferenceSession(str(package / manifest.graph), providers=["CPUExecutionProvider"])
    return session, [s.name for s in manifest.contract.inputs], [s.name for s in manifest.contract.outputs]


def check_concat_graph(model: torch.nn.Module, package: Path) -> None:
    """Prefill (row 1 left-padded) then 8 decode steps feeding present → past: every position's logits
    and every valid KV entry equal transformers'."""
    session, in_names, out_names = ort_session(package)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rng = np.random.default_rng(1)
    batch, seq = 2, 11
    ids = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1, :4] = 0  # left padding on row 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    past = [np.zeros((batch, cfg.num_key_value_heads, 0, head_dim), np.float32)] * (2 * cfg.num_hidden_layers)
    ref_past = None
    for step in range(9):
        every = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        outs = session.run(out_names, dict(zip(in_names, [ids, mask, pos, every, *past], strict=True)))
        ref_logits, ref_present = hf_step(model, ids, mask, pos, ref_past)
        rows = mask.astype(bool)[:, -ids.shape[1] :]
        assert np.abs(outs[0] - ref_logits)[rows].max() <= ATOL, f"step {step}: logits differ"
        for got, want in zip(outs[1:], ref_present, strict=True):
            assert got.shape == want.shape
            keep = mask.astype(bool)  # padded positions hold garbage in both: compare real ones
            assert np.abs(got - want).transpose(0, 2, 1, 3)[keep].max() <= ATOL, f"step {step}: KV differs"
        past, ref_past = outs[1:], ref_present
        ids = outs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1


@pytest.mark.parametrize("shape", ["hd16", "hd64"])
def test_prefill_and_decode_match_transformers(
    shape: str, checkpoints: dict[str, Path], packages: dict[str, Path]
) -> None:
    check_concat_graph(hf_model(checkpoints[shape]), packages[shape])


@pytest.mark.parametrize("form", ["plain", "plugin", "native"])
def test_head_dim_80_rotary_20_concat_graphs_match_transformers(hd80: dict[str, Path], form: str) -> None:
    if form == "plugin":
        pytest.importorskip("onnxruntime_extensions")
    assert read_manifest(hd80[form]).model.rotary_dim == 20
    check_concat_graph(hf_model(hd80["checkpoint"]), hd80[form])


def test_head_dim_80_rotary_20_inplace_graph_matches_transformers(hd80: dict[str, Path]) -> None:
    check_inplace_steps(hf_model(hd80["checkpoint"]), hd80["inplace"])


def hf_greedy(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = hf_model(checkpoint)
    longest = max(map(len, prompts))
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p) :] = torch.tensor(p)
        mask[b, longest - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return [row[longest:].tolist() for row in out]


@pytest.mark.parametrize("variant", ["", "-inplace"])
@pytest.mark.parametrize("shape", ["hd16", "hd64"])
def test_greedy_tokens_match_transformers_generate(
    shape: str, variant: str, checkpoints: dict[str, Path], packages: dict[str, Path]
) -> None:
    gen = Generator.load(packages[shape + variant])
    prompts = ["The quick brown fox jumps over the lazy dog, and then", "Hi"]
    ids = [gen.tokenizer.encode(p) for p in prompts]
    want_one = hf_greedy(checkpoints[shape], ids[:1], 32)
    want_two = hf_greedy(checkpoints[shape], ids, 32)
    params = SamplingParams(max_new_tokens=32, temperature=0)
    eos = gen.eos_token_id

    def until_eos(tokens: list[int]) -> list[int]:
        return tokens[: tokens.index(eos)] if eos in tokens else tokens

    got_one = gen.complete(prompts[:1], params)
    assert list(got_one[0].token_ids) == until_eos(want_one[0])
    got_two = gen.complete(prompts, params)
    assert [list(c.token_ids) for c in got_two] == [until_eos(w) for w in want_two]
    assert all(len(c.token_ids) == 32 or c.finish_reason == "eos" for c in got_two)


@pytest.mark.parametrize("shape", ["hd16", "hd64"])
def test_inplace_cache_matches_transformers_step_by_step(
    shape: str, checkpoints: dict[str, Path], packages: dict[str, Path]
) -> None:
    check_inplace_steps(hf_model(checkpoints[shape]), packages[f"{shape}-inplace"])


def check_inplace_steps(model: torch.nn.Module, package: Path) -> None:
    """The in-place variant: rows of different lengths, prefill in uneven chunks (every position's
    logits checked), then decode steps with one row idle; buffers are never reallocated."""
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(package, read_manifest(package))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (9, 4)]
    cache = backend.new_cache(2, 32)
    buffers = [id(b) for b in cache.buffers]
    seqs: list[list[int]] = [[], []]

    def check(every: list[np.ndarray], feed: list[list[int]]) -> None:
        for b, new in enumerate(feed):
            assert every[b].shape == (len(new), model.config.vocab_size)
            if new:
                with torch.no_grad():
                    want = model(input_ids=torch.tensor([seqs[b]])).logits[0, -len(new) :].numpy()
                assert np.abs(every[b] - want).max() <= ATOL

    for chunk in ([prompts[0][:3], prompts[1][:1]], [prompts[0][3:4], prompts[1][1:4]], [prompts[0][4:], []]):
        for b in range(2):
            seqs[b] += chunk[b]
        check(backend.forward_all(cache, chunk), chunk)
    assert cache.lengths.tolist() == [9, 4]
    for step in range(8):
        feed = [[int(rng.integers(0, 50000))], [] if step % 3 == 1 else [int(rng.integers(0, 50000))]]
        for b in range(2):
            seqs[b] += feed[b]
        last = backend.forward(cache, feed)
        check([last[b : b + 1 if feed[b] else b] for b in range(2)], feed)
    assert [id(b) for b in cache.buffers] == buffers
