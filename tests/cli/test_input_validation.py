"""Validate before writing, every malformed input an StlmError (issue #11): config fields, weights
against config, tokenizer against the embedding, safetensors headers, index files, tampered or
unconfined manifests, stdin, output paths and resource bounds."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_checkpoint
from test_errors import assert_user_error

from stlm.cli import cli
from stlm.errors import CheckpointError, InvalidArgumentError, PackageError, StlmError
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import model_config_from_hf
from stlm.package.manifest import read_manifest
from stlm.testing import Shape


@pytest.fixture
def ckpt(tmp_path: Path, checkpoint: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


@pytest.fixture
def pkg(tmp_path: Path, package: Path) -> Path:
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _export_refused(ckpt: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out"
    assert_user_error(["export", str(ckpt), "-o", str(out)], *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("num_hidden_layers", 0, "num_layers is 0"),
        ("num_attention_heads", 0, "num_attention_heads is 0"),
        ("num_key_value_heads", 3, "num_heads 4 is not a multiple of num_kv_heads 3"),
        ("max_position_embeddings", 0, "max_position_embeddings is 0"),
        ("layer_norm_eps", float("nan"), "layer_norm_eps is nan"),
        ("rope_theta", -1.0, "rope_theta is -1.0"),
        ("hidden_size", "abc", "hidden_size is 'abc'"),
        ("vocab_size", [1, 2, 3], "vocab_size is [1, 2, 3]"),
        ("use_qkv_bias", "no", "use_qkv_bias is 'no'"),
        ("eos_token_id", 10**9, "eos_token_id is 1000000000"),
        ("rope_parameters", [1], "rope_parameters is list"),
    ],
)
def test_bad_config_fields_are_named(field: str, value: Any, needle: str, ckpt: Path, tmp_path: Path) -> None:
    config = ckpt / "config.json"
    data = json.loads(config.read_text())
    data[field] = value
    data.get("rope_parameters", {}).pop("rope_theta", None) if field == "rope_theta" else None
    config.write_text(json.dumps(data))
    _export_refused(ckpt, tmp_path, needle, "fix:")


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2, 3]", b'{"hidden_size": \xff}', b"[" * 100_000 + b"]" * 100_000, b"", b"null"],
    ids=["list", "utf8", "deep", "empty", "null"],
)
def test_unreadable_config_json(raw: bytes, ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").write_bytes(raw)
    _export_refused(ckpt, tmp_path, "config.json")


@pytest.mark.parametrize(
    ("field", "value", "tensor"),
    [
        ("num_hidden_layers", 1, "decoder layer 1"),
        ("num_hidden_layers", 3, "model.layers.2"),
        ("num_key_value_heads", 2, "k_proj"),
        ("intermediate_size", 128, "gate_proj"),
        ("vocab_size", 60000, "embed_tokens"),
    ],
)
def test_config_that_disagrees_with_the_weights(
    field: str, value: int, tensor: str, ckpt: Path, tmp_path: Path
) -> None:
    _edit_json(ckpt / "config.json", **{field: value})
    _export_refused(ckpt, tmp_path, tensor, "fix:")


def _rewrite_header(path: Path, edit: Any) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    new = json.dumps(edit(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + size :])


def test_transposed_embedding(ckpt: Path, tmp_path: Path) -> None:
    def transpose(header: dict[str, Any]) -> dict[str, Any]:
        header["model.embed_tokens.weight"]["shape"].reverse()
        return header

    _rewrite_header(ckpt / "model.safetensors", transpose)
    _export_refused(ckpt, tmp_path, "model.embed_tokens.weight", "[64, 50304]", "[50304, 64]")


def _set_entry(name: str, **record: Any) -> Any:
    def edit(header: dict[str, Any]) -> dict[str, Any]:
        header[name].update(record)
        return header

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: list(h), "header is list"),
        (_set_entry("model.norm.bias", data_offsets=None), "data_offsets"),
        (_set_entry("model.norm.bias", shape=[2**40, 2**40]), "shape"),
        (_set_entry("model.norm.bias", shape=[2**20, 2**20, 2**20]), "does not fill"),
        (_set_entry("model.norm.bias", data_offsets=[0, 2**50]), "spans bytes"),
        (_set_entry("model.norm.bias", dtype=7), "dtype 7"),
        (_set_entry("model.norm.bias", dtype="I64"), "stored as I64"),
    ],
)
def test_malformed_safetensors_header(edit: Any, needle: str, ckpt: Path, tmp_path: Path) -> None:
    _rewrite_header(ckpt / "model.safetensors", edit)
    _export_refused(ckpt, tmp_path, needle)


@pytest.mark.parametrize(
    ("index", "needle"),
    [
        (b"garbage", "not readable JSON"),
        (b'{"weight_map": [1]}', "weight_map"),
        (b'{"weight_map": {"a": 3}}', "weight_map"),
        (b'{"weight_map": {"a": "../outside.safetensors"}}', "not a file name inside"),
        (b'{"weight_map": {"a": "/etc/passwd"}}', "not a file name inside"),
    ],
)
def test_malformed_index(index: bytes, needle: str, ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(CheckpointError, match=needle):
        SafetensorsCheckpoint(ckpt)


def test_tokenizer_larger_than_the_embedding(tmp_path: Path) -> None:
    small = Shape(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=32, vocab_size=1024)
    ckpt = build_checkpoint(tmp_path / "ckpt", small)
    _export_refused(ckpt, tmp_path, "token id 50280", "1024 rows")


def test_garbage_tokenizer(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "tokenizer.json").write_text('{"model": 3}')
    _export_refused(ckpt, tmp_path, "not a valid tokenizer.json")


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("model", "num_kv_heads"), "4", "num_kv_heads is '4'"),
        (("model", "head_dim"), 17, "head_dim"),
        (("model", "layer_norm_eps"), -1, "layer_norm_eps"),
        (("generation", "eos_token_id"), "0", "generation.eos_token_id"),
        (("graph",), 3, "file name is int"),
        (("graph",), "/etc/passwd", "not inside the package"),
        (("tokenizer",), "../tokenizer.json", "not inside the package"),
        (("chat_template",), "../../x.jinja", "not inside the package"),
        (("model",), [1], "model record is list"),
    ],
)
def test_tampered_manifest(path: tuple[str, ...], value: Any, needle: str, pkg: Path) -> None:
    data = json.loads((pkg / "stlm.json").read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (pkg / "stlm.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match=needle):
        read_manifest(pkg)
    assert_user_error(["generate", str(pkg), "-p", "hi", "-n", "1"], "stlm.json")


def test_symlink_out_of_the_package(pkg: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    shutil.move(pkg / "tokenizer.json", outside)
    (pkg / "tokenizer.json").symlink_to(outside)
    with pytest.raises(PackageError, match="leads out of the package"):
        read_manifest(pkg)


def test_stdin_not_utf8(package: Path) -> None:
    result = CliRunner().invoke(cli, ["generate", str(package), "-p", "-", "-n", "1"], input=b"hi \xff")
    assert result.exit_code == 2 and "error: stdin is not UTF-8" in result.stderr, result.output


def test_save_reference_unwritable_is_refused_before_the_run(package: Path, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("mine")
    assert_user_error(["verify", str(tmp_path / "missing-ref.json"), str(package), "--save-reference", str(note)])
    assert note.read_text() == "mine"
    assert_user_error(["verify", "x", str(package), "--save-reference", str(note / "ref.json")], "not a folder")
    assert_user_error(["verify", "x", str(package), "--save-reference", str(tmp_path)], "is a folder")


def test_resource_bounds(package: Path) -> None:
    from stlm.runtime import Generator

    assert_user_error(["bench", str(package), "--batch", "100000"], "--batch")
    with pytest.raises(InvalidArgumentError, match="threads=10000"):
        Generator.load(package, threads=10000)


def test_library_inputs_are_stlm_errors(package: Path) -> None:
    from stlm.runtime import Generator

    gen = Generator.load(package)
    for call in (
        lambda: gen.generate("hi", params={"max_new_tokens": 1}),  # type: ignore[arg-type]
        lambda: gen.tokenizer.decode([10**12]),
        lambda: gen.generate("\ud800", max_new_tokens=1),
        lambda: gen.tokenizer.decode(np.array([2**40])),
    ):
        with pytest.raises(StlmError):
            call()


def test_config_from_hf_accepts_the_published_fields() -> None:
    cfg = model_config_from_hf(
        {
            "model_type": "stablelm",
            "vocab_size": 50304,
            "hidden_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "intermediate_size": 6912,
            "rope_theta": 10000,
            "partial_rotary_factor": 0.25,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
    )
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (80, 20, 10000.0)


def test_bench_refuses_what_memory_cannot_hold(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stlm.runtime.bench as bench

    monkeypatch.setattr(bench, "host_memory_available", lambda: 50_000_000)  # a machine with 50 MB left
    with pytest.raises(InvalidArgumentError, match=r"--batch 64 .* needs about .* GB") as info:
        bench.run_benchmark(package, batch=64, prompt_len=2048, gen_len=64)
    assert "fix: pass a shorter --prompt-len" in str(info.value)
    with pytest.raises(InvalidArgumentError, match=r"fix: pass --batch ≤ \d+"):
        bench.run_benchmark(package, batch=64, prompt_len=128, gen_len=64)
