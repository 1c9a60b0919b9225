"""transformers as the base model of ``stlm perplexity --reference CHECKPOINT`` (needs the reference extra).

The only module of :mod:`stlm.quality` that imports torch and transformers, and only when called:
``StableLmForCausalLM`` in fp32 from the checkpoint's safetensors (no remote code).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stlm.reference_model import load_reference_model

LogitsSource = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


def transformers_logits(checkpoint: str | Path) -> tuple[LogitsSource, Callable[[], None]]:
    """A function giving transformers' fp32 logits at every position of each sequence, and one freeing the model."""
    model = load_reference_model(checkpoint, feature="--reference (transformers computes the base logits)")
    import torch  # after the extra check: without it, the error names the extra

    holder = [model]

    def run(sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        with torch.no_grad():
            return [holder[0](input_ids=torch.tensor([list(s)])).logits[0].float().numpy() for s in sequences]

    def close() -> None:
        holder.clear()
        gc.collect()

    return run, close
