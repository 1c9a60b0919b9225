"""``stlm verify``: a package against transformers (or a saved reference) on fixed prompts.

For each prompt the reference runs greedily for ``steps`` tokens; the package then runs the same
sequence teacher-forced (the prompt as one prefill, then the reference's tokens one decode step at
a time) and its logits after each step are compared with the reference's: max abs difference,
top-1 agreement per step, and greedy agreement (tokens before the first divergence, which is
exactly what the package's own greedy run would share with the reference). Limits come from
:data:`stlm.tolerance.TOLERANCES` by the package's accuracy class.

fp16/bf16/int packages are compared with transformers run in **fp32** on the same weights: the
reference is the model, not another low-precision run. Engine packages (kind 'tensorrt') are
compared with a reference saved from an ONNX package (``--save-reference``, polygraphy RunResults
JSON), so the GPU machine needs no torch or transformers. This module imports torch/transformers
only when a checkpoint is the reference; it is not part of :mod:`stlm.runtime`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from stlm.config import load_model_config
from stlm.errors import BackendUnavailableError, CheckpointError, InvalidArgumentError, PackageError
from stlm.extras import require_extra
from stlm.manifest import Manifest, read_manifest
from stlm.polygraphy_json import read_run_results, write_run_results
from stlm.tolerance import TOLERANCES, Tolerance, looser

log = logging.getLogger(__name__)

PROMPTS: Final = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 times 3?\nA:",
    "Die Katze sitzt auf der",
    "The three primary colours are",
    "In 1969, the first humans to walk on the Moon",
    "import numpy as np\n\nx = np.",
)
DEFAULT_PROMPTS: Final = 4
DEFAULT_STEPS: Final = 8
REFERENCE_KEY: Final = "stlm_verify"
REFERENCE_FORMAT: Final = "stlm-verify-reference"
LOGITS: Final = "logits"
TWO_STEP_FIX: Final = (
    "save a reference where transformers runs: `stlm verify CHECKPOINT ONNX_PACKAGE --save-reference "
    "ref.json`, then on the GPU machine `stlm verify ref.json ENGINE_PACKAGE`"
)


@dataclass(frozen=True)
class Reference:
    """What the package is compared with: per prompt, its tokens, the greedy continuation, the logits."""

    source: str
    accuracy_class: str
    prompts: tuple[tuple[int, ...], ...]
    tokens: tuple[tuple[int, ...], ...]
    logits: tuple[np.ndarray, ...]  # (steps, vocab) float32 per prompt


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


def transformers_reference(checkpoint: str | Path, prompts: Sequence[Sequence[int]], steps: int) -> Reference:
    """Greedy runs of transformers' StableLmForCausalLM in fp32 (safetensors only, no remote code)."""
    require_extra("reference", feature="verifying against a checkpoint (transformers runs the reference)")
    import torch
    from transformers import StableLmForCausalLM
    from transformers.utils import logging as hf_logging

    from stlm.export.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    load_model_config(folder)  # a clear error for a non-StableLM before transformers tries
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = StableLmForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"transformers cannot load {folder} ({type(exc).__name__}: {str(exc)[:300]})",
            fix="pass a StableLM checkpoint folder with config.json and *.safetensors",
        ) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokens, logits = [], []
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([list(ids)]), use_cache=True)
            rows = [out.logits[0, -1].float().numpy()]
            chosen = [int(rows[0].argmax())]
            while len(chosen) < steps:
                out = model(input_ids=torch.tensor([[chosen[-1]]]), cache=out.cache, use_cache=True)
                rows.append(out.logits[0, -1].float().numpy())
                chosen.append(int(rows[-1].argmax()))
            tokens.append(tuple(chosen))
            logits.append(np.stack(rows).astype(np.float32))
    del model
    gc.collect()
    return Reference(
        f"transformers fp32 ({checkpoint})", "fp32", tuple(tuple(p) for p in prompts), tuple(tokens), tuple(logits)
    )


