"""Constrained decoding (structured outputs) on llguidance: JSON, JSON Schema, regex, choice, Lark, GBNF.

A :class:`Constraint` is the request's description (validated when :class:`SamplingParams` is
built: a schema or grammar llguidance cannot compile is an :class:`InvalidArgumentError` naming
the construct). Each constrained sequence owns a :class:`ConstraintState`: before sampling,
:meth:`ConstraintState.mask` sets the logits of every token the grammar forbids to -inf (ids past
the tokenizer's vocabulary — the model's padded rows — included; EOS only when the grammar may
end); after sampling, :meth:`ConstraintState.advance` feeds the token to the matcher.
:func:`prepare_masks` computes the masks of many rows at once on llguidance's thread pool.

llguidance is the optional extra ``structured``; it is imported only when a constraint is used.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from stlm.errors import InvalidArgumentError, StlmError

if TYPE_CHECKING:
    from stlm.runtime.tokenizer import Tokenizer

__all__ = ["CONSTRAINT_KINDS", "Constraint", "ConstraintState", "masks_alongside", "prepare_masks"]

#: what a :class:`Constraint` may hold
CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "choice", "lark", "gbnf")
_INSTALL = "pip install 'stlm[structured]' (or: pip install llguidance)"
_MISSING = "constrained decoding needs llguidance, which is not installed"


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise StlmError(_MISSING, fix=_INSTALL) from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``kind`` is one of :data:`CONSTRAINT_KINDS`; ``spec`` is the
    JSON Schema (a dict or its JSON text), the regex, the Lark or GBNF grammar text, or for
    ``choice`` the list of allowed strings; ``json_object`` takes no spec (any JSON object)."""

    kind: str
    spec: Any = None

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidArgumentError(
                f"constraint kind {self.kind!r} is unknown: expected one of {', '.join(CONSTRAINT_KINDS)}",
                fix="use Constraint('json_schema', schema), Constraint('regex', r'...'), Constraint('choice', [...])",
            )
        spec = self.spec
        if self.kind == "choice":
            if isinstance(spec, str) or not isinstance(spec, list | tuple) or not spec:
                raise InvalidArgumentError(
                    f"choice constraint {spec!r:.80} is invalid: expected a non-empty list of strings",
                    fix='pass e.g. ["yes", "no"]',
                )
            if not all(isinstance(c, str) and c for c in spec):
                raise InvalidArgumentError(
                    f"choice constraint {spec!r:.80} holds an entry that is not a non-empty string",
                    fix="pass non-empty strings only",
                )
            object.__setattr__(self, "spec", tuple(spec))
        elif self.kind == "json_schema":
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except ValueError as exc:
                    raise InvalidArgumentError(
                        f"JSON schema is not valid JSON ({exc})", fix="pass the schema as a JSON object"
                    ) from None
            if not isinstance(spec, dict | bool):
                raise InvalidArgumentError(
                    f"JSON schema {spec!r:.80} is invalid: expected a JSON object", fix="pass the schema as an object"
                )
            object.__setattr__(self, "spec", json.dumps(spec, sort_keys=True))
        elif self.kind != "json_object" and (not isinstance(spec, str) or not spec):
            raise InvalidArgumentError(
                f"{self.kind} constraint {spec!r:.80} is invalid: expected a non-empty string",
                fix=f"pass the {self.kind} as text",
            )
        self.grammar()  # compile once now: a bad schema fails at parse time

    def grammar(self) -> str:
        """The llguidance grammar (validated; :class:`InvalidArgumentError` naming the construct)."""
        return _compiled(self)


# JSON without optional whitespace (as vLLM's guidance backend): compact, and a random model
# cannot spend its token budget on blanks
_COMPACT = {"whitespace_flexible": False}
_GRAMMARS: dict[Constraint, str] = {}
_GRAMMARS_LOCK = threading.Lock()
_MAX_CACHED = 256


def _compiled(c: Constraint) -> str:
    with _GRAMMARS_LOCK:
        found = _GRAMMARS.get(c)
    if found is not None:
        return found
    lg = _llguidance()
    m = lg.LLMatcher
    try:
        if c.kind == "json_object":
            grammar = m.grammar_from_json_schema({"type": "object"}, defaults=_COMPACT)
        elif c.kind == "json_schema":
            grammar = m.grammar_from_json_schema(c.spec, defaults=_COMPACT)
        elif c.kind == "regex":
            grammar = m.grammar_from_regex(c.spec)
        elif c.kind == "choice":
            grammar = m.grammar_from_regex("|".join(_regex_escape(x) for x in c.spec))
        elif c.kind == "lark":
            grammar = m.grammar_from_lark(c.spec)
        else:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = m.grammar_from_lark(gbnf_to_lark(c.spec))
    except (ValueError, RuntimeError, TypeError, KeyError, AssertionError) as exc:
        raise _not_compiled(c, str(exc)) from None
    problem = m.validate_grammar(grammar)
    if problem:
        raise _not_compiled(c, problem)
    with _GRAMMARS_LOCK:
        if len(_GRAMMARS) >= _MAX_CACHED:
            _GRAMMARS.clear()
        _GRAMMARS[c] = grammar
    return grammar


