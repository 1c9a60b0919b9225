"""Fuzz the parsers of everything a user hands stlm (issue #11): config.json fields, safetensors
headers, model.safetensors.index.json and stlm.json. The property: a value is accepted, or it is
refused with an StlmError that has a message; never another exception, never a half-written folder."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_errors import run_cli

from stlm.errors import CheckpointError, PackageError, StlmError
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.config import ModelConfig, model_config_from_hf
from stlm.package.manifest import read_manifest

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CONFIG: dict[str, Any] = {
    "architectures": ["StableLmForCausalLM"],
    "model_type": "stablelm",
    "vocab_size": 50304,
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "use_qkv_bias": False,
    "use_parallel_residual": False,
    "qk_layernorm": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, 4, 7, 16, 64, 172, 50303, 50304, 2**31, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(
    st.dictionaries(st.sampled_from([*CONFIG, "head_dim", "rope_theta", "partial_rotary_factor"]), values, max_size=4)
)
def test_config_fields(changes: dict[str, Any]) -> None:
    hf = {**CONFIG, **changes}
    try:
        cfg = model_config_from_hf(hf)
    except StlmError as exc:
        assert str(exc).strip()
        return
    assert isinstance(cfg, ModelConfig)
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size and cfg.num_layers >= 1
    assert math.isfinite(cfg.layer_norm_eps) and cfg.rope_theta > 0 and cfg.max_position_embeddings >= 1


@FUZZ
@given(values)
def test_config_of_any_json(data: Any) -> None:
    try:
        model_config_from_hf(data)
    except StlmError as exc:
        assert str(exc).strip()


def _safetensors(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


records = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X"]) | values,
        "shape": st.lists(st.integers(min_value=-2, max_value=2**62), max_size=4) | values,
        "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**62), min_size=0, max_size=3) | values,
    },
)
headers = st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), records | values, max_size=3) | values


@FUZZ
@given(headers, st.binary(max_size=64), st.booleans())
def test_safetensors_headers(tmp_path: Path, header: Any, data: bytes, small_header: bool) -> None:
    folder = tmp_path / "st"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    blob = _safetensors(header, data)
    if small_header:  # a header size that lies
        blob = struct.pack("<Q", len(blob) * 3) + blob[8:]
    (folder / "model.safetensors").write_bytes(blob)
    try:
        ckpt = SafetensorsCheckpoint(folder)
        for name in list(ckpt.names()):
            ckpt.read(name)
    except CheckpointError as exc:
        assert str(exc).strip()


@FUZZ
@given(
    values | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), values | st.text(max_size=12))})
)
def test_index_files(tmp_path: Path, index: Any) -> None:
    folder = tmp_path / "ix"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        SafetensorsCheckpoint(folder)
    except CheckpointError as exc:
        assert str(exc).strip()


FILE_KEYS = [("graph",), ("tokenizer",), ("chat_template",), ("tokenizer_config",)]
BAD_NAMES = ["../x", "/etc/passwd", "model.onnx", "", ".", "..", "sub/../../x", "stlm.json", None, 3, ["a"]]


def _leaves(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(data, dict):
        return [path] + [leaf for k, v in data.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(data, list):
        return [path] + [leaf for i, v in enumerate(data) for leaf in _leaves(v, (*path, i))]
    return [path]


@pytest.fixture(scope="module")
def fuzz_package(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(package, tmp_path_factory.mktemp("fuzz") / "pkg"))


@FUZZ
@given(st.data())
def test_manifests(fuzz_package: Path, data: st.DataObject) -> None:
    manifest = (
        json.loads((fuzz_package / "stlm.json.orig").read_text())
        if (fuzz_package / "stlm.json.orig").exists()
        else None
    )
    if manifest is None:
        shutil.copyfile(fuzz_package / "stlm.json", fuzz_package / "stlm.json.orig")
        manifest = json.loads((fuzz_package / "stlm.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        named = [p for p in _leaves(manifest) if p in FILE_KEYS or (len(p) == 2 and p[0] in ("model", "generation"))]
        path = data.draw(st.sampled_from(named) | st.sampled_from(_leaves(manifest)))
        if not path:
            manifest = data.draw(values)
            break
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = data.draw(st.sampled_from(BAD_NAMES) if path in FILE_KEYS else values)
    (fuzz_package / "stlm.json").write_text(json.dumps(manifest))
    try:
        loaded = read_manifest(fuzz_package)
    except PackageError as exc:
        assert str(exc).strip()
        return
    root = fuzz_package.resolve()
    for name in (loaded.graph, loaded.tokenizer, loaded.chat_template, loaded.tokenizer_config):
        assert name is None or root in (fuzz_package / name).resolve().parents
    for field in dataclasses.fields(ModelConfig):
        value = getattr(loaded.model, field.name)
        assert (type(value) is bool) == (field.type == "bool"), field.name
        assert isinstance(value, int if field.type == "int" else (int, float)), field.name


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(CONFIG)), values, min_size=1, max_size=2))
def test_export_of_a_fuzzed_config(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, changes: dict[str, Any]
) -> None:
    """End to end: exit 0 with a package that loads, or exit 2 with nothing written."""
    base = tmp_path_factory.mktemp("fx")
    ckpt = Path(shutil.copytree(checkpoint, base / "ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **changes}))
    code, output = run_cli("export", str(ckpt), "-o", str(base / "out"))
    assert code in (0, 2), output
    assert "Traceback" not in output
    if code == 0:
        read_manifest(base / "out")
    else:
        assert "error: " in output
        assert sorted(p.name for p in base.iterdir()) == ["ckpt"]
    shutil.rmtree(base)


@FUZZ
@given(st.data())
def test_verify_reference_files(tmp_path: Path, data: st.DataObject) -> None:
    """A --save-reference file: a valid one with a few values replaced, or any JSON."""
    from stlm.quality.polygraphy_json import encode_array, run_results
    from stlm.quality.verify_reference import REFERENCE_FORMAT, REFERENCE_KEY, read_reference

    valid = run_results([("r", [{"logits": np.zeros((2, 4), np.float32)}])])
    valid[REFERENCE_KEY] = {"format": REFERENCE_FORMAT, "accuracy_class": "fp32", "prompts": [[1]], "tokens": [[2, 3]]}
    record = data.draw(st.just(valid) | values)
    for _ in range(data.draw(st.integers(0, 3)) if isinstance(record, dict) else 0):
        path = data.draw(st.sampled_from(_leaves(record)))
        if not path:
            break
        target = record
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = data.draw(values | st.just(encode_array(np.ones(3))))
    file = tmp_path / "ref.json"
    file.write_text(json.dumps(record))
    try:
        read_reference(file)
    except StlmError as exc:
        assert str(exc).strip()
