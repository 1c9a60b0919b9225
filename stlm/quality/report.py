"""What ``stlm perplexity`` prints: :class:`PerplexityReport` (text like llama-perplexity's, or JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stlm.quality.stats import Estimate, KldSummary


@dataclass(frozen=True)
class PerplexityReport:
    """The result of :func:`stlm.quality.run_perplexity`.

    ``tokens_per_second``: tokens evaluated by the package (chunks × ctx, context halves included)
    per second of its own forward passes (not counting the base model or the statistics).
    """

    package: str
    description: str
    text: str
    ctx: int
    chunks: int
    text_tokens: int
    scored: int
    ppl: Estimate
    seconds: float
    tokens_per_second: float
    base: str | None = None
    kld: KldSummary | None = None
    saved_logits: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``--json``)."""
        data = {k: v for k, v in vars(self).items() if k not in ("kld", "ppl", "notes")}
        data.update(ppl=vars(self.ppl), kld=None if self.kld is None else self.kld.to_dict(), notes=list(self.notes))
        return data

    def format(self) -> str:
        """The human-readable report."""
        lines = [
            f"stlm perplexity: {self.package} ({self.description}) on {self.text}, ctx {self.ctx}",
            f"  {self.text_tokens} tokens → {self.chunks} chunks of {self.ctx} (first {self.ctx // 2} context "
            f"only): {self.scored} tokens scored",
            f"  PPL = {self.ppl.value:.4f} ± {self.ppl.error:.4f}   ({self.tokens_per_second:.1f} tok/s, "
            f"{self.seconds:.1f} s)",
        ]
        if self.kld is not None:
            lines += format_kld(self.kld, self.base or "")
        if self.saved_logits:
            lines.append(f"  saved logits to {self.saved_logits}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _nonnegative(kld: float) -> float:
    """A KL divergence as printed: never below 0 (rounding in the log-softmax gives -1e-9), never ``-0``."""
    return max(kld, 0.0) + 0.0


def _est(e: Estimate, scale: float = 1.0, unit: str = "") -> str:
    return f"{scale * e.value:11.6f} ± {scale * e.error:.6f}{unit}"


def _label(name: str) -> str:
    return {"max": "Maximum", "min": "Minimum", "p50": "Median "}.get(name, f"{name[1:]}%".rjust(7))


def format_kld(k: KldSummary, base: str) -> list[str]:
    """llama-perplexity's statistics blocks for a KL-divergence run."""
    lines = [
        f"  vs base: {base}",
        f"  Mean PPL(Q)                    : {_est(k.ppl)}",
        f"  Mean PPL(base)                 : {_est(k.base_ppl)}",
        f"  Cor(ln(PPL(Q)), ln(PPL(base))) : {100 * k.nll_correlation:6.2f}%",
        f"  Mean ln(PPL(Q)/PPL(base))      : {_est(k.ln_ppl_ratio)}",
        f"  Mean PPL(Q)/PPL(base)          : {_est(k.ppl_ratio)}",
        f"  Mean PPL(Q)-PPL(base)          : {_est(k.delta_ppl)}",
        f"  Mean    KLD: {_est(Estimate(_nonnegative(k.mean_kld.value), k.mean_kld.error))}",
    ]
    lines += [f"  {_label(name)} KLD: {_nonnegative(value):11.6f}" for name, value in k.kld.items()]
    lines.append(f"  Mean    Δp: {_est(k.mean_delta_p, 100, ' %')}")
    lines += [f"  {_label(name)}  Δp: {100 * value:8.3f} %" for name, value in k.delta_p.items()]
    lines += [
        f"  RMS Δp     : {_est(k.rms_delta_p, 100, ' %')}",
        f"  Same top p : {_est(k.same_top, 100, ' %')}",
    ]
    if k.base_tail_mass > 0:
        lines.append(
            f"  (the base kept its top log-probabilities only; their mean tail mass {k.base_tail_mass:.3g} is "
            "pooled into one outcome, so the KLD is a lower bound: save with --top-k 0 for the exact value)"
        )
    return lines
