"""One sequence's decoding state: sampling, detokenization, stop strings, finish reason.

Shared by the batch generator and the server's continuous batcher: the caller runs the model and
hands each sequence its row of logits; the sequence picks the next token and the text to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.runtime.badwords import BadWords
from stlm.runtime.constraints import ConstraintState
from stlm.runtime.detokenize import IncrementalDetokenizer
from stlm.runtime.logprobs import TokenLogprob, token_logprob
from stlm.runtime.processors import apply_logit_bias, apply_presence_frequency
from stlm.runtime.sampling import SamplingParams, apply_repetition_penalty, make_rng, sample_token
from stlm.runtime.stops import StopMatcher
from stlm.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class Completion:
    """One finished sequence. ``finish_reason``: 'eos', 'stop' (a stop string), 'length', 'cancelled'.

    With ``params.logprobs``: ``logprobs[i]`` is the log-probability of ``token_ids[i]`` and
    ``top_logprobs[i]`` its ``params.top_logprobs`` alternatives ``(id, logprob)`` (see
    :mod:`stlm.runtime.logprobs`).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


class ContextLengthError(InvalidArgumentError):
    """A prompt, plus the tokens asked for, does not fit the context; ``param`` names the culprit."""

    def __init__(self, problem: str, *, fix: str, param: Literal["prompt", "max_tokens"]) -> None:
        super().__init__(problem, fix=fix)
        self.param = param


def check_fits(
    prompt_tokens: int,
    max_new_tokens: int,
    context: int,
    *,
    where: str = "the prompt",
    max_tokens_name: str = "max_new_tokens",
) -> None:
    """:class:`ContextLengthError` unless ``prompt_tokens`` + ``max_new_tokens`` fit ``context``
    tokens (the one place this is checked: generator, scheduler, server). A prompt that asks for
    new tokens must leave room for at least one."""
    if prompt_tokens > context - (1 if max_new_tokens else 0):
        below = "fewer than " if max_new_tokens else "at most "
        raise ContextLengthError(
            f"{where} has {prompt_tokens} tokens; the context is {context} tokens",
            fix=f"shorten it to {below}{context} tokens",
            param="prompt",
        )
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(
            f"{max_tokens_name}={max_new_tokens} after {where} of {prompt_tokens} tokens exceeds the context "
            f"of {context} tokens",
            fix=f"pass {max_tokens_name} ≤ {context - prompt_tokens}, or shorten the prompt",
            param="max_tokens",
        )


