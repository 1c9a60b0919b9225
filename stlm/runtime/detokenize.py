"""Streaming detokenization: token ids in, text out, one token at a time.

Byte-level BPE tokens are byte strings; one character can span several tokens, and a single
token can decode to U+FFFD ("�") because it ends in the middle of a UTF-8 sequence. Decoding
each token alone would therefore print garbage, and decoding everything after each token costs
O(length). :class:`IncrementalDetokenizer` uses the usual prefix/read offset technique instead:
it decodes a short window of recent tokens, diffs it against the text already produced, and
releases only text that can no longer change.

Why a held-back U+FFFD is the only text that may still change: the tokenizer decodes the bytes
of the window with lossy UTF-8 decoding, where appending bytes can only complete (or
invalidate) the *last*, still incomplete sequence, which decodes to exactly one trailing
U+FFFD. So everything except a trailing U+FFFD is final and is released at once; a trailing
U+FFFD is released when a later token shows it was real (the text goes on past it) or at
:meth:`IncrementalDetokenizer.flush`. A genuine U+FFFD therefore always comes through.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from stlm.errors import InvalidArgumentError
from stlm.runtime.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded with the first generated tokens (context for tokenizers whose decoder
# depends on what precedes a token, e.g. SentencePiece's leading-space rule).
_CONTEXT_TOKENS = 4
# Once this many tokens wait behind a trailing U+FFFD (a run of U+FFFD or broken bytes), look
# for a character boundary inside the window so it stays short.
_MAX_PENDING = 8


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into a stream of text pieces.

    The concatenation of every :meth:`push` result and the :meth:`flush` result equals
    ``tokenizer.decode(generated_ids)`` (``skip_special_tokens=True``); no piece contains half
    of a character; a piece is never revised. With ``prompt_ids`` the last few prompt tokens
    are decoded as context (they are not emitted); a prompt whose text ends in U+FFFD (cut in
    the middle of a character) is not used as context. Each push costs O(1) decode work.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, *, skip_special_tokens: bool = True
    ) -> None:
        """Start a stream; ``prompt_ids`` (optional) give the decoder its left context;
        ``skip_special_tokens=False`` keeps special tokens in the text."""
        self._decode = functools.partial(tokenizer.backend.decode, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []  # the window: context tokens, then unreleased tokens
        self._read = 0  # window[:read] is context whose text was released (or is the prompt)
        self._done = 0  # chars of decode(window) already released or belonging to the context
        self._finished = False
        if prompt_ids is not None and len(prompt_ids) > 0:
            context = [_check_token(t) for t in prompt_ids[-_CONTEXT_TOKENS:]]
            text = self._decode(context)
            if text and not text.endswith(_REPLACEMENT):
                self._ids, self._read, self._done = context, len(context), len(text)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (possibly "")."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.push() after flush(); start a new one")
        ids = self._ids
        ids.append(_check_token(token_id))
        text = self._decode(ids)
        if text.endswith(_REPLACEMENT):
            end = len(text) - 1
            piece = text[self._done : end] if end > self._done else ""
            self._done = max(self._done, end)
            if len(ids) - self._read > _MAX_PENDING:
                self._rebase(text)
            return piece
        piece = text[self._done :]
        # The window ends on a character boundary: the tokens from ``read`` on become the
        # context of the next window and the older context is dropped.
        self._ids = ids[self._read :]
        self._read = len(self._ids)
        self._done = len(self._decode(self._ids))
        return piece

    def flush(self) -> str:
        """End the stream: return the text still held back (at most one U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode(self._ids)
        return text[self._done :]

    def _rebase(self, text: str) -> None:
        """Restart the window at a recent token boundary that is a character boundary.

        A boundary ``k`` qualifies when ``decode(ids[:k]) + decode(ids[k:]) == text`` with
        ``ids[k:]`` decoding to at least one character: lossy UTF-8 decoding then treats the
        bytes after ``k`` the same with or without the bytes before, whatever comes later.
        """
        ids = self._ids
        for k in range(len(ids) - 1, max(self._read, len(ids) - 1 - _MAX_PENDING), -1):
            tail = self._decode(ids[k:])
            head = self._decode(ids[:k])
            if tail and head + tail == text and len(head) <= self._done:
                self._ids = ids[k:]
                self._read = 0
                self._done -= len(head)
                return


def _check_token(token_id: object) -> int:
    """A token id as a plain int >= 0, or an InvalidArgumentError naming it."""
    if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
        raise InvalidArgumentError(
            f"token id {token_id!r} is a {type(token_id).__name__}, expected an int >= 0",
            fix="push integer token ids (e.g. int(next_token))",
        )
    value = int(token_id.__index__())
    if value < 0:
        raise InvalidArgumentError(
            f"token id {value} is negative, expected an int >= 0",
            fix="push token ids produced by the model",
        )
    return value
