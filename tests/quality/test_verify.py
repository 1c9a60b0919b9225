"""`stlm verify`: passes (exit 0) for every dtype on the tiny model, fails (exit 1, naming the outputs)
on a package with a perturbed weight, saves/reads polygraphy RunResults references, and refuses what
it cannot check with exit 2."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from stlm.cli import cli
from stlm.export.onnx_export import export_onnx
from stlm.package.manifest import read_manifest, write_manifest
from stlm.package.variant import Quantization, Variant
from stlm.quality.polygraphy_json import decode_array, encode_array, read_run_results, write_run_results
from stlm.quality.tolerance import ACCURACY_CLASSES, TOLERANCES, looser

CASES = {
    "fp32": {},
    "fp16": {"dtype": "fp16"},
    "bf16": {"dtype": "bf16"},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
}


def run_cli(*args: str) -> tuple[int, str]:
    """Exit code and stdout + stderr of ``stlm ARGS``."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def dtype_packages(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint in every accuracy class (default in-place graph)."""
    base = tmp_path_factory.mktemp("verify_packages")
    return {name: export_onnx(checkpoint, base / name, **kwargs) for name, kwargs in CASES.items()}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def perturbed(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fp32 package with one weight rewritten (noise of the weight's own scale)."""
    out = tmp_path_factory.mktemp("perturbed") / "pkg"
    shutil.copytree(package, out)
    model = onnx.load(str(out / "model.onnx"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensor = next(t for t in model.graph.initializer if t.name == name)
    weight = numpy_helper.to_array(tensor)
    noisy = weight + np.random.default_rng(0).normal(0.0, 3 * weight.std(), weight.shape).astype(weight.dtype)
    tensor.CopyFrom(numpy_helper.from_array(noisy, name))
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_verify_passes_for_every_dtype(name: str, checkpoint: Path, dtype_packages: dict[str, Path]) -> None:
    code, output = run_cli("verify", str(checkpoint), str(dtype_packages[name]), "--prompts", "3")
    assert code == 0, output
    assert output.rstrip().endswith("PASS") and f"tolerance class {name}" in output
    for label in ("logits", "top-1 agreement", "greedy agreement"):
        assert label in output


def test_verify_fails_on_a_perturbed_weight(checkpoint: Path, perturbed: Path, tmp_path: Path) -> None:
    code, output = run_cli("verify", str(checkpoint), str(perturbed), "--save-reference", str(tmp_path / "ref.json"))
    assert code == 1, output
    assert "FAIL: logits" in output and "Traceback" not in output
    assert "reference not written" in output and not (tmp_path / "ref.json").exists()
    result = CliRunner().invoke(cli, ["verify", str(checkpoint), str(perturbed), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # stdout is the JSON alone
    assert report["passed"] is False
    checks = {c["output"]: c for c in report["checks"]}
    assert checks["logits"]["passed"] is False and checks["logits"]["value"] > checks["logits"]["limit"]


def test_saved_reference_is_polygraphy_run_results_and_verifies(
    checkpoint: Path, package: Path, perturbed: Path, dtype_packages: dict[str, Path], tmp_path: Path
) -> None:
    ref = tmp_path / "ref.json"
    code, output = run_cli("verify", str(checkpoint), str(package), "--prompts", "2", "--save-reference", str(ref))
    assert code == 0, output
    data = json.loads(ref.read_text())
    assert data["polygraphy_class"] == "RunResults"
    runner, iterations = data["lst"][0]
    assert len(iterations) == 2 and iterations[0]["polygraphy_class"] == "IterationResult"
    assert iterations[0]["runner_name"] == runner
    lazy = iterations[0]["outputs"]["logits"]
    assert lazy["polygraphy_class"] == "LazyNumpyArray" and lazy["values"]["polygraphy_class"] == "ndarray"
    logits = decode_array(lazy["values"])
    assert logits.dtype == np.float32 and logits.shape == (8, read_manifest(package).model.vocab_size)
    assert data["stlm_verify"]["accuracy_class"] == "fp32" and len(data["stlm_verify"]["tokens"][0]) == 8
    # The GPU-side run: no checkpoint, no transformers.
    code, output = run_cli("verify", str(ref), str(dtype_packages["bf16"]))
    assert code == 0 and "tolerance class bf16" in output, output
    code, output = run_cli("verify", str(ref), str(perturbed))
    assert code == 1 and "FAIL: logits" in output


def _engine_folder(package: Path, out: Path) -> Path:
    """An engine-kind package folder (its model.engine is no real engine)."""
    manifest = read_manifest(package)
    out.mkdir()
    (out / "model.engine").write_bytes(b"not an engine")
    shutil.copyfile(package / manifest.tokenizer, out / manifest.tokenizer)
    write_manifest(out, dataclasses.replace(manifest, kind="tensorrt", graph="model.engine"))
    return out


def test_engine_packages_need_a_saved_reference_and_tensorrt(checkpoint: Path, package: Path, tmp_path: Path) -> None:
    engine = _engine_folder(package, tmp_path / "engine")
    code, output = run_cli("verify", str(checkpoint), str(engine))
    assert code == 2 and "--save-reference" in output and "Traceback" not in output
    ref = tmp_path / "ref.json"
    assert run_cli("verify", str(checkpoint), str(package), "--prompts", "1", "--save-reference", str(ref))[0] == 0
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        code, output = run_cli("verify", str(ref), str(engine))
        assert code == 2 and "error: TensorRT" in output and "Traceback" not in output


def test_verify_refuses_what_it_cannot_check(checkpoint: Path, package: Path, tmp_path: Path) -> None:
    trt_target = export_onnx(checkpoint, tmp_path / "trt", rotary="plugin")
    code, output = run_cli("verify", str(checkpoint), str(trt_target))
    assert code == 2 and "build-engine" in output
    assert run_cli("verify", str(checkpoint), str(package), "--prompts", "0")[0] == 2
    (tmp_path / "bad.json").write_text('{"lst": []}')
    code, output = run_cli("verify", str(tmp_path / "bad.json"), str(package))
    assert code == 2 and "RunResults" in output


def test_tolerance_table_is_ordered_and_complete() -> None:
    rows = [TOLERANCES[c] for c in ACCURACY_CLASSES]
    assert set(TOLERANCES.to_dict()) == set(ACCURACY_CLASSES)
    for tighter, looser_row in itertools.pairwise(rows):
        assert tighter.logits_rtol <= looser_row.logits_rtol
        assert tighter.min_top1 >= looser_row.min_top1 and tighter.min_greedy >= looser_row.min_greedy
    assert TOLERANCES["fp32"].min_top1 == 1.0 and TOLERANCES["int4"].logits_limit(10.0) > 1.0
    fp16 = Variant("onnxruntime", "inplace", "fused", "fp16", "fp32", "fp16")
    assert fp16.accuracy_class == "fp16"
    assert (
        dataclasses.replace(fp16, weight_dtype="fp32", quantization=Quantization.preset("int4")).accuracy_class
        == "int4"
    )
    assert (
        dataclasses.replace(fp16, weight_dtype="bf16", quantization=Quantization.preset("int8")).accuracy_class
        == "int8"
    )
    assert looser("fp16", "bf16") == "bf16" and looser("int4", "fp32") == "int4"


def test_run_results_round_trip(tmp_path: Path) -> None:
    arrays = [{"logits": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"logits": np.ones((1, 3), np.float32)}]
    write_run_results(tmp_path / "r.json", [("runner-a", arrays)], extra={"note": {"x": 1}})
    runners, extra = read_run_results(tmp_path / "r.json")
    assert extra == {"note": {"x": 1}} and runners[0][0] == "runner-a"
    for got, want in zip(runners[0][1], arrays, strict=True):
        np.testing.assert_array_equal(got["logits"], want["logits"])
    assert decode_array(encode_array(np.int64(7))) == 7
