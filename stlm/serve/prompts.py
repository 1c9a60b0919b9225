"""Prompt text → token ids for the server, cheap to stop at the slot capacity.

The server only needs a prompt's ids when the prompt fits a slot, so it encodes with a copy of
the package tokenizer that truncates after ``limit`` ids: a 4 MB prompt then never becomes a
million-entry Python list (building and freeing one holds the GIL for a noticeable time, which
would stall the event loop even though encoding runs on a worker thread). ``encode_batch_fast``
(no offsets) releases the GIL while it works. For prompts shorter than ``limit`` the ids equal
:meth:`stlm.runtime.Generator.encode_prompt`'s (truncation only cuts the end).
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

from stlm.runtime.tokenizer import Tokenizer

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """``encode(prompts)``: ids per prompt, at most ``limit`` of them; '' starts from ``bos_id``."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int, limit: int) -> None:
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        backend.no_padding()
        backend.enable_truncation(max_length=limit)
        self._backend, self.bos_id, self.limit = backend, bos_id, limit
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Ids of each prompt; a prompt of ``limit`` ids may be longer (it was cut there)."""
        texts = [p for p in prompts if p]
        encoded = iter([e.ids for e in self._encode(texts, add_special_tokens=False)] if texts else [])
        return [next(encoded) if p else [self.bos_id] for p in prompts]
