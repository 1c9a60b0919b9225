"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated from the event loop and the scheduler thread (each metric
has its own lock); gauges are read from callbacks at scrape time, so they are never stale. Every
sample carries the ``model_name`` label (the served model's id), as vLLM's metrics do.

Latency buckets reach an hour: a 256-token completion of the 3B model on a CPU takes minutes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = ["Counter", "Gauge", "Histogram", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 900.0,
    1800.0, 3600.0,
)  # fmt: skip
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# per generated token: ~10 ms on a GPU, ~0.5 s for the 3B model on two CPU cores
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
Labels = tuple[tuple[str, str], ...]


def _value(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


def _labels(names: Sequence[str], values: Sequence[str], const: Labels = ()) -> str:
    pairs = [*const, *zip(names, values, strict=True)]
    if not pairs:
        return ""
    escaped = ((n, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for n, v in pairs)
    return "{" + ",".join(f'{n}="{v}"' for n, v in escaped) + "}"


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), const: Labels = ()) -> None:
        self.name, self.help, self.labelnames, self.const = name, help_text, tuple(labelnames), const
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
            yield f"{self.name}{_labels(self.labelnames, labels, self.const)} {_value(value)}"


class Gauge:
    """A value read from ``read`` at scrape time."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], const: Labels = ()) -> None:
        self.name, self.help, self.read, self.const = name, help_text, read, const

    def render(self) -> Iterable[str]:
        """Exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name}{_labels((), (), self.const)} {_value(self.read())}"


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], const: Labels = ()) -> None:
        self.name, self.help, self.const = name, help_text, const
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
            yield f"{self.name}_bucket{_labels(('le',), (_value(bound),), self.const)} {running}"
        yield f"{self.name}_sum{_labels((), (), self.const)} {_value(total)}"
        yield f"{self.name}_count{_labels((), (), self.const)} {running}"


class ServerMetrics:
    """Every metric ``stlm serve`` exports, labelled ``model_name``; gauges are bound later with
    :meth:`bind_gauges`."""

    def __init__(self, model_name: str = "") -> None:
        const: Labels = (("model_name", model_name),)
        self.const = const
        self.requests = Counter(
            "stlm_requests_total",
            "Generation requests (completions and chat) by final HTTP status (499: the client disconnected first).",
            ["status"],
            const,
        )
        self.prompt_tokens = Counter("stlm_prompt_tokens_total", "Prompt tokens fed to the model.", const=const)
        self.generated_tokens = Counter("stlm_generated_tokens_total", "Tokens generated (sampled).", const=const)
        self.sequences = Counter("stlm_sequences_total", "Sequences finished, by finish reason.", ["reason"], const)
        self.latency = Histogram(
            "stlm_request_latency_seconds", "Generation request latency, arrival to last byte.", LATENCY_BUCKETS, const
        )
        self.first_token = Histogram(
            "stlm_time_to_first_token_seconds",
            "Sequence submission to its first sampled token.",
            LATENCY_BUCKETS,
            const,
        )
        self.time_per_token = Histogram(
            "stlm_time_per_output_token_seconds",
            "Per sequence of two tokens or more: (finish - first token) / (tokens - 1).",
            TOKEN_BUCKETS,
            const,
        )
        self.queue_time = Histogram(
            "stlm_queue_time_seconds",
            "Sequence submission to a cache slot (time spent waiting).",
            LATENCY_BUCKETS,
            const,
        )
        self.step = Histogram(
            "stlm_step_seconds", "Duration of one scheduler step (forward + sampling).", STEP_BUCKETS, const
        )
        self.batch = Histogram(
            "stlm_step_batch_size", "Rows fed per scheduler step.", (1, 2, 4, 8, 16, 32, 64, 128, 256), const
        )
        self._gauges: list[Gauge] = []

    def bind_gauges(self, gauges: Sequence[Gauge]) -> None:
        """Set the gauges rendered after the counters (queue depth, slots, ...); they get the model label."""
        for gauge in gauges:
            gauge.const = self.const
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
            self.time_per_token,
            self.queue_time,
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
