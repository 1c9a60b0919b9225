"""The exact bytes of single tokens, and the text the OpenAI API shows for them.

A byte-level BPE token (GPT-NeoX) may hold part of a UTF-8 character, so decoding it alone
gives U+FFFD and two different tokens could show the same text. :class:`TokenTexts` recovers
each token's bytes from its vocabulary entry (GPT-2's byte ↔ unicode table; added tokens are
their content) and shows a token as its text when the bytes are valid UTF-8, else as OpenAI
does: ``bytes:\\xe2\\x80``. Tokenizers that are not byte-level fall back to the decoded text.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache

from stlm.runtime.tokenizer import Tokenizer

__all__ = ["TokenTexts", "byte_decoder"]


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's table from the printable characters of byte-level vocabulary entries to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type"), *(d.get("type") for d in decoder.get("decoders", []) or [])]
    return "ByteLevel" in kinds


class TokenTexts:
    """``bytes_of(id)`` and ``text_of(id)`` of single tokens, computed once per id (thread-safe)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[bytes, str]] = {}
        self._lock = threading.Lock()

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (b'' for ids the tokenizer does not know)."""
        return self._lookup(token_id)[0]

    def text_of(self, token_id: int) -> str:
        """The token as text, or ``bytes:\\xNN...`` when its bytes are not valid UTF-8."""
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[bytes, str]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._compute(token_id)
            with self._lock:
                self._cache[token_id] = found
        return found

    def _compute(self, token_id: int) -> tuple[bytes, str]:
        if token_id in self._added:
            data = self._added[token_id].encode("utf-8")
        else:
            entry = self.tokenizer.backend.id_to_token(token_id)
            table = byte_decoder()
            if entry is None:
                data = b""
            elif self._byte_level and all(c in table for c in entry):
                data = bytes(table[c] for c in entry)
            else:
                data = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        try:
            return data, data.decode("utf-8")
        except UnicodeDecodeError:
            return data, "bytes:" + "".join(f"\\x{b:02x}" for b in data)
