"""Bounded reads of user text (a prompt on stdin, a perplexity text file): never more bytes than the
package could use, so a 10 MB prompt or ``/dev/zero`` is refused (or cut) before it fills memory.

The bound is :data:`BYTES_PER_TOKEN` bytes per token of the context: a text of ``context`` tokens
needs at most ``context × BYTES_PER_TOKEN`` bytes (ordinary text averages 3-5 bytes per token,
whitespace-heavy code under 20), so anything longer cannot fit and is refused before it is
tokenized.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import BinaryIO, Final

from stlm.errors import InvalidArgumentError

#: Bytes of text per token of context that a bounded read accepts.
BYTES_PER_TOKEN: Final = 256
#: The most bytes ``stlm perplexity`` reads of a text without ``--chunks`` (64 MiB).
MAX_TEXT_BYTES: Final = 64 << 20


def prompt_limit(context_length: int) -> int:
    """The most bytes of a prompt for a package of ``context_length`` tokens."""
    return context_length * BYTES_PER_TOKEN


def read_prompt_stream(stream: BinaryIO, context_length: int, *, name: str = "stdin") -> str:
    """All of ``stream`` as UTF-8 text, reading at most :func:`prompt_limit` + 1 bytes: a longer
    prompt cannot fit the context and is an :class:`InvalidArgumentError` before it is all read."""
    limit = prompt_limit(context_length)
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise InvalidArgumentError(
            f"the prompt on {name} is longer than {limit} bytes, more than the package's context of "
            f"{context_length} tokens can hold (at most {BYTES_PER_TOKEN} bytes per token are read)",
            fix=f"pass a prompt of at most {context_length} tokens",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{name} is not UTF-8 text ({exc})", fix="pass the prompt as UTF-8") from None


def read_text_prefix(path: Path, limit: int | None) -> tuple[str, bool]:
    """The UTF-8 text of ``path``: its first ``limit`` bytes (a character cut at the end is dropped)
    and whether the file went on beyond them; with ``limit`` None, at most :data:`MAX_TEXT_BYTES`
    (a longer file is an :class:`InvalidArgumentError`). OSError and bad UTF-8 propagate."""
    cap = MAX_TEXT_BYTES if limit is None else limit
    with open(path, "rb") as f:
        raw = f.read(cap + 1)
    more = len(raw) > cap
    if more and limit is None:
        raise InvalidArgumentError(
            f"text file {str(path)!r} is longer than {MAX_TEXT_BYTES >> 20} MiB",
            fix="pass --chunks N to score the first N chunks (only those are read), or a shorter text",
        )
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = decoder.decode(raw[:cap], final=not more)
    return text, more
