"""A tiny checkpoint written the way stabilityai/stablelm-3b-4e1t is published (4.38-style config.json,
bf16 safetensors shards with an index, tokenizer.json + tokenizer_config.json + special_tokens_map.json)
is read alike by transformers 5 and stlm, exports, and verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import neox_tokenizer

from stlm.cli import cli
from stlm.export.onnx_export import export_onnx
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import load_model_config
from stlm.testing import Shape, write_random_checkpoint

# Not the defaults (theta 10000, factor 0.25, eps 1e-5): a reader that ignored the 4.38 keys would differ.
SHAPE = Shape(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=172,
    vocab_size=50304,
    rope_theta=5000.0,
    partial_rotary_factor=0.5,
    layer_norm_eps=1e-6,
)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("published") / "ckpt",
        shape=SHAPE,
        tokenizer=neox_tokenizer(),
        seed=3,
        dtype="bf16",
        config_style="4.38",
        max_shard_bytes=4_000_000,
    )


def test_layout_is_the_published_one(published: Path) -> None:
    config = json.loads((published / "config.json").read_text())
    assert config["model_type"] == "stablelm" and config["architectures"] == ["StableLmForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and "rope_parameters" not in config
    assert (config["rope_theta"], config["partial_rotary_factor"]) == (5000.0, 0.5)
    assert not config["use_qkv_bias"] and config["layer_norm_eps"] == 1e-6
    shards = sorted(p.name for p in published.glob("*.safetensors"))
    assert len(shards) > 1 and (published / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (published / name).is_file()
    ckpt = SafetensorsCheckpoint(published)
    assert {ckpt.entries[n].dtype for n in ckpt.names()} == {"BF16"}


def test_transformers_5_and_stlm_read_the_4_38_config_alike(published: Path) -> None:
    import torch
    from transformers import AutoConfig, StableLmForCausalLM

    hf = AutoConfig.from_pretrained(published)
    assert hf.model_type == "stablelm"
    assert hf.rope_parameters["rope_theta"] == 5000.0 and hf.rope_parameters["partial_rotary_factor"] == 0.5
    model = StableLmForCausalLM.from_pretrained(published, dtype=torch.float32, use_safetensors=True)
    assert model.model.layers[0].self_attn.rotary_ndims == 8  # 0.5 of head dim 16
    assert model.model.layers[0].input_layernorm.eps == 1e-6
    cfg = load_model_config(published)
    assert (cfg.rope_theta, cfg.partial_rotary_factor, cfg.rotary_dim, cfg.layer_norm_eps) == (5000.0, 0.5, 8, 1e-6)


@pytest.mark.parametrize("dtype, kv_cache", [("fp32", "inplace"), ("bf16", "concat")])
def test_published_format_exports_and_verifies(published: Path, tmp_path: Path, dtype: str, kv_cache: str) -> None:
    package = export_onnx(published, tmp_path / dtype, dtype=dtype, kv_cache=kv_cache)
    result = CliRunner().invoke(cli, ["verify", str(published), str(package), "--prompts", "3"])
    assert result.exit_code == 0, result.output
    # bf16 weights are exact in fp32 (and in a bf16 package): only the bf16 KV cache rounds anything.
    assert f"tolerance class {dtype}" in result.output


MAKE_CHECKPOINT = """
import json, sys
from stlm.cli import cli
try:
    cli(["-q", "make-checkpoint", sys.argv[1], "--preset", "tiny", "--dtype", "bf16", "--config-style", "4.38",
         "--tokenizer", sys.argv[2]])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))}))
"""


def test_make_checkpoint_needs_no_torch_and_transformers_reads_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch
    from transformers import StableLmForCausalLM

    out = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, "-c", MAKE_CHECKPOINT, str(out), str(neox_tokenizer())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = StableLmForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    assert model.config.hidden_size == 64 and model.config.vocab_size == 50304
    assert float(model.model.layers[0].input_layernorm.bias.detach().abs().max()) > 0  # random LayerNorm biases
