"""Continuous batching: one thread owns one KV cache of fixed slots and runs every sequence in it.

Each step of :meth:`Scheduler._run`:

1. cancelled sequences (their client went away) are finished and their slot released;
2. waiting sequences take the free slots, oldest first;
3. one ``backend.forward`` call feeds every slot its tokens: a joining sequence its next prompt
   chunk (at most ``prefill_chunk`` tokens, so a long prompt does not stall the others for
   long), a decoding sequence its last sampled token, an empty slot nothing (the backend pads
   rows to the longest feed, so when that padding would more than double the work, prompt
   chunks and decode tokens go to two calls in the same step: see :meth:`Scheduler._forward_step`);
4. every row whose prompt is complete samples its next token (its own :class:`SequenceState`:
   sampling parameters, seed, stop strings) and hands the new text to its sink;
5. finished rows are released (``backend.release``) and their slots are free for the next step.

A job that asks for its prompt's log-probabilities (``Job(prompt_logprobs=N)``, for ``echo``)
has its prompt chunks run in a separate ``forward_all`` call that returns the logits of every
fed position; each chunk is scored at once (:func:`stlm.runtime.logprobs.prompt_logprobs`) and
only the scores are kept, which reach the sink with the job's first sampled token.

Rows never influence each other: a request's greedy output is the same alone or in any batch
(a row's prompt is always cut into the same chunks, whatever else runs). An exception while
sampling one row fails only that sequence; a failed batched forward is retried row by row so
only the rows that fail alone are failed. Sinks are called on the scheduler thread and must
not block (the server's post results to its event loop).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError, StlmError
from stlm.runtime.backend import Backend
from stlm.runtime.logprobs import prompt_logprobs
from stlm.runtime.sequence import check_fits
from stlm.serve.config import ServeConfig
from stlm.serve.forwarding import by_row, forward_all
from stlm.serve.jobs import Job, QueueFullError, SchedulerStoppedError, StepOutput
from stlm.serve.metrics import ServerMetrics

__all__ = ["Job", "QueueFullError", "Scheduler", "SchedulerStoppedError", "StepOutput"]

log = logging.getLogger(__name__)


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(
            f"{name}={value!r} is invalid: expected an int >= {minimum}",
            fix=f"pass {name} as a whole number >= {minimum}",
        )
    return value


class Scheduler:
    """Runs submitted :class:`Job`\\ s with continuous batching over ``max_batch`` cache slots."""

    def __init__(
        self,
        backend: Backend[Any],
        *,
        max_batch: int,
        capacity: int,
        max_queue: int,
        prefill_chunk: int = ServeConfig.prefill_chunk,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.max_batch = _positive("max_batch", max_batch)
        self.capacity = _positive("capacity", capacity, 2)
        self.max_queue = _positive("max_queue", max_queue, 0)
        self.prefill_chunk = _positive("prefill_chunk", prefill_chunk)
        self.metrics = metrics or ServerMetrics()
        self._cache = backend.new_cache(self.max_batch, self.capacity)
        self._slots: list[Job | None] = [None] * self.max_batch
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None
        self.running_batch = 0  # rows fed by the last step

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stlm-scheduler", daemon=True)
            self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new work, finish (``drain``) or cancel the queued and running sequences, and wait."""
        with self._cond:
            self._stopping = True
            if not drain:
                for job in [*self._waiting, *(j for j in self._slots if j is not None)]:
                    job._cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Wake the thread (a job was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        """True while the thread runs (also while it drains)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """True while the thread runs and accepts work."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    @property
    def slots_in_use(self) -> int:
        """Slots holding a sequence."""
        return sum(job is not None for job in self._slots)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (all or none). :class:`QueueFullError` when more than ``max_queue``
        sequences would be left waiting once the free slots are taken,
        :class:`SchedulerStoppedError` while draining, :class:`InvalidArgumentError` if a job
        cannot fit a slot."""
        if len(jobs) > self.max_batch + self.max_queue:
            raise InvalidArgumentError(
                f"a request of {len(jobs)} prompts can never fit {self.max_batch} slots plus a queue of "
                f"{self.max_queue}",
                fix="send fewer prompts per request",
            )
        for job in jobs:
            check_fits(len(job.state.prompt), job.state.params.max_new_tokens, self.capacity)
        with self._cond:
            if self._stopping or self.crashed is not None:
                raise SchedulerStoppedError(
                    "the server is shutting down and accepts no new requests",
                    fix="retry against another replica or after the restart",
                )
            free = self._slots.count(None)  # waiting jobs take these at the next step
            if len(self._waiting) + len(jobs) - free > self.max_queue:
                raise QueueFullError(
                    f"the queue is full: {len(self._waiting)} sequences already wait for "
                    f"{self.max_batch - free} busy slots (queue limit {self.max_queue})",
                    fix="retry later, or start the server with a larger --max-queue / --max-batch",
                )
            now = time.monotonic()
            for job in jobs:
                job.submitted, job._scheduler = now, self
                self._waiting.append(job)
            self._cond.notify_all()

    # -- the loop -----------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._waiting) or any(job is not None for job in self._slots)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._stopping:
                        self._cond.wait()
                    if not self._has_work():
                        return
                    self._admit()
                self._step()
        except BaseException as exc:
            log.exception("the scheduler thread crashed; failing every queued and running sequence")
            self.crashed = exc
            with self._cond:
                jobs = [*self._waiting, *(j for j in self._slots if j is not None)]
                self._waiting.clear()
            for job in jobs:
                self._fail(None, job, exc)

    def _admit(self) -> None:
        """Drop cancelled waiting jobs, then move waiting jobs into free slots (lock held)."""
        if any(job.cancelled for job in self._waiting):
            for job in [job for job in self._waiting if job.cancelled]:
                self.metrics.sequences.inc(1, "cancelled")
                self._deliver(
                    job, StepOutput(job.state.cancel(), finish_reason="cancelled", completion=job.state.completion())
                )
            self._waiting = deque(job for job in self._waiting if not job.cancelled)
        for row in range(self.max_batch):
            if self._slots[row] is None and self._waiting:
                job = self._slots[row] = self._waiting.popleft()
                job.admitted_at = time.monotonic()
                self.metrics.queue_time.observe(job.admitted_at - job.submitted)

    def _step(self) -> None:
        start = time.perf_counter()
        feed, sampling = self._feeds()
        fed_rows = [row for row, tokens in enumerate(feed) if tokens]
        self.running_batch = len(fed_rows)
        if not fed_rows:
            return
        scored = [row for row in fed_rows if self._scores_prompt(row)]
        plain = [row for row in fed_rows if row not in scored]
        logits, failures = self._forward_step(feed, plain) if plain else (None, {})
        if scored:
            logits = self._forward_scored(feed, scored, logits, failures)
        for row, exc in failures.items():
            job = self._slots[row]
            if job is not None:
                self._fail(row, job, exc)
        prompt_tokens = 0
        for row in fed_rows:
            job = self._slots[row]
            if job is not None and row not in failures and job.fed < len(job.state.prompt):
                job.fed += len(feed[row])
                prompt_tokens += len(feed[row])
        generated = 0
        for row in sampling:
            job = self._slots[row]
            if job is not None and row not in failures:
                assert logits is not None
                generated += self._sample(row, job, logits[row])
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(generated)
        self.metrics.batch.observe(len(fed_rows))
        self.metrics.step.observe(time.perf_counter() - start)

    def _feeds(self) -> tuple[list[list[int]], list[int]]:
        """Each slot's tokens for this step (cancelled jobs are finished here), and the rows that
        sample after it (their prompt is complete)."""
        feed: list[list[int]] = []
        sampling: list[int] = []
        for row, job in enumerate(self._slots):
            tokens: list[int] = []
            if job is not None and job.cancelled:
                self._finish(row, job, StepOutput(job.state.cancel()))
            elif job is not None and job.fed < len(job.state.prompt):
                tokens = job.state.prompt[job.fed : job.fed + self.prefill_chunk]
                if job.fed + len(tokens) == len(job.state.prompt):
                    sampling.append(row)
            elif job is not None:
                tokens = [job.state.last_token]
                sampling.append(row)
            feed.append(tokens)
        return feed, sampling

    def _sample(self, row: int, job: Job, logits: np.ndarray) -> int:
        """Let ``job`` pick its next token from ``logits`` and hand the output on; tokens generated."""
        before = len(job.state.generated)
        try:
            text = job.state.step(logits)
        except Exception as exc:  # noqa: BLE001 - one sequence's failure must not stop the others
            self._fail(row, job, exc)
            return 0
        first, now = job.first_token_at is None, time.monotonic()
        if first:
            job.first_token_at = now
            self.metrics.first_token.observe(job.first_token_at - job.submitted)
        else:
            self.metrics.inter_token.observe(now - job.last_token_at)
        job.last_token_at = now
        new = slice(before, len(job.state.generated))
        output = StepOutput(
            text,
            tuple(job.state.generated[new]),
            tuple(job.state.logprobs[new]),
            top_logprobs=tuple(job.state.top_logprobs[new]),
            prompt_logprobs=tuple(job.scored) if first and job.prompt_logprobs is not None else None,
        )
        if job.state.finished:
            self._finish(row, job, output)
        else:
            self._deliver(job, output)
        return new.stop - new.start

    def _scores_prompt(self, row: int) -> bool:
        job = self._slots[row]
        return job is not None and job.prompt_logprobs is not None and job.fed < len(job.state.prompt)

    def _forward_scored(
        self, feed: list[list[int]], rows: list[int], logits: np.ndarray | None, failures: dict[int, Exception]
    ) -> np.ndarray | None:
        """Run the prompt chunks of ``rows`` (jobs scoring their prompt) for every position's logits;
        score them, and return ``logits`` with these rows' last-position logits filled in."""
        every, more = self._forward_every(feed, rows)
        failures.update(more)
        for row, chunk in every.items():
            job = self._slots[row]
            assert job is not None and job.prompt_logprobs is not None
            prompt, start = job.state.prompt, job.fed
            targets = prompt[start + 1 : start + len(feed[row]) + 1]  # row i predicts token start + i + 1
            try:
                job.scored.extend(prompt_logprobs(chunk[: len(targets)], targets, job.prompt_logprobs))
            except Exception as exc:  # noqa: BLE001 - fails this sequence only
                failures[row] = exc
                continue
            if logits is None:
                logits = np.empty((len(feed), chunk.shape[-1]), dtype=np.float32)
            logits[row] = chunk[-1]
        return logits

    def _forward_every(
        self, feed: list[list[int]], rows: list[int]
    ) -> tuple[dict[int, np.ndarray], dict[int, Exception]]:
        """Every fed position's logits of ``rows`` ((tokens, vocab) per row)."""
        return by_row(lambda part: forward_all(self.backend, self._cache, part), feed, rows)

    def _forward_step(self, feed: list[list[int]], rows: list[int]) -> tuple[np.ndarray | None, dict[int, Exception]]:
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

    def _forward(self, feed: list[list[int]], rows: list[int]) -> tuple[np.ndarray | None, dict[int, Exception]]:
        """Logits after each row's last fed token, (batch, vocab) (rows not in ``rows``: unspecified)."""
        out, failures = by_row(lambda part: self.backend.forward(self._cache, part), feed, rows)
        if not out:
            return None, failures
        logits = np.empty((len(feed), *next(iter(out.values())).shape), dtype=np.float32)
        for row, values in out.items():
            logits[row] = values
        return logits, failures

    # -- finishing ----------------------------------------------------------------------------
    def _release(self, row: int) -> None:
        self._slots[row] = None
        try:
            self.backend.release(self._cache, row)
        except Exception:
            log.exception("releasing slot %d failed", row)

    def _finish(self, row: int, job: Job, output: StepOutput) -> None:
        self._release(row)
        reason = job.state.finish_reason or "cancelled"
        self.metrics.sequences.inc(1, reason)
        count = len(job.state.generated)
        if job.first_token_at is not None and count > 1:
            self.metrics.time_per_token.observe((time.monotonic() - job.first_token_at) / (count - 1))
        self._deliver(job, dataclasses.replace(output, finish_reason=reason, completion=job.state.completion()))

    def _fail(self, row: int | None, job: Job, exc: BaseException) -> None:
        if row is not None:
            self._release(row)
        # the client gets a generic message; the details are here, under the request's tag
        log.error(
            "sequence %s failed: %s: %s",
            job.tag or "?",
            type(exc).__name__,
            exc,
            exc_info=None if isinstance(exc, StlmError) else (type(exc), exc, exc.__traceback__),
        )
        self.metrics.sequences.inc(1, "error")
        self._deliver(job, StepOutput("", finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def _deliver(self, job: Job, output: StepOutput) -> None:
        if output.finish_reason is not None:
            job.done = True
            job.finished_at = time.monotonic()
        try:
            job.sink(output)
        except Exception:
            log.debug("sink of sequence %s failed", job.tag, exc_info=True)
