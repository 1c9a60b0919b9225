"""The one decoding engine: a KV cache of fixed slots and the step that runs every sequence in it.

The server's continuous batching runs it on a thread (:class:`stlm.serve.scheduler.Scheduler`:
a queue, a lock and a loop around :meth:`Engine.admit` / :meth:`Engine.step`); ``Generator.
generate/stream/complete`` run it synchronously (:meth:`Engine.steps`), one slot per prompt. Both
therefore share prefill chunking, sampling, stops, log-probabilities and cancellation.

Each :meth:`Engine.step`:

1. cancelled sequences are finished and their slot released;
2. (:meth:`Engine.admit`, called before) waiting sequences take the free slots, oldest first;
3. one ``backend.forward`` call feeds every slot its tokens: a joining sequence its next prompt
   chunk (at most ``prefill_chunk`` tokens, so a long prompt does not stall the others for
   long), a decoding sequence its last sampled token, an empty slot nothing (the backend pads
   rows to the longest feed, so when that padding would more than double the work, prompt
   chunks and decode tokens go to two calls in the same step: see :meth:`Engine._forward_step`);
4. every row whose prompt is complete samples its next token (its own :class:`SequenceState`:
   sampling parameters, seed, stop strings) and hands the new text to its sink;
5. finished rows are released (``backend.release``) and their slots are free for the next step.

A job that asks for its prompt's log-probabilities (``Job(prompt_logprobs=N)``, for ``echo``)
has its prompt chunks run in a separate ``forward_all`` call that returns the logits of every
fed position; each chunk is scored at once (:func:`stlm.runtime.logprobs.prompt_logprobs`) and
only the scores are kept, which reach the sink with the job's first sampled token.

Rows never influence each other: a request's greedy output is the same alone or in any batch
(a row's prompt is always cut into the same chunks, whatever else runs). With ``isolate`` (the
server) an exception while sampling one row fails only that sequence and a failed batched
forward is retried row by row so only the rows that fail alone are failed; without it
(``Generator``) the exception reaches the caller. Sinks are called on the engine's thread and
must not block.

Extension points (methods of :class:`Engine`; override or fill them in, the step calls them):

- :meth:`Engine.reuse_prefix` -- prefix reuse at admission: how many prompt tokens of a job
  the slot already holds (default 0); the step then feeds the prompt from there.
- :meth:`Engine.decode_feed` -- the tokens a decoding row feeds (default its last sampled
  token). Speculative verify returns the last token plus k drafted ones; such rows need the
  logits of all k+1 positions: route them like scored prompt chunks (``forward_all``, see
  :meth:`Engine._forward_scored`) and accept/reject in the row's state.
- :meth:`Engine.row_logits` -- the per-row token-mask hook, applied to a row's logits just
  before it samples (constrained decoding itself lives in ``SequenceState``; ``state.step(
  logits)`` remains the one place a row samples).
- :meth:`Engine._call` -- the only place the backend runs; ``Job.adapter`` (the per-row
  adapter index) is passed from here once ``backend.forward`` takes one (see :meth:`adapters`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError, StlmError
from stlm.runtime.backend import Backend
from stlm.runtime.constraints import masks_alongside
from stlm.runtime.engine_metrics import EngineMetrics, NoMetrics
from stlm.runtime.forwarding import by_row, forward_all
from stlm.runtime.jobs import Job, StepOutput
from stlm.runtime.logprobs import prompt_logprobs

__all__ = ["Engine"]

log = logging.getLogger(__name__)

Feed = list[list[int]]
Failures = dict[int, Exception]


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(
            f"{name}={value!r} is invalid: expected an int >= {minimum}",
            fix=f"pass {name} as a whole number >= {minimum}",
        )
    return value


class Engine:
    """Runs :class:`Job`\\ s over ``max_batch`` cache slots of ``capacity`` tokens (not thread-safe:
    one thread steps it; :attr:`waiting` may be appended to under the caller's lock)."""

    def __init__(
        self,
        backend: Backend[Any],
        *,
        max_batch: int,
        capacity: int,
        prefill_chunk: int,
        metrics: EngineMetrics | None = None,
        isolate: bool = True,
    ) -> None:
        self.backend = backend
        self.max_batch = _positive("max_batch", max_batch)
        self.capacity = _positive("capacity", capacity, 2)
        self.prefill_chunk = _positive("prefill_chunk", prefill_chunk)
        self.metrics: EngineMetrics = metrics or NoMetrics()
        self.isolate = isolate
        self.cache = backend.new_cache(self.max_batch, self.capacity)
        self.slots: list[Job | None] = [None] * self.max_batch
        self.waiting: deque[Job] = deque()
        self.running_batch = 0  # rows fed by the last step

    # -- state ----------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """True while a job waits or holds a slot."""
        return bool(self.waiting) or any(job is not None for job in self.slots)

    @property
    def free_slots(self) -> int:
        """Slots holding no job."""
        return self.slots.count(None)

    @property
    def slots_in_use(self) -> int:
        """Slots holding a job."""
        return self.max_batch - self.free_slots

    def all_jobs(self) -> list[Job]:
        """Waiting and running jobs."""
        return [*self.waiting, *(job for job in self.slots if job is not None)]

    # -- synchronous driver ---------------------------------------------------------------------
    def steps(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Run until every job is done, yielding after each step; ``cancel`` cancels them all."""
        while self.has_work():
            if cancel is not None and cancel.is_set():
                for job in self.all_jobs():
                    job.cancel()
            self.admit()
            self.step()
            yield

    # -- extension points -----------------------------------------------------------------------
    def reuse_prefix(self, row: int, job: Job) -> int:
        """Prompt tokens of ``job`` already in slot ``row`` when it is admitted (prefix reuse; 0)."""
        return 0

    def decode_feed(self, job: Job) -> list[int]:
        """The tokens a decoding row feeds this step (speculative decoding: last + drafted)."""
        return [job.state.last_token]

    def row_logits(self, job: Job, logits: np.ndarray) -> np.ndarray:
        """A row's logits right before it samples (per-row token-mask hook; unchanged here)."""
        return logits

    def adapters(self, rows: Sequence[int]) -> list[int | None]:
        """The adapter index of each cache row (None: base model or empty slot)."""
        return [None if (job := self.slots[r]) is None else job.adapter for r in rows]

    def _call(self, part: Feed, *, every_position: bool) -> Sequence[np.ndarray] | np.ndarray:
        """The one backend call of the engine (``part``: one token list per cache row)."""
        if every_position:
            return forward_all(self.backend, self.cache, part)
        return self.backend.forward(self.cache, part)

    # -- the step -------------------------------------------------------------------------------
    def admit(self) -> None:
        """Drop cancelled waiting jobs, then move waiting jobs into free slots, oldest first."""
        if any(job.cancelled for job in self.waiting):
            for job in [job for job in self.waiting if job.cancelled]:
                self.metrics.sequences.inc(1, "cancelled")
                self.deliver(
                    job, StepOutput(job.state.cancel(), finish_reason="cancelled", completion=job.state.completion())
                )
            self.waiting = deque(job for job in self.waiting if not job.cancelled)
        for row in range(self.max_batch):
            if self.slots[row] is None and self.waiting:
                job = self.slots[row] = self.waiting.popleft()
                job.fed = self.reuse_prefix(row, job)
                self.metrics.queue_time.observe(time.monotonic() - job.submitted)

    def step(self) -> None:
        """Feed every slot once and let the rows whose prompt is complete sample."""
        start = time.perf_counter()
        feed, sampling = self._feeds()
        fed_rows = [row for row, tokens in enumerate(feed) if tokens]
        self.running_batch = len(fed_rows)
        if not fed_rows:
            return
        scored = [row for row in fed_rows if self._scores_prompt(row)]
        plain = [row for row in fed_rows if row not in scored]
        # constrained rows' next-token masks are computed on llguidance's threads meanwhile
        states = [job.state for job in self.slots if job is not None]
        logits, failures = masks_alongside(states, lambda: self._forward_step(feed, plain)) if plain else (None, {})
        if scored:
            logits = masks_alongside(states, lambda: self._forward_scored(feed, scored, logits, failures))
        for row, exc in failures.items():
            job = self.slots[row]
            if job is not None:
                self.fail(row, job, exc)
        prompt_tokens = 0
        for row in fed_rows:
            job = self.slots[row]
            if job is not None and row not in failures and job.fed < len(job.state.prompt):
                job.fed += len(feed[row])
                prompt_tokens += len(feed[row])
        generated = 0
        for row in sampling:
            job = self.slots[row]
            if job is not None and row not in failures:
                assert logits is not None
                generated += self._sample(row, job, logits[row])
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(generated)
        self.metrics.batch.observe(len(fed_rows))
        self.metrics.step.observe(time.perf_counter() - start)

    def _feeds(self) -> tuple[Feed, list[int]]:
        """Each slot's tokens for this step (cancelled jobs are finished here), and the rows that
        sample after it (their prompt is complete)."""
        feed: Feed = []
        sampling: list[int] = []
        for row, job in enumerate(self.slots):
            tokens: list[int] = []
            if job is not None and job.cancelled:
                self.finish(row, job, StepOutput(job.state.cancel()))
            elif job is not None and job.fed < len(job.state.prompt):
                tokens = job.state.prompt[job.fed : job.fed + self.prefill_chunk]
                if job.fed + len(tokens) == len(job.state.prompt):
                    sampling.append(row)
            elif job is not None:
                tokens = self.decode_feed(job)
                sampling.append(row)
            feed.append(tokens)
        return feed, sampling

    def _sample(self, row: int, job: Job, logits: np.ndarray) -> int:
        """Let ``job`` pick its next token from ``logits`` and hand the output on; tokens generated."""
        before = len(job.state.generated)
        try:
            text = job.state.step(self.row_logits(job, logits))
        except Exception as exc:
            if not self.isolate:
                raise
            self.fail(row, job, exc)
            return 0
        first = job.first_token_at is None
        if first:
            job.first_token_at = time.monotonic()
            self.metrics.first_token.observe(job.first_token_at - job.submitted)
        new = slice(before, len(job.state.generated))
        output = StepOutput(
            text,
            tuple(job.state.generated[new]),
            tuple(job.state.logprobs[new]),
            top_logprobs=tuple(job.state.top_logprobs[new]),
            prompt_logprobs=tuple(job.scored) if first and job.prompt_logprobs is not None else None,
        )
        if job.state.finished:
            self.finish(row, job, output)
        else:
            self.deliver(job, output)
        return new.stop - new.start

    # -- forward calls --------------------------------------------------------------------------
    def _scores_prompt(self, row: int) -> bool:
        job = self.slots[row]
        return job is not None and job.prompt_logprobs is not None and job.fed < len(job.state.prompt)

    def _rows(self, feed: Feed, rows: list[int], *, every_position: bool) -> tuple[dict[int, np.ndarray], Failures]:
        """Output per row of one call feeding ``rows`` (retried row by row when ``isolate``)."""
        call = lambda part: self._call(part, every_position=every_position)  # noqa: E731
        if self.isolate:
            return by_row(call, feed, rows)
        out = call([tokens if r in rows else [] for r, tokens in enumerate(feed)])
        return {row: out[row] for row in rows}, {}

    def _forward_scored(
        self, feed: Feed, rows: list[int], logits: np.ndarray | None, failures: Failures
    ) -> np.ndarray | None:
        """Run the prompt chunks of ``rows`` (jobs scoring their prompt) for every position's logits;
        score them, and return ``logits`` with these rows' last-position logits filled in."""
        every, more = self._rows(feed, rows, every_position=True)
        failures.update(more)
        for row, chunk in every.items():
            job = self.slots[row]
            assert job is not None and job.prompt_logprobs is not None
            prompt, start = job.state.prompt, job.fed
            targets = prompt[start + 1 : start + len(feed[row]) + 1]  # row i predicts token start + i + 1
            try:
                job.scored.extend(prompt_logprobs(chunk[: len(targets)], targets, job.prompt_logprobs))
            except Exception as exc:
                if not self.isolate:
                    raise
                failures[row] = exc
                continue
            if logits is None:
                logits = np.empty((len(feed), chunk.shape[-1]), dtype=np.float32)
            logits[row] = chunk[-1]
        return logits

    def _forward_step(self, feed: Feed, rows: list[int]) -> tuple[np.ndarray | None, Failures]:
        """One forward over every fed row, or two when that would mostly compute padding.

        The backend pads every row to the longest feed of the call, so decoding rows sharing a
        call with a prompt chunk would each cost a whole chunk: when the padded work exceeds
        twice the real work, prompt chunks and decode tokens go to two calls (rows are
        independent, so the logits are the same either way).
        """
        width = max(len(feed[row]) for row in rows)
        decoding = [row for row in rows if len(feed[row]) == 1]
        prefilling = [row for row in rows if len(feed[row]) > 1]
        if not decoding or not prefilling or width * len(rows) <= 2 * sum(len(feed[row]) for row in rows):
            return self._forward(feed, rows)
        logits, failures = self._forward(feed, prefilling)
        more, more_failures = self._forward(feed, decoding)
        if logits is None:
            logits = more
        elif more is not None:
            logits[decoding] = more[decoding]
        return logits, {**failures, **more_failures}

    def _forward(self, feed: Feed, rows: list[int]) -> tuple[np.ndarray | None, Failures]:
        """Logits after each row's last fed token, (batch, vocab) (rows not in ``rows``: unspecified)."""
        out, failures = self._rows(feed, rows, every_position=False)
        if not out:
            return None, failures
        logits = np.empty((len(feed), *next(iter(out.values())).shape), dtype=np.float32)
        for row, values in out.items():
            logits[row] = values
        return logits, failures

    # -- finishing ------------------------------------------------------------------------------
    def release(self, row: int) -> None:
        """Free slot ``row``."""
        self.slots[row] = None
        try:
            self.backend.release(self.cache, row)
        except Exception:
            if not self.isolate:
                raise
            log.exception("releasing slot %d failed", row)

    def finish(self, row: int, job: Job, output: StepOutput) -> None:
        """Release ``row`` and deliver ``job``'s last output (with its finish reason and completion)."""
        self.release(row)
        reason = job.state.finish_reason or "cancelled"
        self.metrics.sequences.inc(1, reason)
        count = len(job.state.generated)
        if job.first_token_at is not None and count > 1:
            self.metrics.time_per_token.observe((time.monotonic() - job.first_token_at) / (count - 1))
        self.deliver(job, dataclasses.replace(output, finish_reason=reason, completion=job.state.completion()))

    def fail(self, row: int | None, job: Job, exc: BaseException) -> None:
        """Fail ``job`` (releasing ``row``): its sink gets finish reason 'error'."""
        if row is not None:
            self.release(row)
        # the client gets a generic message; the details are here, under the request's tag
        log.error(
            "sequence %s failed: %s: %s",
            job.tag or "?",
            type(exc).__name__,
            exc,
            exc_info=None if isinstance(exc, StlmError) else (type(exc), exc, exc.__traceback__),
        )
        self.metrics.sequences.inc(1, "error")
        self.deliver(job, StepOutput("", finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def deliver(self, job: Job, output: StepOutput) -> None:
        """Hand ``output`` to ``job``'s sink (a failing sink is logged, never raised)."""
        if output.finish_reason is not None:
            job.done = True
        try:
            job.sink(output)
        except Exception:
            log.debug("sink of sequence %s failed", job.tag, exc_info=True)
