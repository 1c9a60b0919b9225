"""What ``stlm verify`` compares a package with: a :class:`Reference` run by transformers (fp32) on a
checkpoint, or one saved earlier as polygraphy RunResults JSON (``--save-reference``).

This module imports torch/transformers only when a checkpoint is the reference.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.quality.polygraphy_json import read_run_results, write_run_results
from stlm.quality.reference import load_reference_model
from stlm.support.staging import staged_file

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
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
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
    path = Path(path)
    check_reference_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged_file(path) as tmp:
            write_run_results(tmp, [(runner, [{LOGITS: x} for x in package_logits])], extra={REFERENCE_KEY: meta})
    except OSError as exc:
        raise InvalidArgumentError(
            f"could not write {path} ({exc})", fix="pass another --save-reference path"
        ) from None
    return path


def check_reference_path(path: Path) -> None:
    """Raise unless ``path`` can take a reference file: a new file in a folder we can write (or
    create), or a reference file written earlier. Checked before a verify run, not after it."""
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"{path} is a folder", fix="pass a file name for --save-reference, e.g. ref.json")
    here = path.parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir() or not os.access(here, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            f"cannot write {path}: {here} is not a folder this user can write to",
            fix="pass a --save-reference path in a writable folder",
        )
    if path.exists():
        try:
            _, extra = read_run_results(path)
        except InvalidArgumentError:
            extra = {}
        if REFERENCE_KEY not in extra:
            raise InvalidArgumentError(
                f"{path} exists and is not an stlm verify reference; it will not be replaced",
                fix="pass a new file name for --save-reference (or delete the file yourself)",
            )