def _regex_escape(text: str) -> str:
    """``text`` as a literal in llguidance's (Rust ``regex``) syntax."""
    return "".join("\\" + ch if ch in r"\.+*?()|[]{}^$#&-~" else ch for ch in text)


def _not_compiled(c: Constraint, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"the {c.kind} constraint cannot be compiled: {why.strip()[:400]}",
        fix="remove or rewrite the construct named above (supported: see llguidance's JSON Schema and Lark docs)",
    )


_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _lltokenizer(tokenizer: Tokenizer, vocab: int, eos: tuple[int, ...]) -> Any:
    """llguidance's tokenizer for ``tokenizer`` (built once per tokenizer, vocab and EOS set: ~1 s)."""
    key = (vocab, eos)
    with _TOKENIZERS_LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        found = per.get(key)
        if found is None:
            lg = _llguidance()
            found = lg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab, eos_token=list(eos))
            per[key] = found
    return found


class ConstraintState:
    """One sequence's matcher: :meth:`mask` before sampling, :meth:`advance` after."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, vocab: int, eos: Sequence[int]) -> None:
        lg = _llguidance()
        self._lg = lg
        self.vocab = vocab
        self._tokenizer_vocab = min(tokenizer.vocab_size, vocab)
        self.matcher = lg.LLMatcher(_lltokenizer(tokenizer, vocab, tuple(eos)), constraint.grammar(), log_level=0)
        self._check()
        self._bits = lg.numpy.allocate_token_bitmask(1, vocab)
        self._ready = False  # _bits holds the mask of the current position

    def _check(self) -> None:
        if self.matcher.is_error():
            raise StlmError(f"the constraint failed: {self.matcher.get_error()[:400]}")

    @property
    def stopped(self) -> bool:
        """True when the grammar is complete and allows no further token (only EOS remains)."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete match."""
        return bool(self.matcher.is_accepting())

    def allowed(self) -> np.ndarray:
        """A (vocab,) bool array: True for the tokens the grammar allows next."""
        if not self._ready:
            self._lg.numpy.fill_next_token_bitmask(self.matcher, self._bits, 0)
            self._ready = True
        self._check()
        bits = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: self.vocab].astype(bool)
        bits[self._tokenizer_vocab :] = False
        return bits

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` (a copy) with every forbidden token at -inf."""
        return np.where(self.allowed(), logits, -np.inf).astype(logits.dtype, copy=False)

    def advance(self, token: int) -> None:
        """Feed the sampled ``token`` to the matcher."""
        self.matcher.consume_token(int(token))
        self._ready = False
        self._check()


_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


def prepare_masks(states: Sequence[ConstraintState]) -> None:
    """Compute the next-token masks of ``states`` at once, in parallel on llguidance's threads
    (the GIL is released meanwhile, so a forward pass may run alongside); optional: each state
    computes its own mask on demand otherwise."""
    todo = [s for s in states if not s._ready and not s.matcher.is_error() and not s.matcher.is_stopped()]
    if not todo:
        return
    global _EXECUTOR
    lg = todo[0]._lg
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = lg.LLExecutor()
        executor = _EXECUTOR
    width = max(s.vocab for s in todo)
    bits = lg.numpy.allocate_token_bitmask(len(todo), width)
    lg.numpy.fill_next_token_bitmask_par(executor, [(s.matcher, i) for i, s in enumerate(todo)], bits)
    for i, s in enumerate(todo):
        s._bits = bits[i : i + 1, : s._bits.shape[1]].copy()
        s._ready = True


T = TypeVar("T")


def masks_alongside(rows: Sequence[Any], forward: Callable[[], T]) -> T:
    """Run ``forward()`` while the next-token masks of the constrained, unfinished ``rows``
    (objects with ``constraint`` and ``finished``, e.g. :class:`~stlm.runtime.sequence.SequenceState`)
    are computed on another thread; returns ``forward()``'s result. Without constrained rows it
    is just ``forward()``."""
    states = [r.constraint for r in rows if r.constraint is not None and not r.finished]
    if not states:
        return forward()
    worker = threading.Thread(target=prepare_masks, args=(states,), daemon=True)
    worker.start()
    try:
        return forward()
    finally:
        worker.join()
