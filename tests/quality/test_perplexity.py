"""``stlm perplexity``: perplexity against transformers (computed here, independently) and KL divergence
against an independent numpy computation from the saved logits; CLI errors.

The trained-model tests need ``../shared`` (the trained tiny StableLM and its held-out text) and
skip without it; everything else runs on the tiny random checkpoints and ``tests/data/sonnets.txt``.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from stlm.cli import cli
from stlm.export.onnx_export import export_onnx

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "data" / "sonnets.txt"
SHARED = ROOT.parent / "shared"
TRAINED = SHARED / "models" / "stablelm-tiny-shakespeare"
HELDOUT = SHARED / "corpora" / "shakespeare-heldout" / "tempest.txt"
needs_trained = pytest.mark.skipif(
    not (TRAINED / "model.safetensors").is_file() or not HELDOUT.is_file(),
    reason="needs ../shared (the trained tiny StableLM and its held-out text), absent from a public clone",
)
CTX, CHUNKS = 64, 4


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["-q", *args])


def _report(*args: str) -> dict[str, Any]:
    result = _cli("perplexity", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def _transformers_ppl(checkpoint: Path, text: Path, ctx: int, chunks: int) -> tuple[float, int]:
    """llama-perplexity's chunked perplexity with transformers (fp32) and the tokenizers library."""
    import tokenizers
    import torch
    from transformers import StableLmForCausalLM

    ids = tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokens = ids.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    model = StableLmForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        for c in range(min(chunks, len(tokens) // ctx)):
            chunk = torch.tensor([tokens[c * ctx : (c + 1) * ctx]])
            logp = torch.log_softmax(model(input_ids=chunk).logits[0].double(), dim=-1)
            first = ctx // 2
            nll.append(-logp[first : ctx - 1].gather(1, chunk[0, first + 1 :, None])[:, 0])
    scored = torch.cat(nll)
    return math.exp(float(scored.mean())), int(scored.numel())


@pytest.mark.parametrize("kind", ["hd16", "hd16-inplace"])
def test_fp32_perplexity_equals_transformers(
    kind: str, packages: dict[str, Path], checkpoints: dict[str, Path]
) -> None:
    report = _report(str(packages[kind]), str(TEXT), "--ctx", str(CTX), "--chunks", str(CHUNKS))
    want, scored = _transformers_ppl(checkpoints["hd16"], TEXT, CTX, CHUNKS)
    assert report["scored"] == scored == CHUNKS * (CTX - 1 - CTX // 2)
    assert report["ppl"]["value"] == pytest.approx(want, rel=1e-4)
    assert report["ppl"]["error"] > 0 and report["tokens_per_second"] > 0


@pytest.mark.shared
@needs_trained
def test_trained_fp32_perplexity_equals_transformers(tmp_path: Path) -> None:
    package = export_onnx(TRAINED, tmp_path / "fp32", kv_cache="concat")
    report = _report(str(package), str(HELDOUT), "--ctx", "256", "--chunks", "3")
    want, _ = _transformers_ppl(TRAINED, HELDOUT, 256, 3)
    assert report["ppl"]["value"] == pytest.approx(want, rel=1e-4)
    assert report["ppl"]["value"] < 1000  # a trained model: far below the vocabulary size


# -- KL divergence: our report vs numpy on the two saved logits files ---------------------------
def _independent_kld(base: Path, other: Path) -> dict[str, float]:
    """llama-perplexity's statistics from two full-logits files, with numpy only.

    The files hold float32 log-probabilities: their rounding (~1e-7 relative) bounds the agreement
    of KLD values near zero (fp16 of a random tiny model) to ~1e-7 absolute.
    """
    with np.load(base, allow_pickle=False) as b, np.load(other, allow_pickle=False) as q:
        assert "ids" not in b.files and "ids" not in q.files, "full-logits files expected"
        logp, logq = b["logprobs"].astype(np.float64), q["logprobs"].astype(np.float64)
        nll_b, nll_q = b["nll"], q["nll"]
    kld = (np.exp(logp) * (logp - logq)).sum(axis=1)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    n = kld.size
    return {
        "mean_kld": kld.mean(),
        "kld_err": math.sqrt((np.mean(kld**2) - kld.mean() ** 2) / (n - 1)),
        "median": float(np.median(kld)),
        "p99": float(np.percentile(kld, 99)),
        "max": kld.max(),
        "same_top": float(np.mean(logp.argmax(1) == logq.argmax(1))),
        "delta_ppl": math.exp(nll_q.mean()) - math.exp(nll_b.mean()),
        "rms_dp": math.sqrt(np.mean(dp**2)),
    }


@pytest.fixture(scope="module")
def variants(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("precisions")
    settings: dict[str, dict[str, str]] = {
        "fp16": {"dtype": "fp16"},
        "bf16": {"dtype": "bf16"},
        "int8": {"quantize": "int8"},
        "int4": {"quantize": "int4"},
    }
    return {name: export_onnx(checkpoint, base / name, kv_cache="concat", **kw) for name, kw in settings.items()}


@pytest.fixture(scope="module")
def base_logits(packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logits") / "base.npz"
    _report(
        str(packages["hd16"]),
        str(TEXT),
        "--ctx",
        str(CTX),
        "--chunks",
        str(CHUNKS),
        "--save-logits",
        str(path),
        "--top-k",
        "0",
    )
    return path


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "int4"])
def test_kl_divergence_matches_numpy(name: str, variants: dict[str, Path], base_logits: Path, tmp_path: Path) -> None:
    own = tmp_path / f"{name}.npz"
    _report(
        str(variants[name]),
        str(TEXT),
        "--ctx",
        str(CTX),
        "--chunks",
        str(CHUNKS),
        "--save-logits",
        str(own),
        "--top-k",
        "0",
    )
    kld = _report(str(variants[name]), str(TEXT), "--kl-divergence", str(base_logits))["kld"]
    want = _independent_kld(base_logits, own)
    assert kld["count"] == CHUNKS * (CTX - 1 - CTX // 2)
    assert kld["mean_kld"]["value"] == pytest.approx(want["mean_kld"], rel=1e-4, abs=1e-7)
    assert kld["mean_kld"]["error"] == pytest.approx(want["kld_err"], rel=1e-3, abs=1e-7)
    assert kld["kld"]["p50"] == pytest.approx(want["median"], rel=1e-4, abs=1e-7)
    assert kld["kld"]["p99"] == pytest.approx(want["p99"], rel=1e-4, abs=1e-7)
    assert kld["kld"]["max"] == pytest.approx(want["max"], rel=1e-4, abs=1e-7)
    assert kld["same_top"]["value"] == pytest.approx(want["same_top"])
    assert kld["delta_ppl"]["value"] == pytest.approx(want["delta_ppl"], rel=1e-4, abs=1e-6)
    assert kld["rms_delta_p"]["value"] == pytest.approx(want["rms_dp"], rel=1e-4, abs=1e-7)
    assert 0 < kld["mean_kld"]["value"]


def test_top_k_logits_give_a_lower_bound(
    variants: dict[str, Path], base_logits: Path, packages: dict[str, Path], tmp_path: Path
) -> None:
    """A top-k file pools the tail: KLD ≤ the full one, and equals numpy's pooled computation."""
    small = tmp_path / "top64.npz"
    args = ("--ctx", str(CTX), "--chunks", str(CHUNKS))
    _report(str(packages["hd16"]), str(TEXT), *args, "--save-logits", str(small), "--top-k", "64")
    assert small.stat().st_size < base_logits.stat().st_size / 50
    full = _report(str(variants["int4"]), str(TEXT), "--kl-divergence", str(base_logits))["kld"]
    pooled = _report(str(variants["int4"]), str(TEXT), "--kl-divergence", str(small))["kld"]
    with np.load(small, allow_pickle=False) as s, np.load(base_logits, allow_pickle=False) as f:
        logp, ids, logp_full = s["logprobs"].astype(np.float64), s["ids"], f["logprobs"]
    assert np.array_equal(np.take_along_axis(logp_full, ids, axis=1), logp.astype(np.float32))
    assert pooled["mean_kld"]["value"] <= full["mean_kld"]["value"] + 1e-12
    assert pooled["same_top"] == full["same_top"] and pooled["delta_ppl"] == full["delta_ppl"]
    assert 0 < pooled["base_tail_mass"] < 1


def test_reference_package_equals_saved_full_logits(
    variants: dict[str, Path], base_logits: Path, packages: dict[str, Path]
) -> None:
    on_the_fly = _report(
        str(variants["int8"]),
        str(TEXT),
        "--ctx",
        str(CTX),
        "--chunks",
        str(CHUNKS),
        "--reference",
        str(packages["hd16"]),
    )
    saved = _report(str(variants["int8"]), str(TEXT), "--kl-divergence", str(base_logits))
    assert on_the_fly["kld"]["mean_kld"]["value"] == pytest.approx(saved["kld"]["mean_kld"]["value"], rel=1e-6)


def test_reference_checkpoint_is_transformers(packages: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    """fp32 package vs transformers on its checkpoint: the same model, so KLD ~ 0 and every top token agrees."""
    report = _report(
        str(packages["hd16-inplace"]),
        str(TEXT),
        "--ctx",
        str(CTX),
        "--chunks",
        "2",
        "--reference",
        str(checkpoints["hd16"]),
    )
    assert report["base"].startswith("transformers fp32")
    assert report["kld"]["mean_kld"]["value"] < 1e-7 and report["kld"]["same_top"]["value"] == 1.0


# -- errors: exit 2, "error:", nothing overwritten -------------------------------------------------
def _fails(*args: str, match: str) -> None:
    result = _cli("perplexity", *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and match in result.output and "Traceback" not in result.output


def test_cli_errors(package: Path, base_logits: Path, tmp_path: Path) -> None:
    pkg, text = str(package), str(TEXT)
    _fails(pkg, str(tmp_path / "missing.txt"), match="does not exist")
    _fails(pkg, text, "--ctx", "100000", match="exceeds the package's context")
    _fails(pkg, text, "--ctx", "2", match="--ctx is 2")
    _fails(pkg, text, "--ctx", "4096", match="fewer than one chunk")
    _fails(pkg, text, "--kl-divergence", str(base_logits), "--reference", pkg, match="not both")
    _fails(pkg, text, "--kl-divergence", str(base_logits), "--ctx", "32", match="differs from")
    other = tmp_path / "other.txt"
    other.write_text(TEXT.read_text()[::-1])
    _fails(pkg, str(other), "--kl-divergence", str(base_logits), match="does not tokenize")
    _fails(str(tmp_path), text, match="stlm.json")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    _fails(pkg, str(binary), match="UTF-8")


def test_logits_files_are_checked_and_never_unpickled(package: Path, tmp_path: Path) -> None:
    pkg, text = str(package), str(TEXT)
    keep = tmp_path / "notes.npz"
    keep.write_text("my notes")
    _fails(pkg, text, "--save-logits", str(keep), match="not an stlm logits file")
    assert keep.read_text() == "my notes"
    _fails(pkg, text, "--kl-divergence", str(keep), match="not a usable stlm logits file")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"format": "stlm-logits"}], dtype=object))
    _fails(pkg, text, "--kl-divergence", str(pickled), match="not a usable stlm logits file")
    truncated = tmp_path / "truncated.npz"
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("meta.npy", b"\x93NUMPY")
    _fails(pkg, text, "--kl-divergence", str(truncated), match="not a usable stlm logits file")
    _fails(pkg, text, "--save-logits", str(tmp_path), match="is a folder")


ISOLATION = """
import json, sys
from stlm.quality import run_perplexity
report = run_perplexity(sys.argv[1], sys.argv[2], ctx=32, chunks=2, reference=sys.argv[1])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx") or m.startswith("stlm.export"))
print(json.dumps({"loaded": loaded, "kld": report.kld.mean_kld.value}))
"""


def test_perplexity_is_runtime_side(package: Path) -> None:
    """Perplexity and KLD between packages load neither torch, transformers, onnx nor the exporter."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", ISOLATION, str(package), str(TEXT)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["kld"] < 1e-8


def test_reference_checkpoint_without_the_extra_is_a_clear_error(
    package: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stlm.support.extras

    real = stlm.support.extras.missing_modules
    monkeypatch.setattr(
        stlm.support.extras, "missing_modules", lambda extra: ["torch"] if extra == "reference" else real(extra)
    )
    _fails(str(package), str(TEXT), "--ctx", "32", "--reference", str(checkpoint), match="stlm[reference]")
