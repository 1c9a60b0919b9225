"""What the scheduler runs and hands back: :class:`Job` (one sequence and its sink) and
:class:`StepOutput` (what one step produced for it), and the scheduler's refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from stlm.errors import StlmError
from stlm.runtime.logprobs import TokenLogprob
from stlm.runtime.sequence import Completion, SequenceState

__all__ = ["Job", "QueueFullError", "SchedulerStoppedError", "Sink", "StepOutput"]


class _Waker(Protocol):
    def wake(self) -> None: ...


class QueueFullError(StlmError):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""


class SchedulerStoppedError(StlmError):
    """The scheduler is draining or has stopped; no new work is accepted (HTTP 503)."""


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one sequence.

    ``text`` became final this step (possibly ''), ``token_ids``/``logprobs``/``top_logprobs``
    are the tokens sampled this step (EOS is not listed). The last output of a sequence has
    ``finish_reason`` ('eos', 'stop', 'length', 'cancelled' or 'error') and, unless it failed, its
    ``completion``. ``prompt_logprobs`` (prompt tokens 1..T-1 scored, for a job that asked) comes
    with the first output after the prompt.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str | None = None
    completion: Completion | None = None
    error: str | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


Sink = Callable[[StepOutput], None]


class Job:
    """One sequence submitted to the scheduler: its decoding state and where its output goes."""

    def __init__(self, state: SequenceState, sink: Sink, *, tag: str = "", prompt_logprobs: int | None = None) -> None:
        self.state = state
        self.sink = sink
        self.tag = tag
        self.prompt_logprobs = prompt_logprobs  # alternatives per prompt position; None: not scored
        self.scored: list[TokenLogprob] = []  # prompt positions scored so far
        self.submitted = time.monotonic()
        # monotonic times of the sequence's phases (metrics and traces): a cache slot, the first and
        # latest sampled token, the end
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finished_at: float | None = None
        self.fed = 0  # prompt tokens already in the cache
        self.done = False
        self._cancelled = threading.Event()
        self._scheduler: _Waker | None = None

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to finish this sequence at its next step (no-op once done)."""
        if not self.done and not self._cancelled.is_set():
            self._cancelled.set()
            if self._scheduler is not None:
                self._scheduler.wake()
