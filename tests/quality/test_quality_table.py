"""The quantization defaults follow the recorded quality table (benchmarks/results/quality.json, written by
benchmarks/quality.py on the trained model), and the chosen int4 beats the old one on the trained model live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stlm.export.quantize import Quantization, parse_quantization

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
TRAINED = ROOT.parent / "shared" / "models" / "stablelm-tiny-shakespeare"
HELDOUT = ROOT.parent / "shared" / "corpora" / "shakespeare-heldout" / "macbeth.txt"


def _rows() -> list[dict[str, Any]]:
    return json.loads(RESULTS.read_text(encoding="utf-8"))["rows"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("bits", [4, 8])
def test_default_is_the_lowest_kld_fast_option_recorded(bits: int) -> None:
    """``--quantize int{bits}`` = the recorded option with the lowest mean KLD among those on the fast CPU kernels."""
    rows = [r for r in _rows() if r["bits"] == bits and r["dtype"] == "fp32"]
    assert len(rows) >= 4, "the table measures several options"
    fast = [r for r in rows if Quantization(**r["quantization"]).fast_cpu_kernels]
    best = min(fast, key=lambda r: r["mean_kld"])
    assert Quantization(**best["quantization"]) == parse_quantization(f"int{bits}")
    assert all(r["mean_kld"] > best["mean_kld"] for r in fast if r is not best)


def test_table_covers_methods_and_precisions() -> None:
    rows = _rows()
    assert {r["label"] for r in rows} >= {
        "fp32",
        "fp16",
        "bf16",
        "int8",
        "int4-rtn",
        "int4-hqq",
        "int4-mse",
        "int4-sym",
    }
    assert {r["quantization"]["method"] for r in rows if r["quantization"]} >= {"rtn", "hqq", "mse"}
    for r in rows:
        assert r["scored"] > 5000 and r["size_mb"] > 0 and r["decode_tok_s"] > 0
    fp32 = next(r for r in rows if r["label"] == "fp32")
    assert fp32["mean_kld"] < 1e-6 and fp32["same_top"] == 1.0  # fp32 = transformers


@pytest.mark.shared
@pytest.mark.skipif(
    not (TRAINED / "model.safetensors").is_file() or not HELDOUT.is_file(),
    reason="needs ../shared (the trained tiny StableLM and its held-out text), absent from a public clone",
)
def test_default_int4_beats_round_to_nearest_on_the_trained_model(tmp_path: Path) -> None:
    """Measured now (2 chunks of held-out text): the default int4's mean KLD from fp32 is below plain RTN's."""
    from stlm.export.onnx_export import export_onnx
    from stlm.quality import run_perplexity

    fp32 = export_onnx(TRAINED, tmp_path / "fp32", kv_cache="concat")
    kld = {}
    for spec in ("int4", "int4-rtn"):
        package = export_onnx(TRAINED, tmp_path / spec, kv_cache="concat", quantize=spec)
        report = run_perplexity(package, HELDOUT, ctx=256, chunks=2, reference=fp32)
        assert report.kld is not None
        kld[spec] = report.kld.mean_kld.value
    assert kld["int4"] < 0.8 * kld["int4-rtn"], kld


def test_tolerances_hold_the_recorded_trained_measurements() -> None:
    """Every int8/int4 option measured on the trained model passes ``stlm verify`` with room to spare."""
    from stlm.quality.tolerance import TOLERANCES

    measured = [r for r in _rows() if r["bits"] in (4, 8) and "verify_rel_logits" in r]
    assert len(measured) >= 8
    for r in measured:
        tol = TOLERANCES[f"int{r['bits']}"]
        assert r["verify_passed"], r["label"]
        assert 1.5 * r["verify_rel_logits"] <= tol.logits_rtol, r["label"]
        assert r["verify_top1"] >= tol.min_top1 and r["verify_greedy"] >= tol.min_greedy, r["label"]
