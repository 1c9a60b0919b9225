"""LoRA adapters merged at export, against PEFT's own merge_and_unload (peft is a test dependency only).

Random adapters (r 8, every linear layer and the LM head, rslora on and off, modules_to_save) are
made by PEFT's get_peft_model with lora_B randomly initialised (PEFT starts it at zero, which would
make the merge a no-op) and saved with save_pretrained; the export of base + adapter must give the
logits (fp32 tolerance) and greedy tokens of PEFT's merged model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_checkpoint
from test_export_parity import check_concat_graph, hf_greedy
from test_perplexity import TRAINED, _report, _transformers_ppl, needs_trained

from stlm.cli import cli
from stlm.export.onnx_export import export_onnx
from stlm.manifest import read_manifest
from stlm.runtime import Generator, SamplingParams

peft = pytest.importorskip("peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
SONNETS = TRAINED.parents[1] / "corpora" / "shakespeare-heldout" / "sonnets.txt"
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then", "Hi"]


def _base_model(checkpoint: Path) -> torch.nn.Module:
    from transformers import StableLmForCausalLM

    return StableLmForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def make_adapter(checkpoint: Path, out: Path, *, seed: int = 0, **config: Any) -> Path:
    """A PEFT LoRA adapter of ``checkpoint`` with random A and B, saved by PEFT as safetensors."""
    options: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR, **config}
    torch.manual_seed(seed)
    model = peft.get_peft_model(_base_model(checkpoint), peft.LoraConfig(**options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.05 if "lora_B" in name else 0.02)
    model.save_pretrained(out)
    return out


def peft_merged(checkpoint: Path, adapter: Path, out: Path) -> Path:
    """PEFT's merge_and_unload of ``adapter`` onto ``checkpoint``, saved as a plain checkpoint."""
    model = peft.PeftModel.from_pretrained(_base_model(checkpoint), adapter).merge_and_unload()
    model.save_pretrained(out)
    shutil.copyfile(checkpoint / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("lora") / "base", seed=11)


CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 32},
    "saved-head": {"target_modules": ALL_LINEAR[:-1], "modules_to_save": ["lm_head"]},
    "fan-in-fan-out": {"fan_in_fan_out": True, "target_modules": ["q_proj", "down_proj"]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_export_matches_peft_merge_and_unload(base: Path, tmp_path: Path, case: str) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", seed=len(case), **CASES[case])
    reference = peft_merged(base, adapter, tmp_path / "merged")
    package = export_onnx(base, tmp_path / "pkg", kv_cache="concat", adapter=adapter)
    check_concat_graph(_base_model(reference), package)  # every position's logits within 1e-4
    gen = Generator.load(package)
    ids = [gen.tokenizer.encode(p) for p in PROMPTS]
    want = hf_greedy(reference, ids, 24)
    got = gen.complete(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    eos = gen.eos_token_id
    assert [list(c.token_ids) for c in got] == [w[: w.index(eos)] if eos in w else w for w in want]
    plain = Generator.load(export_onnx(base, tmp_path / "plain", kv_cache="concat"))
    assert plain.complete(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0)) != got  # the adapter matters
    record = read_manifest(package).extra["adapter"]
    assert record["r"] == 8 and record["name"] == "adapter" and len(record["sha256"]) == 64


def test_adapter_dir_with_base_and_quantized_export(base: Path, tmp_path: Path) -> None:
    """`stlm export ADAPTER --base BASE` (CLI) equals BASE --adapter; a quantized merge loads and runs."""
    adapter = make_adapter(base, tmp_path / "adapter", seed=3)
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(adapter), "--base", str(base), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    export_onnx(base, tmp_path / "b", adapter=adapter)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    assert Generator.load(tmp_path / "a").complete(PROMPTS, params) == Generator.load(tmp_path / "b").complete(
        PROMPTS, params
    )
    q = export_onnx(base, tmp_path / "q", adapter=adapter, quantize="int8")
    assert read_manifest(q).extra["adapter"]["sha256"] == read_manifest(tmp_path / "a").extra["adapter"]["sha256"]
    assert len(Generator.load(q).complete(PROMPTS[:1], params)[0].token_ids) > 0


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _bad_adapters(base: Path, tmp: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name → (adapter folder, extra CLI args, a phrase the error must contain)."""
    good = make_adapter(base, tmp / "good", target_modules=["q_proj"])
    cases: dict[str, tuple[Path, list[str], str]] = {}

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp / name))

    _edit_config(dora := copy("dora"), use_dora=True)
    cases["dora"] = (dora, [], "use_dora")
    _edit_config(ia3 := copy("ia3"), peft_type="IA3")
    cases["ia3"] = (ia3, [], "LoRA adapters only")
    _edit_config(unknown := copy("unknown"), target_modules=["q_proj", "rotary_emb"])
    cases["unknown-target"] = (unknown, [], "rotary_emb")
    _edit_config(rank := copy("rank"), r=4)
    cases["shape"] = (rank, [], "do not fit")
    pickled = copy("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases["bin"] = (pickled, [], "safe_serialization=True")
    cases["no-base"] = (good, [], "--base")
    return cases


def test_bad_adapters_exit_2_with_the_fix(base: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for name, (adapter, _, phrase) in _bad_adapters(base, tmp_path).items():
        args = ["export", str(adapter), "-o", str(tmp_path / f"out-{name}")]
        if name != "no-base":
            args = ["export", str(base), "--adapter", str(adapter), "-o", str(tmp_path / f"out-{name}")]
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (name, result.output)
        assert "error:" in result.output and phrase in result.output, (name, result.output)
        assert "Traceback" not in result.output and not (tmp_path / f"out-{name}").exists()


def test_base_model_mismatch_is_warned(base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["v_proj"])
    _edit_config(adapter, base_model_name_or_path="someone/other-model")
    with caplog.at_level("WARNING"):
        export_onnx(base, tmp_path / "pkg", adapter=adapter)
    assert "someone/other-model" in caplog.text
    assert np.isfinite(read_manifest(tmp_path / "pkg").extra["adapter"]["scale"])


def _train_adapter(checkpoint: Path, text: str, out: Path, steps: int = 12) -> Path:
    """A LoRA adapter (r 8, attention and MLP) trained by PEFT for ``steps`` steps on ``text``."""
    import tokenizers

    tokens = tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text).ids
    ctx = 64
    batch = torch.tensor([tokens[i * ctx : (i + 1) * ctx] for i in range(len(tokens) // ctx)])
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR[:-1], use_rslora=True)
    model = peft.get_peft_model(_base_model(checkpoint), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        rows = batch[torch.randint(0, len(batch), (8,))]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.mark.shared
@needs_trained
def test_trained_adapter_lowers_heldout_perplexity_as_peft_says(tmp_path: Path) -> None:
    """Trained on the first half of the (held-out) sonnets, evaluated on the second: the merged package's
    perplexity equals transformers + PEFT's merged model's, and is below the base's."""
    text = SONNETS.read_text(encoding="utf-8")
    half = len(text) // 2
    adapter = _train_adapter(TRAINED, text[:half], tmp_path / "adapter")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(text[half:], encoding="utf-8")
    reference = peft_merged(TRAINED, adapter, tmp_path / "merged")
    peft_ppl, scored = _transformers_ppl(reference, heldout, 64, 8)
    base_ppl, _ = _transformers_ppl(TRAINED, heldout, 64, 8)
    package = export_onnx(TRAINED, tmp_path / "pkg", adapter=adapter)
    report = _report(str(package), str(heldout), "--ctx", "64", "--chunks", "8")
    assert report["scored"] == scored
    assert report["ppl"]["value"] == pytest.approx(peft_ppl, rel=1e-3)
    print(f"held-out ppl: base {base_ppl:.3f}, PEFT merged {peft_ppl:.3f}, stlm package {report['ppl']['value']:.3f}")
    assert peft_ppl < 0.95 * base_ppl, (peft_ppl, base_ppl)
