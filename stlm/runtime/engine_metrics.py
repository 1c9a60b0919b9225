"""What the engine reports while it runs: :class:`EngineMetrics` (the server's
``ServerMetrics`` is one) and :class:`NoMetrics` (the default: reports nothing)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["EngineMetrics", "NoMetrics"]


class CounterLike(Protocol):
    def inc(self, amount: float = 1.0, *labels: str) -> None: ...


class HistogramLike(Protocol):
    def observe(self, value: float) -> None: ...


class EngineMetrics(Protocol):
    """Counters: tokens fed/sampled, sequences finished by reason; histograms: seconds per step,
    rows per step, queue time, time to first token, time per output token."""

    @property
    def prompt_tokens(self) -> CounterLike: ...
    @property
    def generated_tokens(self) -> CounterLike: ...
    @property
    def sequences(self) -> CounterLike: ...
    @property
    def step(self) -> HistogramLike: ...
    @property
    def batch(self) -> HistogramLike: ...
    @property
    def queue_time(self) -> HistogramLike: ...
    @property
    def first_token(self) -> HistogramLike: ...
    @property
    def time_per_token(self) -> HistogramLike: ...


class _Nothing:
    def inc(self, amount: float = 1.0, *labels: str) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class NoMetrics:
    """Metrics that record nothing (``Generator`` runs)."""

    prompt_tokens = generated_tokens = sequences = _Nothing()
    step = batch = queue_time = first_token = time_per_token = _Nothing()
