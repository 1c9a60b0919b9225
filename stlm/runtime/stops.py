"""Stop strings on a text stream: cut the output at the first stop string, across pieces.

Rule: generation stops at the stop-string occurrence with the **earliest start** in the
generated text; among stop strings starting at the same place the result is the same (the text
before it). The result does not depend on how the text is split into pieces: text that could
still be the start of a stop string is held back until it is ruled out, and a completed match
is only acted on once no stop string starting *earlier* can still complete (with stops
``("abcd", "bc")`` and text ``"abc"`` the matcher waits for one more character). If the stream
ends first (end of sequence, token limit), :meth:`StopMatcher.finish` cuts at the earliest
completed match, if any, and releases the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from stlm.errors import InvalidArgumentError

__all__ = ["StopMatcher"]


class StopMatcher:
    """Incremental stop-string search over the pieces of a text stream.

    Each :meth:`feed` does O(max stop length + piece length) work per stop string: only the
    held-back tail (shorter than the longest stop string, unless a match is pending) is searched.
    """

    def __init__(self, stop: Sequence[str] = (), *, include: bool = False) -> None:
        """``stop``: the stop strings (non-empty str); an empty sequence never stops. With
        ``include`` the stop string itself is kept at the end of the text (vLLM's
        ``include_stop_str_in_output``)."""
        self._include = include
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple):
            raise InvalidArgumentError(
                f"stop={stop!r} is invalid: expected a list or tuple of non-empty str",
                fix='pass e.g. stop=("\\n\\n", "User:")',
            )
        for item in stop:
            if not isinstance(item, str) or not item:
                raise InvalidArgumentError(
                    f"stop={stop!r} is invalid: the entry {item!r} is not a non-empty str "
                    "(expected a list or tuple of non-empty str)",
                    fix='pass non-empty strings only, e.g. stop=("\\n\\n", "User:")',
                )
        self._stops = tuple(dict.fromkeys(stop))  # drop duplicates, keep order
        self._firsts = frozenset(s[0] for s in self._stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._stopped = False
        self._matched: str | None = None

    @property
    def stop(self) -> tuple[str, ...]:
        """The stop strings (duplicates removed)."""
        return self._stops

    @property
    def stopped(self) -> bool:
        """True once a stop string was found (by :meth:`feed` or :meth:`finish`)."""
        return self._stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream (the longest at the cut), or None."""
        return self._matched

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add the next piece of text; return ``(text safe to emit now, stopped)``.

        Once stopped, further pieces are ignored and ``("", True)`` is returned.
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return piece, False
        held = self._held + piece
        if not any(c in held for c in self._firsts):  # fast path: nothing can start here
            self._held = ""
            return held, False
        match = self._earliest_match(held)
        pending = self._earliest_pending(held, len(held) if match is None else match[0])
        if match is not None and pending is None:
            return self._stop_at(held, match)
        cut = len(held) if pending is None else pending
        self._held = held[cut:]
        return held[:cut], False

    def finish(self) -> str:
        """The stream ended for another reason: return the held text (cut at a stop if any).

        A stop string may have completed while an earlier-starting one was still possible; then
        the text is cut there and :attr:`stopped` turns True (report finish reason "stop").
        """
        if self._stopped:
            return ""
        held, self._held = self._held, ""
        match = self._earliest_match(held)
        if match is not None:
            return self._stop_at(held, match)[0]
        return held

    def _stop_at(self, held: str, match: tuple[int, str]) -> tuple[str, bool]:
        self._stopped, self._matched, self._held = True, match[1], ""
        return held[: match[0] + (len(match[1]) if self._include else 0)], True

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the earliest complete occurrence; the longest stop on ties."""
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def _earliest_pending(self, text: str, before: int) -> int | None:
        """Earliest start < ``before`` of a suffix of ``text`` that is a proper stop prefix."""
        n = len(text)
        for i in range(max(0, n - self._longest + 1), min(before, n)):
            if text[i] in self._firsts:
                tail = text[i:]
                if any(len(s) > len(tail) and s.startswith(tail) for s in self._stops):
                    return i
        return None
