"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated from the event loop and the scheduler thread (each metric
has its own lock); gauges are read from callbacks at scrape time, so they are never stale.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = ["Counter", "Gauge", "Histogram", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _value(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        """Add ``amount`` (>= 0) to the series of ``labels`` (one value per label name)."""
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        """Current value of one series (0 if never incremented)."""
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        """Exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(self.labelnames, labels)} {_value(value)}"


class Gauge:
    """A value read from ``read`` at scrape time."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> Iterable[str]:
        """Exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_value(self.read())}"


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help_text
        self.bounds = (*tuple(sorted(buckets)), math.inf)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Record one value."""
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break

    @property
    def count(self) -> int:
        """Number of observations."""
        with self._lock:
            return sum(self._counts)

    def render(self) -> Iterable[str]:
        """Exposition lines."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, n in zip(self.bounds, counts, strict=True):
            running += n
            yield f'{self.name}_bucket{{le="{_value(bound)}"}} {running}'
        yield f"{self.name}_sum {_value(total)}"
        yield f"{self.name}_count {running}"


class ServerMetrics:
    """Every metric ``stlm serve`` exports; gauges are bound later with :meth:`bind_gauges`."""

    def __init__(self) -> None:
        self.requests = Counter(
            "stlm_requests_total",
            "Completion requests by final HTTP status (499: the client disconnected first).",
            ["status"],
        )
        self.prompt_tokens = Counter("stlm_prompt_tokens_total", "Prompt tokens fed to the model.")
        self.generated_tokens = Counter("stlm_generated_tokens_total", "Tokens generated (sampled).")
        self.sequences = Counter("stlm_sequences_total", "Sequences finished, by finish reason.", ["reason"])
        self.latency = Histogram(
            "stlm_request_latency_seconds", "Completion request latency, arrival to last byte.", LATENCY_BUCKETS
        )
        self.first_token = Histogram(
            "stlm_time_to_first_token_seconds", "Sequence submission to its first sampled token.", LATENCY_BUCKETS
        )
        self.step = Histogram("stlm_step_seconds", "Duration of one scheduler step (forward + sampling).", STEP_BUCKETS)
        self.batch = Histogram(
            "stlm_step_batch_size", "Rows fed per scheduler step.", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self._gauges: list[Gauge] = []

    def bind_gauges(self, gauges: Sequence[Gauge]) -> None:
        """Set the gauges rendered after the counters (queue depth, slots, ...)."""
        self._gauges = list(gauges)

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        metrics: list[Counter | Gauge | Histogram] = [
            self.requests,
            self.prompt_tokens,
            self.generated_tokens,
            self.sequences,
            self.latency,
            self.first_token,
            self.step,
            self.batch,
            *self._gauges,
        ]
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition text as ``{'name{labels}': value}`` (for tests and tools)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
