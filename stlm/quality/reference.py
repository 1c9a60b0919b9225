"""transformers' ``StableLmForCausalLM`` in fp32: the independent model that ``stlm verify CHECKPOINT``
and ``stlm perplexity --reference CHECKPOINT`` compare packages with (needs the reference extra).

Loaded from the checkpoint's safetensors only (no pickle, no remote code); torch and transformers
are imported only when called.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stlm.errors import CheckpointError
from stlm.package.config import load_model_config
from stlm.support.extras import require_extra


def load_reference_model(checkpoint: str | Path, *, feature: str) -> Any:
    """The checkpoint's model in fp32, in eval mode; ``feature`` names what needs it in the missing-extra error."""
    require_extra("reference", feature=feature)
    import torch
    from transformers import StableLmForCausalLM
    from transformers.utils import logging as hf_logging

    from stlm.package.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint)
    load_model_config(folder)  # a clear error for a non-StableLM before transformers tries
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return StableLmForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"transformers cannot load {folder} ({type(exc).__name__}: {str(exc)[:300]})",
            fix="pass a StableLM checkpoint folder with config.json and *.safetensors",
        ) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()


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
