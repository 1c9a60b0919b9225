"""transformers as the base model of ``stlm perplexity --reference CHECKPOINT`` (needs the reference extra).

The only module of :mod:`stlm.quality` that imports torch and transformers, and only when called:
``StableLmForCausalLM`` in fp32 from the checkpoint's safetensors (no remote code).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stlm.errors import CheckpointError
from stlm.extras import require_extra

LogitsSource = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


def transformers_logits(checkpoint: str | Path) -> tuple[LogitsSource, Callable[[], None]]:
    """A function giving transformers' fp32 logits at every position of each sequence, and one freeing the model."""
    require_extra("reference", feature="--reference (transformers computes the base logits)")
    import torch
    from transformers import StableLmForCausalLM
    from transformers.utils import logging as hf_logging

    from stlm.config import load_model_config
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
    holder = [model]

    def run(sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        with torch.no_grad():
            return [holder[0](input_ids=torch.tensor([list(s)])).logits[0].float().numpy() for s in sequences]

    def close() -> None:
        holder.clear()
        gc.collect()

    return run, close
