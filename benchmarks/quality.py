"""The quality table of docs/quality.md: every precision and quantization option of the trained model.

    .venv/bin/python benchmarks/quality.py [--checkpoint ../shared/models/stablelm-tiny-shakespeare]
        [--corpus ../shared/corpora/shakespeare-heldout] [--ctx 256] [--chunks 64] [--rounds 3]
        [--only LABEL ...] [--workdir DIR] [--out benchmarks/results/quality.json]

Exports the checkpoint once per variant (fp32, fp16, bf16, the int8 options, the int4 options;
ONNX Runtime target, in-place KV cache: what `stlm export` writes by default), then for each:

* size on disk (the package folder);
* quality over the held-out text (its files concatenated in name order), by ``stlm perplexity``'s
  library function: chunks of ``--ctx`` tokens (256: the model was trained on 256-token windows,
  so longer chunks would score positions it never saw), each variant run beside the fp32 package
  (``--reference``), which gives PPL, Δppl, mean KLD, top-1 agreement and RMS Δp on the same
  positions (the fp32 row is run beside transformers on the checkpoint instead, when the reference
  extra is installed);
* ``stlm verify``'s numbers over its 8 prompts (max|Δlogits| relative to the largest reference
  logit, top-1 and greedy agreement): the basis of the int8/int4 tolerance classes;
* decode speed (``stlm bench``'s function: batch 1, prompt 128, 64 greedy tokens), one run per
  variant per round, the variants alternating round after round; the median over rounds and its
  ratio to fp32's median (noisy shared machines: read ratios, not absolute numbers).

Writes the rows as JSON (``--out``) and prints the markdown table. ``--quantize int4`` (and
``int8``) must be the option with the lowest mean KLD among those on ONNX Runtime's fast CPU
kernels (``Quantization.fast_cpu_kernels``); ``tests/quality/test_quality_table.py`` checks it against the
recorded file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FLOATS = ("fp32", "fp16", "bf16")
INT8 = ("int8", "int8:acc=0", "int8:sym=1", "int8:block=128", "int8:method=mse")
INT4 = (
    "int4-rtn",
    "int4-rtn:acc=0",
    "int4-sym",
    "int4-rtn:block=16",
    "int4-rtn:block=64",
    "int4-rtn:block=128",
    "int4-rtn:head=4",
    "int4-mse",
    "int4-hqq",
    "int4-edge8",
    "int4-mse:edge=8",
    "int4-sym:edge=8",
    "int4-hqq:edge=8",
)


#: The default int4 with fp16 weights outside the linear layers (embedding, norms, scales): the smallest package.
COMBINED = ("fp16+int4",)


def export_settings(label: str) -> dict[str, str]:
    """``export_onnx`` keyword arguments of a variant label (``DTYPE+SPEC``: both)."""
    if "+" in label:
        dtype, spec = label.split("+", 1)
        return {"dtype": dtype, "quantize": spec}
    return {"dtype": label} if label in FLOATS else {"quantize": label}


def folder_mb(folder: Path) -> float:
    """Size of a package folder on disk, MB."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def quality_row(label: str, package: Path, base: Path, text: Path, ctx: int, chunks: int | None) -> dict[str, Any]:
    """PPL and the KL-divergence statistics of ``package`` beside ``base`` (a package or checkpoint)."""
    from stlm.quality import run_perplexity

    report = run_perplexity(package, text, ctx=ctx, chunks=chunks, reference=base)
    k = report.kld
    assert k is not None
    return {
        "label": label,
        "scored": report.scored,
        "ppl": report.ppl.value,
        "ppl_err": report.ppl.error,
        "base_ppl": k.base_ppl.value,
        "delta_ppl": k.delta_ppl.value,
        "delta_ppl_err": k.delta_ppl.error,
        "mean_kld": k.mean_kld.value,
        "mean_kld_err": k.mean_kld.error,
        "kld_p99": k.kld["p99"],
        "kld_max": k.kld["max"],
        "same_top": k.same_top.value,
        "rms_delta_p": k.rms_delta_p.value,
        "base": report.base,
    }


def verify_row(checkpoint: Path, package: Path) -> dict[str, Any]:
    """``stlm verify`` over its 8 prompts against transformers: the numbers the tolerance classes are set from."""
    from stlm.quality.verify import verify_package

    report = verify_package(str(checkpoint), package, prompts=8)
    steps = sum(p.steps for p in report.prompts)
    return {
        "verify_rel_logits": max(p.max_abs_diff for p in report.prompts) / max(p.scale for p in report.prompts),
        "verify_top1": sum(p.top1_agree for p in report.prompts) / steps,
        "verify_greedy": sum(p.greedy_agree for p in report.prompts) / steps,
        "verify_passed": report.passed,
    }


def decode_speeds(packages: dict[str, Path], rounds: int) -> dict[str, float]:
    """Median decode tok/s per package, the packages alternating within each round."""
    from stlm.runtime.bench import run_benchmark

    seen: dict[str, list[float]] = {name: [] for name in packages}
    for r in range(rounds):
        for name, package in packages.items():
            seen[name].append(run_benchmark(package, prompt_len=128, gen_len=64, runs=1, warmup=1).decode_tok_s)
        print(f"  decode round {r + 1}/{rounds} done", file=sys.stderr)
    return {name: statistics.median(values) for name, values in seen.items()}