def truncate_prompt(prompt: list[int], params: SamplingParams) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the last k prompt ids (all when unset or shorter)."""
    k = params.truncate_prompt_tokens
    return prompt[-k:] if k is not None and len(prompt) > k else prompt


class SequenceState:
    """Decoding state of one prompt; feed it logits with :meth:`step` until :attr:`finished`."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        eos_token_id: int | Sequence[int],
        vocab: int | None = None,
    ) -> None:
        """``eos_token_id``: the package's EOS id or its full EOS set; ``vocab``: the logits'
        width (needed up front by a ``params.constraint``; else taken from the first logits)."""
        prompt = truncate_prompt(prompt, params)
        self.prompt = prompt
        self.params = params
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        self.eos_token_id = eos[0]
        self.eos_token_ids = frozenset(eos)
        self._eos = eos
        self.rng = make_rng(params.seed)
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self._counts: np.ndarray | None = None  # generated tokens per id (presence/frequency penalties)
        self.finish_reason: str | None = None
        self._text: list[str] = []
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=params.skip_special_tokens)
        self._stops = StopMatcher(params.stop, include=params.include_stop_str_in_output)
        self._bad = BadWords(params.bad_words, tokenizer) if params.bad_words else None
        self.constraint: ConstraintState | None = None
        if params.constraint is not None and vocab is not None:
            self.constraint = ConstraintState(params.constraint, tokenizer, vocab, eos)
        # ids that end the sequence, forbidden before min_tokens (vLLM: EOS unless ignore_eos, stop_token_ids)
        self._enders = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids))
        # prompt + generated ids, for the repetition penalty (a view of it is passed per step)
        self._seen = np.zeros(len(prompt) + params.max_new_tokens, dtype=np.int64)
        self._seen[: len(prompt)] = prompt
        self._n_seen = len(prompt)

    @property
    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        """The token to feed the model next (valid while not finished)."""
        return self.generated[-1]

    def step(self, logits: np.ndarray) -> str:
        """Choose the next token from ``logits`` (vocab,) and return the text that became final."""
        assert not self.finished
        p = self.params
        if p.constraint is not None and self.constraint is None:
            self.constraint = ConstraintState(p.constraint, self._tokenizer, np.shape(logits)[-1], self._eos)
        if self.constraint is not None and self.constraint.stopped:
            return self._close("eos")  # the grammar is complete: only EOS may follow
        processed = self._processed(logits)
        x = self._masked(processed)
        # nothing allowed (a grammar end that min_tokens forbids): only a mask can do that, and NaN
        # logits go on to sampling, which refuses them; unmasked rows skip the two vocab scans
        if x is not processed and not np.isfinite(x).any() and not np.isnan(x).any():
            return self._close("stop")
        penalised = p.repetition_penalty != 1.0
        token, _ = sample_token(x, p, self.rng, self._seen[: self._n_seen] if penalised else None)
        if token in self.eos_token_ids and not p.ignore_eos:
            return self._close("eos")
        if p.logprobs:
            entry = self._logprob(logits, x, token)
            self.logprobs.append(entry.logprob)
            self.top_logprobs.append(entry.top)
        self._record(token)
        if token in p.stop_token_ids:
            shown = self._emit(self._detok.push(token)) if p.include_stop_str_in_output else ""
            return shown + self._close("stop")
        shown = self._emit(self._detok.push(token))
        if not self.finished and len(self.generated) >= self.params.max_new_tokens:
            shown += self._close("length")
        return shown

    def _record(self, token: int) -> None:
        self.generated.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        self._seen[self._n_seen] = token
        self._n_seen += 1
        if self.constraint is not None:
            self.constraint.advance(token)

    def _masked(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the tokens min_tokens, bad_words and the constraint forbid at -inf."""
        p = self.params
        if self._bad is not None:
            x = self._bad.apply(x, self.generated)
        if len(self.generated) < p.min_tokens and self._enders:
            x = np.array(x, copy=True)
            x[[i for i in self._enders if i < x.shape[-1]]] = -np.inf
        if self.constraint is not None:
            x = self.constraint.mask(x)
        return x

    def _processed(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` after ``logit_bias`` and the presence/frequency penalties (itself when unset)."""
        p = self.params
        x = apply_logit_bias(logits, p.logit_bias) if p.logit_bias else logits
        if p.presence_penalty or p.frequency_penalty:
            if self._counts is None:
                self._counts = np.zeros(np.shape(logits)[-1], dtype=np.int64)
            x = apply_presence_frequency(x, self._counts, p.presence_penalty, p.frequency_penalty)
        return x

    def _logprob(self, raw: np.ndarray, processed: np.ndarray, token: int) -> TokenLogprob:
        """The reported log-probability of ``token``: from ``raw`` logits, or (mode 'processed')
        after bias, penalties and temperature, before truncation."""
        p = self.params
        if p.logprobs_mode == "raw":
            return token_logprob(raw, token, p.top_logprobs)
        x = processed
        if p.repetition_penalty != 1.0:
            x = apply_repetition_penalty(x, self._seen[: self._n_seen], p.repetition_penalty)
        if p.temperature > 0.0:
            x = np.asarray(x, dtype=np.float64) / p.temperature
        return token_logprob(x, token, p.top_logprobs)

    def cancel(self) -> str:
        """Finish now (reason 'cancelled'); returns the held-back text."""
        return "" if self.finished else self._close("cancelled")

    def completion(self) -> Completion:
        """The result of a finished sequence."""
        assert self.finish_reason is not None
        return Completion(
            "".join(self._text),
            tuple(self.generated),
            self.finish_reason,
            len(self.prompt),
            tuple(self.logprobs) if self.params.logprobs else None,
            tuple(self.top_logprobs) if self.params.logprobs else None,
        )

    def _emit(self, piece: str) -> str:
        if len(self.generated) <= self.params.min_tokens:  # vLLM: no stop strings until past min_tokens
            self._text.append(piece)
            return piece
        shown, stopped = self._stops.feed(piece)
        if stopped:
            self.finish_reason = "stop"
        self._text.append(shown)
        return shown

    def _close(self, reason: str) -> str:
        shown = self._emit(self._detok.flush())
        if not self.finished:
            tail = self._stops.finish()
            self.finish_reason = "stop" if self._stops.stopped else reason
            self._text.append(tail)
            shown += tail
        return shown
