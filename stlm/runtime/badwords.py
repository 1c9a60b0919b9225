"""vLLM's ``bad_words``: words the output never contains, as token sequences.

Each word is tokenized as written (leading spaces stripped) and with one leading space (the
form it takes inside a text), the second kept only when it is a different token sequence of the
same length, as vLLM does. A one-token word is always forbidden; for a longer one the last token
is forbidden whenever the generated ids end with the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stlm.runtime.tokenizer import Tokenizer

__all__ = ["BadWords"]


class BadWords:
    """The token sequences of ``words``; :meth:`forbidden` gives the ids to ban next."""

    def __init__(self, words: Sequence[str], tokenizer: Tokenizer) -> None:
        sequences: list[tuple[int, ...]] = []
        for word in words:
            plain = tuple(tokenizer.encode(word.lstrip()))
            spaced = tuple(tokenizer.encode(" " + word.lstrip()))
            if plain:
                sequences.append(plain)
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                sequences.append(spaced)
        self.sequences = tuple(dict.fromkeys(sequences))

    def forbidden(self, generated: Sequence[int]) -> list[int]:
        """The token ids that would complete a bad word after ``generated``."""
        out = []
        for seq in self.sequences:
            head = seq[:-1]
            if not head or (len(generated) >= len(head) and tuple(generated[len(generated) - len(head) :]) == head):
                out.append(seq[-1])
        return out

    def apply(self, logits: np.ndarray, generated: Sequence[int]) -> np.ndarray:
        """``logits`` with the forbidden ids at -inf (a copy when any is)."""
        ids = [i for i in self.forbidden(generated) if i < logits.shape[-1]]
        if not ids:
            return logits
        x = np.array(logits, copy=True)
        x[ids] = -np.inf
        return x