def markdown(rows: list[dict[str, Any]], defaults: dict[str, str]) -> str:
    """The table of docs/quality.md (``*``: off ONNX Runtime's fast CPU kernels)."""
    from stlm.export.quantize import Quantization

    lines = [
        "| variant | size MB | PPL | Δppl | mean KLD | KLD p99 | same top | RMS Δp | decode tok/s (× fp32) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chosen = {label: name for name, label in defaults.items()}
    for r in rows:
        name = f"**{r['label']}** (= `{chosen[r['label']]}`)" if r["label"] in chosen else r["label"]
        if r["quantization"] and not Quantization(**r["quantization"]).fast_cpu_kernels:
            name += " *"
        lines.append(
            f"| {name} | {r['size_mb']:.1f} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} | {r['delta_ppl']:+.3f} "
            f"± {r['delta_ppl_err']:.3f} | {r['mean_kld']:.6f} ± {r['mean_kld_err']:.6f} | {r['kld_p99']:.5f} "
            f"| {100 * r['same_top']:.2f} % | {100 * r['rms_delta_p']:.3f} % | {r['decode_tok_s']:.1f} "
            f"({r['decode_ratio']:.2f}) |"
        )
    return "\n".join(lines)


def best(rows: list[dict[str, Any]], bits: int) -> str:
    """The ``bits``-bit option (fp32 package dtype) with the lowest mean KLD among those on ONNX Runtime's fast
    CPU kernels (what ``--quantize int4`` / ``int8`` must be; ``Quantization.fast_cpu_kernels``)."""
    from stlm.export.quantize import Quantization

    fast = [
        r
        for r in rows
        if r["bits"] == bits and r["dtype"] == "fp32" and Quantization(**r["quantization"]).fast_cpu_kernels
    ]
    return min(fast, key=lambda r: r["mean_kld"])["label"]  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=SHARED / "models" / "stablelm-tiny-shakespeare")
    p.add_argument("--corpus", type=Path, default=SHARED / "corpora" / "shakespeare-heldout")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=64, help="chunks scored per variant (0: all)")
    p.add_argument("--rounds", type=int, default=3, help="decode-speed rounds (0: skip)")
    p.add_argument("--kv-cache", choices=["inplace", "concat"], default="inplace")
    p.add_argument("--only", nargs="*", default=None, help="variant labels to run (default: all)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/stlm-quality"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    a = p.parse_args()

    from stlm.export.onnx_export import export_onnx
    from stlm.support.extras import missing_modules

    a.workdir.mkdir(parents=True, exist_ok=True)
    text = a.workdir / "heldout.txt"
    text.write_text("\n".join(f.read_text(encoding="utf-8") for f in sorted(a.corpus.glob("*.txt"))), encoding="utf-8")
    labels = [x for x in (*FLOATS, *INT8, *INT4, *COMBINED) if a.only is None or x in a.only or x == "fp32"]
    packages: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for label in labels:
        out = a.workdir / label.replace(":", "_").replace(",", "_").replace("=", "")
        began = time.perf_counter()
        packages[label] = export_onnx(a.checkpoint, out, overwrite=True, kv_cache=a.kv_cache, **export_settings(label))
        seconds = time.perf_counter() - began
        base = a.checkpoint if label == "fp32" and not missing_modules("reference") else packages["fp32"]
        if label == "fp32" and base == packages["fp32"]:
            print("  (no reference extra: the fp32 row is fp32 beside itself)", file=sys.stderr)
        row = quality_row(label, packages[label], base, text, a.ctx, a.chunks or None)
        manifest = json.loads((out / "stlm.json").read_text())
        quant = manifest["variant"].get("quantization")
        row.update(
            size_mb=folder_mb(out),
            export_s=seconds,
            dtype=manifest["dtype"],
            quantization=quant,
            bits=quant["bits"] if quant else 32,
        )
        if not missing_modules("reference"):
            row.update(verify_row(a.checkpoint, packages[label]))
        rows.append(row)
        print(
            f"{label}: PPL {row['ppl']:.3f}, mean KLD {row['mean_kld']:.6f}, same top {row['same_top']:.4f}",
            file=sys.stderr,
        )
    speeds = decode_speeds(packages, a.rounds) if a.rounds else {}
    for row in rows:
        row["decode_tok_s"] = speeds.get(row["label"], float("nan"))
        row["decode_ratio"] = row["decode_tok_s"] / speeds["fp32"] if speeds else float("nan")
    defaults = {f"int{b}": best(rows, b) for b in (4, 8) if any(r["bits"] == b for r in rows)}
    settings = {
        "kv_cache": a.kv_cache,
        "checkpoint": str(a.checkpoint),
        "corpus": str(a.corpus),
        "ctx": a.ctx,
        "chunks": a.chunks,
        "rounds": a.rounds,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": settings, "defaults": defaults, "rows": rows}, indent=1) + "\n")
    print(markdown(rows, defaults))


if __name__ == "__main__":
    main()
