"""The scheduler's refusals: a full queue (HTTP 429) and a stopped scheduler (HTTP 503).

What it runs (:class:`~stlm.runtime.jobs.Job`, :class:`~stlm.runtime.jobs.StepOutput`) lives in
the runtime, next to the engine.
"""

from __future__ import annotations

from stlm.errors import StlmError

__all__ = ["QueueFullError", "SchedulerStoppedError"]


class QueueFullError(StlmError):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""


class SchedulerStoppedError(StlmError):
    """The scheduler is draining or has stopped; no new work is accepted (HTTP 503)."""
