"""What ``stlm verify`` compares a package with: a :class:`Reference` run by transformers (fp32) on a
checkpoint, or one saved earlier as polygraphy RunResults JSON (``--save-reference``).

This module imports torch/transformers only when a checkpoint is the reference.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.polygraphy_json import read_run_results, write_run_results
from stlm.reference_model import load_reference_model

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


def transformers_reference(checkpoint: str | Path, prompts: Sequence[Sequence[int]], steps: int) -> Reference:
    """Greedy runs of transformers' StableLmForCausalLM in fp32 (safetensors only, no remote code)."""
    model = load_reference_model(checkpoint, feature="verifying against a checkpoint (transformers runs the reference)")
    import torch  # after the extra check: without it, the error names the extra

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
        saved_class = str(meta["accuracy_class"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{path} has a malformed stlm verify record ({exc!r})", fix=TWO_STEP_FIX) from None
    if not (len(prompts) == len(tokens) == len(logits)) or any(
        len(t) != len(x) for t, x in zip(tokens, logits, strict=True)
    ):
        raise InvalidArgumentError(f"{path}: prompts, tokens and logits disagree in number", fix=TWO_STEP_FIX)
    return Reference(
        f"reference {path} (runner {name}, {meta.get('source', '?')})", saved_class, prompts, tokens, logits
    )


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
