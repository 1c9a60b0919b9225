"""The text ↔ token-id boundary of the runtime: a thin, typed wrapper over ``tokenizers``.

StableLM-3B-4E1T uses the GPT-NeoX-20B byte-level BPE tokenizer (``tokenizer.json``). This
wrapper reproduces what transformers does with that file, without importing transformers:

* :meth:`Tokenizer.encode` adds **no** special tokens. transformers' ``GPTNeoXTokenizer`` (the
  class ``GPTNeoXTokenizerFast`` names in transformers 5) defaults to ``add_bos_token=False`` and
  ``add_eos_token=False``, so its default ``tok.encode(text)`` and ``tok(text)["input_ids"]`` equal
  ``tok.encode(text, add_special_tokens=False)``; StableLM prompts start without a BOS token.
  Calling the backend with ``add_special_tokens=False`` keeps that true even for a
  ``tokenizer.json`` whose post-processor would add one.
* :meth:`Tokenizer.decode` equals ``tok.decode(ids, skip_special_tokens=...)``:
  ``clean_up_tokenization_spaces`` is off for this tokenizer, so the backend's decode is the
  whole story. The backend ignores ids it does not know (for example the padding rows of the
  model's 50304-row embedding beyond the tokenizer's 50281 entries).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers

from stlm.errors import InvalidArgumentError, PackageError

__all__ = ["Tokenizer"]


class Tokenizer:
    """A loaded ``tokenizer.json``: encode text to ids and decode ids to text."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        """Wrap an already-built ``tokenizers.Tokenizer`` (prefer :meth:`from_file`)."""
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``; raise :class:`PackageError` if it is missing or corrupt."""
        file = Path(path)
        if not file.is_file():
            state = "is a folder" if file.is_dir() else "does not exist"
            raise PackageError(
                f"tokenizer file {str(file)!r} {state} (expected a tokenizer.json file)",
                fix="point to the package's tokenizer.json, or re-run the export that writes it",
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the backend raises a bare Exception on bad JSON
            raise PackageError(
                f"tokenizer file {str(file)!r} could not be read as a tokenizer.json: {exc}",
                fix="the file is corrupt or not a Hugging Face tokenizers file; re-export the package",
            ) from exc
        return cls(backend)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (50281 for GPT-NeoX-20B).

        The model's embedding may have more rows (StableLM pads to 50304); those ids decode to "".
        """
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens (dropped by ``decode(..., skip_special_tokens=True)``)."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (byte-level form, e.g. ``"Ġthe"``), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (byte-level form), or None for an unknown id."""
        return self._backend.id_to_token(_check_id(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added (see the module docstring)."""
        if not isinstance(text, str):
            raise InvalidArgumentError(
                f"text to encode is {type(text).__name__} {text!r:.60}, expected a str",
                fix="pass the prompt as a Python str (decode bytes with .decode('utf-8') first)",
            )
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # a str the Rust side cannot take: lone surrogates
            raise _not_unicode(text) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for several texts (encoded in parallel by the backend)."""
        if isinstance(texts, str):
            raise InvalidArgumentError(
                f"encode_batch got a single str {texts!r:.60}, expected a sequence of str",
                fix="use encode(text) for one text, or pass a list of texts",
            )
        batch = list(texts)
        for text in batch:
            if not isinstance(text, str):
                raise InvalidArgumentError(
                    f"text to encode is {type(text).__name__} {text!r:.60}, expected a str",
                    fix="pass every prompt as a Python str",
                )
        try:
            return [e.ids for e in self._backend.encode_batch(batch, add_special_tokens=False)]
        except TypeError:
            raise _not_unicode(next((t for t in batch if _has_surrogate(t)), "")) from None

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; equals transformers' ``decode(ids, skip_special_tokens=...)``."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise InvalidArgumentError(
                    f"ids to decode are an array of shape {ids.shape} and dtype {ids.dtype}, "
                    "expected a 1-D integer array",
                    fix="pass one sequence of token ids (one row of a batch)",
                )
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= _MAX_ID):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise InvalidArgumentError(
                    f"ids to decode contain the id {bad}, expected ids from 0 to {_MAX_ID - 1}",
                    fix="pass token ids produced by the model or by encode()",
                )
            id_list = ids.tolist()
        else:
            id_list = [_check_id(i) for i in ids]
        return self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _not_unicode(text: str) -> InvalidArgumentError:
    where = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
    at = f" (a lone surrogate {text[where]!r} at index {where})" if where is not None else ""
    return InvalidArgumentError(
        f"text to encode is not valid Unicode{at}",
        fix="pass well-formed text (decode bytes with .decode('utf-8', errors='replace'))",
    )


_MAX_ID = 2**32  # the tokenizers library stores ids as u32


def _check_id(token_id: object) -> int:
    """One token id as a Python int >= 0, or an InvalidArgumentError naming it."""
    if isinstance(token_id, bool) or not isinstance(token_id, int | np.integer):
        raise InvalidArgumentError(
            f"token id {token_id!r} is a {type(token_id).__name__}, expected an int >= 0",
            fix="pass integer token ids",
        )
    value = int(token_id)
    if not 0 <= value < _MAX_ID:
        raise InvalidArgumentError(
            f"token id {value} is out of range, expected an int from 0 to {_MAX_ID - 1}",
            fix="pass token ids produced by the model or by encode()",
        )
    return value