def read_reference(path: Path) -> Reference:
    """A reference saved by :func:`save_reference` (polygraphy RunResults JSON)."""
    runners, extra = read_run_results(path)
    meta = extra.get(REFERENCE_KEY)
    if not isinstance(meta, dict) or meta.get("format") != REFERENCE_FORMAT or not runners:
        raise InvalidArgumentError(
            f"{path} is RunResults JSON but not an stlm verify reference (no {REFERENCE_KEY!r} record)",
            fix=TWO_STEP_FIX,
        )
    name, iterations = runners[0]
    try:
        logits = tuple(np.asarray(it[LOGITS], dtype=np.float32) for it in iterations)
        prompts = tuple(tuple(int(t) for t in p) for p in meta["prompts"])
        tokens = tuple(tuple(int(t) for t in p) for p in meta["tokens"])
        klass = str(meta["accuracy_class"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{path} has a malformed stlm verify record ({exc!r})", fix=TWO_STEP_FIX) from None
    if not (len(prompts) == len(tokens) == len(logits)) or any(
        len(t) != len(x) for t, x in zip(tokens, logits, strict=True)
    ):
        raise InvalidArgumentError(f"{path}: prompts, tokens and logits disagree in number", fix=TWO_STEP_FIX)
    return Reference(f"reference {path} (runner {name}, {meta.get('source', '?')})", klass, prompts, tokens, logits)


def save_reference(
    path: Path,
    reference: Reference,
    package_logits: Sequence[np.ndarray],
    *,
    runner: str,
    package_class: str,
    source: str,
) -> Path:
    """Save ``package_logits`` (an ONNX package's, on ``reference``'s tokens) as a reference file."""
    meta = {
        "format": REFERENCE_FORMAT,
        "version": 1,
        "accuracy_class": package_class,
        "source": source,
        "verified_against": reference.source,
        "prompts": [list(p) for p in reference.prompts],
        "tokens": [list(t) for t in reference.tokens],
        "outputs": {LOGITS: "(steps, vocab) float32 per prompt"},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_run_results(Path(path), [(runner, [{LOGITS: x} for x in package_logits])], extra={REFERENCE_KEY: meta})


def package_logits(backend: Any, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
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
    from stlm.runtime.tokenizer import Tokenizer

    if not 1 <= prompts <= len(PROMPTS):
        raise InvalidArgumentError(f"--prompts {prompts} is out of range", fix=f"pass 1..{len(PROMPTS)}")
    if not 1 <= steps <= 256:
        raise InvalidArgumentError(f"{steps} steps is out of range", fix="pass 1..256 steps")
    package = Path(package)
    manifest = read_manifest(package)
    if manifest.kind == "onnx" and manifest.variant.rotary == "plugin":
        raise BackendUnavailableError(
            f"{package} is a --target tensorrt ONNX graph (stlm::partial_rotary plugin nodes): it runs only as a "
            "TensorRT engine",
            fix=f"build it with `stlm build-engine {package} -o ENGINE`; to check it, {TWO_STEP_FIX}",
        )
    package_class = manifest.variant.accuracy_class
    from_file = not isinstance(reference, Reference) and Path(reference).is_file()
    if isinstance(reference, Reference):
        ref = reference
    elif from_file:
        ref = read_reference(Path(reference))
    elif manifest.kind == "tensorrt":
        raise InvalidArgumentError(
            f"{package} is a TensorRT engine package: it is compared with a reference saved "
            "from its ONNX package, not with a checkpoint",
            fix=TWO_STEP_FIX,
        )
    else:
        tokenizer = Tokenizer.from_file(package / manifest.tokenizer)
        ids = [tokenizer.encode(p) or [manifest.generation.bos_token_id] for p in PROMPTS[:prompts]]
        require_extra("reference", feature="verifying against a checkpoint (transformers runs the reference)")
        from stlm.export.checkpoint import resolve_checkpoint

        if load_model_config(resolve_checkpoint(reference)) != manifest.model:
            raise PackageError(
                f"{package} was exported from another model than {reference} (their configs differ)",
                fix="pass the checkpoint the package was exported from",
            )
        ref = transformers_reference(reference, ids, steps)  # first, and freed: never beside the package in RAM
    generator = Generator.load(package)
    got = [package_logits(generator.backend, p, t) for p, t in zip(ref.prompts, ref.tokens, strict=True)]
    klass = looser(package_class, ref.accuracy_class)
    results, checks = compare(ref, got, TOLERANCES[klass])
    notes: list[str] = []
    if package_class != "fp32" and ref.source.startswith("transformers"):
        notes.append(f"a {package_class} package is compared with transformers in fp32 on the same weights")
    saved = None
    if save_reference_to is not None:
        if all(c.passed for c in checks):
            saved = str(
                save_reference(
                    save_reference_to,
                    ref,
                    got,
                    runner=f"stlm-{manifest.kind}-{package_class}",
                    package_class=package_class,
                    source=f"{package} ({_describe(manifest)})",
                )
            )
        else:
            notes.append(f"reference not written to {save_reference_to}: the package is beyond tolerance")
    return VerifyReport(
        str(package), _describe(manifest), ref.source, klass, TOLERANCES[klass], checks, results, saved, tuple(notes)
    )
