"""``stlm verify``: a package against transformers (or a saved reference) on fixed prompts.

For each prompt the reference runs greedily for ``steps`` tokens; the package then runs the same
sequence teacher-forced (the prompt as one prefill, then the reference's tokens one decode step at
a time) and its logits after each step are compared with the reference's: max abs difference,
top-1 agreement per step, and greedy agreement (tokens before the first divergence, which is
exactly what the package's own greedy run would share with the reference). Limits come from
:data:`stlm.quality.tolerance.TOLERANCES` by the package's accuracy class.

fp16/bf16/int packages are compared with transformers run in **fp32** on the same weights: the
reference is the model, not another low-precision run. Engine packages (kind 'tensorrt') are
compared with a reference saved from an ONNX package (``--save-reference``, polygraphy RunResults
JSON), so the GPU machine needs no torch or transformers. This module imports torch/transformers
only when a checkpoint is the reference; it is not part of :mod:`stlm.runtime`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stlm.errors import BackendUnavailableError, InvalidArgumentError, PackageError
from stlm.package.config import load_model_config
from stlm.package.manifest import Manifest, read_manifest
from stlm.quality.tolerance import TOLERANCES, Tolerance, looser
from stlm.quality.verify_reference import (
    DEFAULT_PROMPTS,
    DEFAULT_STEPS,
    LOGITS,
    PROMPTS,
    TWO_STEP_FIX,
    Reference,
    check_reference_path,
    read_reference,
    save_reference,
    transformers_reference,
)
from stlm.runtime.backend import Backend
from stlm.support.extras import require_extra

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_STEPS",
    "PROMPTS",
    "Reference",
    "VerifyReport",
    "compare",
    "read_reference",
    "save_reference",
    "transformers_reference",
    "verify_package",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptResult:
    """One prompt's comparison."""

    prompt_tokens: int
    max_abs_diff: float
    worst_step: int
    scale: float
    top1_agree: int
    steps: int
    greedy_agree: int
    reference_tokens: tuple[int, ...]
    package_top1: tuple[int, ...]


