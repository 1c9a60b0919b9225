"""The TensorRT-target graph: one stlm::partial_rotary plugin node per layer, no rotary ops left,
valid ONNX, and — with the plugin op backed by the numpy reference in ONNX Runtime — the logits
of the plain graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from stlm.export.onnx_export import export_onnx
from stlm.package.manifest import read_manifest
from stlm.plugins.partial_rotary.spec import PLUGIN_NAME, PLUGIN_NAMESPACE, is_plugin_node

pytest.importorskip("onnxruntime_extensions")


@pytest.fixture(scope="module")
def trt_package(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(checkpoint, tmp_path_factory.mktemp("trt") / "pkg", rotary="plugin")


def test_manifest_records_the_target(trt_package: Path) -> None:
    manifest = read_manifest(trt_package)
    assert (manifest.variant.target, manifest.variant.rotary, manifest.variant.kv_cache) == (
        "tensorrt",
        "plugin",
        "concat",
    )


def test_graph_is_valid_with_one_plugin_node_per_layer(trt_package: Path) -> None:
    model = onnx.load(str(trt_package / "model.onnx"))
    onnx.checker.check_model(model, full_check=False)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True)
    assert {o.name for o in inferred.graph.output} >= {"logits", "present.0.key"}
    layers = read_manifest(trt_package).model.num_layers
    plugins = [n for n in model.graph.node if is_plugin_node(n)]
    assert len(plugins) == layers
    for node in plugins:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == PLUGIN_NAME and attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert "plugin_version" in attrs
    leftover = [n.op_type for n in model.graph.node if n.op_type in ("Sin", "Cos", "Neg")]
    assert leftover == [], f"rotary ops left in the TensorRT graph: {leftover}"


def test_plugin_graph_gives_the_plain_graphs_logits(trt_package: Path, package: Path) -> None:
    from stlm.plugins.partial_rotary.ort_op import ort_session_options_with_plugin_op, to_ort_extensions_model

    model = to_ort_extensions_model(onnx.load(str(trt_package / "model.onnx")))
    plugin = ort.InferenceSession(
        model.SerializeToString(), ort_session_options_with_plugin_op(), providers=["CPUExecutionProvider"]
    )
    plain = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    manifest = read_manifest(package)
    cfg = manifest.model
    rng = np.random.default_rng(3)
    batch, seq = 2, 9
    mask = np.ones((batch, seq), np.int64)
    mask[0, :3] = 0
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab_size, (batch, seq)),
        "attention_mask": mask,
        "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0),
        "logits_index": np.broadcast_to(np.arange(seq), (batch, seq)).copy(),
    }
    for name in manifest.contract.past:
        feeds[name] = np.zeros((batch, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    want = plain.run(None, feeds)
    got = plugin.run(None, feeds)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= 1e-4


def test_native_rotary_graph_gives_the_plain_graphs_logits(checkpoint: Path, package: Path, tmp_path: Path) -> None:
    """`--rotary native`: ONNX RotaryEmbedding-23 (rotary_embedding_dim) in place of the op chain."""
    native = export_onnx(checkpoint, tmp_path / "native", target="tensorrt", rotary="native")
    model = onnx.load(str(native / "model.onnx"))
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    layers = read_manifest(native).model.num_layers
    assert sum(n.op_type == "RotaryEmbedding" for n in model.graph.node) == 2 * layers
    assert [n.op_type for n in model.graph.node if n.op_type in ("Sin", "Cos", "Neg")] == []
    assert read_manifest(native).variant.rotary == "native"
    feeds = _feeds(package)
    got = ort.InferenceSession(str(native / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= 1e-4


def test_rotary_and_target_must_agree(checkpoint: Path, tmp_path: Path) -> None:
    from stlm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="tensorrt"):
        export_onnx(checkpoint, tmp_path / "x", target="onnxruntime", rotary="native")
    assert not (tmp_path / "x").exists()


def _feeds(package: Path) -> dict[str, np.ndarray]:
    manifest = read_manifest(package)
    cfg = manifest.model
    rng = np.random.default_rng(4)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab_size, (2, 7)),
        "attention_mask": mask,
        "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0),
        "logits_index": np.broadcast_to(np.arange(7), (2, 7)).copy(),
    }
    for name in manifest.contract.past:
        feeds[name] = np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    return feeds


def test_onnxruntime_refuses_the_plugin_package_clearly(trt_package: Path) -> None:
    from click.testing import CliRunner

    from stlm.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(trt_package), "--prompt", "hi"])
    assert result.exit_code == 2
    assert "TensorRT-target" in result.output and "stlm build-engine" in result.output
