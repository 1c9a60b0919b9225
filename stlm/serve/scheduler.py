"""Continuous batching: one thread steps the runtime's :class:`~stlm.runtime.engine.Engine`.

The engine owns the slots, the step and every per-sequence rule (see :mod:`stlm.runtime.engine`);
this module adds what a server needs around it: a bounded queue with all-or-none admission
(:class:`QueueFullError`), a lock and a condition the thread sleeps on while idle, draining on
shutdown (:class:`SchedulerStoppedError`) and failing every sequence if the thread crashes.
Sinks are called on the scheduler thread and must not block (the server's post results to its
event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from stlm.errors import InvalidArgumentError
from stlm.runtime.backend import Backend
from stlm.runtime.engine import Engine
from stlm.runtime.jobs import Job, StepOutput
from stlm.runtime.sequence import check_fits
from stlm.serve.config import ServeConfig
from stlm.serve.jobs import QueueFullError, SchedulerStoppedError
from stlm.serve.metrics import ServerMetrics

__all__ = ["Job", "QueueFullError", "Scheduler", "SchedulerStoppedError", "StepOutput"]

log = logging.getLogger(__name__)


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
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise InvalidArgumentError(
                f"max_queue={max_queue!r} is invalid: expected an int >= 0", fix="pass max_queue as a whole number >= 0"
            )
        self.metrics = metrics or ServerMetrics()
        self.engine = Engine(
            backend, max_batch=max_batch, capacity=capacity, prefill_chunk=prefill_chunk, metrics=self.metrics
        )
        self.backend = backend
        self.max_batch, self.capacity, self.max_queue = self.engine.max_batch, self.engine.capacity, max_queue
        self.prefill_chunk = self.engine.prefill_chunk
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

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
                for job in self.engine.all_jobs():
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
        return len(self.engine.waiting)

    @property
    def slots_in_use(self) -> int:
        """Slots holding a sequence."""
        return self.engine.slots_in_use

    @property
    def running_batch(self) -> int:
        """Rows fed by the last step."""
        return self.engine.running_batch

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
            waiting, free = self.engine.waiting, self.engine.free_slots  # waiting jobs take free slots next step
            if len(waiting) + len(jobs) - free > self.max_queue:
                raise QueueFullError(
                    f"the queue is full: {len(waiting)} sequences already wait for "
                    f"{self.max_batch - free} busy slots (queue limit {self.max_queue})",
                    fix="retry later, or start the server with a larger --max-queue / --max-batch",
                )
            now = time.monotonic()
            for job in jobs:
                job.submitted, job._scheduler = now, self
                waiting.append(job)
            self._cond.notify_all()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not engine.has_work() and not self._stopping:
                        self._cond.wait()
                    if not engine.has_work():
                        return
                    engine.admit()
                engine.step()
        except BaseException as exc:
            log.exception("the scheduler thread crashed; failing every queued and running sequence")
            self.crashed = exc
            with self._cond:
                jobs = engine.all_jobs()
                engine.waiting.clear()
            for job in jobs:
                engine.fail(None, job, exc)