@dataclass(frozen=True)
class Check:
    """One output's verdict: ``value`` against ``limit`` (an upper bound for logits, else a floor)."""

    output: str
    value: float
    limit: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_package`."""

    package: str
    description: str
    reference: str
    accuracy_class: str
    tolerance: Tolerance
    checks: tuple[Check, ...]
    prompts: tuple[PromptResult, ...]
    saved_reference: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """Whether every check is within tolerance."""
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``stlm verify --json``)."""
        return {
            "passed": self.passed,
            "package": self.package,
            "description": self.description,
            "reference": self.reference,
            "accuracy_class": self.accuracy_class,
            "tolerance": self.tolerance.to_dict(),
            "checks": [vars(c) for c in self.checks],
            "prompts": [
                {**vars(p), "reference_tokens": list(p.reference_tokens), "package_top1": list(p.package_top1)}
                for p in self.prompts
            ],
            "saved_reference": self.saved_reference,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """The human-readable report."""
        steps = self.prompts[0].steps if self.prompts else 0
        lines = [
            f"stlm verify: {self.package} ({self.description}) vs {self.reference}",
            f"  {len(self.prompts)} prompts, prefill + {steps - 1} decode steps each, teacher-forced on the "
            f"reference's greedy tokens; tolerance class {self.accuracy_class}",
            f"  {'output':<18}{'value':>12}{'limit':>14}  result",
        ]
        for c in self.checks:
            bound = f"<= {c.limit:.4g}" if c.output == LOGITS else f">= {c.limit:.4g}"
            lines.append(f"  {c.output:<18}{c.value:>12.4g}{bound:>14}  {'ok' if c.passed else 'FAIL'}  {c.detail}")
        for i, p in enumerate(self.prompts):
            lines.append(
                f"    prompt {i} ({p.prompt_tokens} tokens): logits max|diff| {p.max_abs_diff:.4g} at step "
                f"{p.worst_step} (scale {p.scale:.3g}), top-1 {p.top1_agree}/{p.steps}, "
                f"greedy {p.greedy_agree}/{p.steps}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        failed = [c.output for c in self.checks if not c.passed]
        lines.append("PASS" if not failed else f"FAIL: {', '.join(failed)} beyond the {self.accuracy_class} tolerance")
        return "\n".join(lines)


def package_logits(backend: Backend[Any], prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """(len(tokens), vocab) logits of a package: prefill ``prompt``, then feed ``tokens[:-1]`` one by one."""
    cache = backend.new_cache(1, len(prompt) + len(tokens))
    rows = [np.array(backend.forward(cache, [list(prompt)])[0], dtype=np.float32)]
    for token in tokens[:-1]:
        rows.append(np.array(backend.forward(cache, [[int(token)]])[0], dtype=np.float32))
    return np.stack(rows)


def _prompt_result(ids: Sequence[int], tokens: Sequence[int], want: np.ndarray, have: np.ndarray) -> PromptResult:
    """One prompt's comparison of the package's logits ``have`` with the reference's ``want``."""
    if have.shape != want.shape:
        raise PackageError(
            f"the package's logits have shape {have.shape}, the reference's {want.shape}",
            fix="compare a package with the checkpoint (or reference) it was exported from",
        )
    diff = np.abs(have.astype(np.float64) - want).max(axis=1)
    worst_step = int(np.argmax(np.nan_to_num(diff, nan=np.inf)))
    package_top1 = have.argmax(axis=1)
    follows = package_top1 == np.asarray(tokens)
    return PromptResult(
        prompt_tokens=len(ids),
        max_abs_diff=float(diff[worst_step]),
        worst_step=worst_step,
        scale=float(np.abs(want).max()),
        top1_agree=int((package_top1 == want.argmax(axis=1)).sum()),
        steps=len(tokens),
        greedy_agree=len(tokens) if follows.all() else int(np.argmin(follows)),
        reference_tokens=tuple(tokens),
        package_top1=tuple(int(t) for t in package_top1),
    )


def _checks(results: Sequence[PromptResult], tolerance: Tolerance) -> tuple[Check, ...]:
    """The logits, top-1 and greedy verdicts over every prompt."""
    scale = max(r.scale for r in results)
    worst = max(range(len(results)), key=lambda i: np.nan_to_num(results[i].max_abs_diff, nan=np.inf))
    max_diff, limit = results[worst].max_abs_diff, tolerance.logits_limit(scale)
    agreeing, steps = sum(r.top1_agree for r in results), sum(r.steps for r in results)
    top1_rate = agreeing / steps
    greedy_rate = float(np.mean([r.greedy_agree / r.steps for r in results]))
    return (
        Check(
            LOGITS,
            max_diff,
            limit,
            bool(max_diff <= limit),
            f"max |package - reference| (prompt {worst}, step {results[worst].worst_step}); limit "
            f"{tolerance.logits_atol:g} + {tolerance.logits_rtol:g} x max|reference| {scale:.3g}",
        ),
        Check(
            "top-1 agreement",
            top1_rate,
            tolerance.min_top1,
            top1_rate >= tolerance.min_top1,
            f"{agreeing}/{steps} steps",
        ),
        Check(
            "greedy agreement",
            greedy_rate,
            tolerance.min_greedy,
            greedy_rate >= tolerance.min_greedy,
            "mean fraction of greedy tokens before the first divergence",
        ),
    )


def compare(
    reference: Reference, got: Sequence[np.ndarray], tolerance: Tolerance
) -> tuple[tuple[PromptResult, ...], tuple[Check, ...]]:
    """Per-prompt results and the three checks (logits, top-1, greedy) of ``got`` against ``reference``."""
    rows = zip(reference.prompts, reference.tokens, reference.logits, got, strict=True)
    results = tuple(_prompt_result(ids, tokens, want, have) for ids, tokens, want, have in rows)
    return results, _checks(results, tolerance)


def _describe(manifest: Manifest) -> str:
    if manifest.kind == "tensorrt":
        return f"TensorRT engine, {manifest.dtype}"
    return manifest.variant.describe()


def _reference(
    reference: str | Path | Reference, package: Path, manifest: Manifest, prompts: int, steps: int
) -> Reference:
    """``reference`` as a :class:`Reference`: as given, read from a file, or run by transformers."""
    if isinstance(reference, Reference):
        return reference
    if Path(reference).is_file():
        return read_reference(Path(reference))
    if manifest.kind == "tensorrt":
        raise InvalidArgumentError(
            f"{package} is a TensorRT engine package: it is compared with a reference saved "
            "from its ONNX package, not with a checkpoint",
            fix=TWO_STEP_FIX,
        )
    from stlm.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(package / manifest.tokenizer)
    ids = [tokenizer.encode(p) or [manifest.generation.bos_token_id] for p in PROMPTS[:prompts]]
    require_extra("reference", feature="verifying against a checkpoint (transformers runs the reference)")
    from stlm.package.checkpoint import resolve_checkpoint

    if load_model_config(resolve_checkpoint(reference)) != manifest.model:
        raise PackageError(
            f"{package} was exported from another model than {reference} (their configs differ)",
            fix="pass the checkpoint the package was exported from",
        )
    return transformers_reference(reference, ids, steps)  # first, and freed: never beside the package in RAM


def _check_verifiable(package: Path, manifest: Manifest, prompts: int, steps: int) -> None:
    if not 1 <= prompts <= len(PROMPTS):
        raise InvalidArgumentError(f"--prompts {prompts} is out of range", fix=f"pass 1..{len(PROMPTS)}")
    if not 1 <= steps <= 256:
        raise InvalidArgumentError(f"{steps} steps is out of range", fix="pass 1..256 steps")
    if manifest.kind == "onnx" and manifest.variant.rotary == "plugin":
        raise BackendUnavailableError(
            f"{package} is a --target tensorrt ONNX graph (stlm::partial_rotary plugin nodes): it runs only as a "
            "TensorRT engine",
            fix=f"build it with `stlm build-engine {package} -o ENGINE`; to check it, {TWO_STEP_FIX}",
        )


def verify_package(
    reference: str | Path | Reference,
    package: str | Path,
    *,
    prompts: int = DEFAULT_PROMPTS,
    steps: int = DEFAULT_STEPS,
    save_reference_to: Path | None = None,
) -> VerifyReport:
    """Compare ``package`` with ``reference``: a checkpoint (run in transformers, fp32), a reference
    JSON file from ``save_reference_to``, or a :class:`Reference` already computed (to check several
    packages of one checkpoint; ``prompts``/``steps`` then come from it). Writes ``save_reference_to``
    (the package's logits) only when the package passes. Raises :class:`StlmError` subclasses for
    unusable inputs; a failed comparison is a report, not an error."""
    from stlm.runtime import Generator

    package = Path(package)
    if save_reference_to is not None:
        check_reference_path(Path(save_reference_to))
    manifest = read_manifest(package)
    _check_verifiable(package, manifest, prompts, steps)
    ref = _reference(reference, package, manifest, prompts, steps)
    package_class = manifest.variant.accuracy_class
    backend = Generator.load(package).backend
    got = [package_logits(backend, p, t) for p, t in zip(ref.prompts, ref.tokens, strict=True)]
    compared_as = looser(package_class, ref.accuracy_class)
    results, checks = compare(ref, got, TOLERANCES[compared_as])
    notes: list[str] = []
    if package_class != "fp32" and ref.source.startswith("transformers"):
        notes.append(f"a {package_class} package is compared with transformers in fp32 on the same weights")
    saved = None
    if save_reference_to is not None and all(c.passed for c in checks):
        runner = f"stlm-{manifest.kind}-{package_class}"
        source = f"{package} ({_describe(manifest)})"
        saved = str(
            save_reference(save_reference_to, ref, got, runner=runner, package_class=package_class, source=source)
        )
    elif save_reference_to is not None:
        notes.append(f"reference not written to {save_reference_to}: the package is beyond tolerance")
    return VerifyReport(
        str(package),
        _describe(manifest),
        ref.source,
        compared_as,
        TOLERANCES[compared_as],
        checks,
        results,
        saved,
        tuple(notes),
    )
