"""Server metrics, exposed by prometheus_client: stlm's own ``stlm_*`` series and vLLM's ``vllm:*`` set.

Each :class:`ServerMetrics` owns a private ``CollectorRegistry`` (several servers may share a
process) holding:

- ``stlm_*``: requests by HTTP status, tokens, sequences by finish reason, latency histograms
  (buckets reach an hour: a 256-token completion of the 3B model on a CPU takes minutes),
  scheduler steps, and gauges read at scrape time (queue depth, slots, ...).
- ``vllm:*`` with vLLM's (v1 engine) names, meanings and bucket boundaries, so that vLLM's
  Grafana dashboards, KEDA scalers and the Gateway API inference extension read stlm as they
  read vLLM: ``num_requests_running`` (sequences holding a cache slot), ``num_requests_waiting``,
  ``kv_cache_usage_perc`` (the fraction of cache slots in use: stlm reserves a slot's cache
  whole), ``prompt_tokens_total``, ``generation_tokens_total``, ``request_success_total
  {finished_reason}`` (per sequence, as vLLM counts each of ``n`` choices), the TTFT, inter-token,
  end-to-end and queue-time histograms, and ``prefix_cache_queries/hits_total`` (0: stlm has no
  prefix cache yet).
- the process and Python collectors of prometheus_client (``process_*``, ``python_*``; unlabelled).

Every stlm and vLLM sample carries ``model_name`` (the served model's id). A value observed once
feeds both of its series (:class:`Histogram`, :class:`Counter` pair them), so the two sets agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import prometheus_client as prom
from prometheus_client import CollectorRegistry

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "ServerMetrics", "parse_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 900.0,
    1800.0, 3600.0,
)  # fmt: skip
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# per generated token: ~10 ms on a GPU, ~0.5 s for the 3B model on two CPU cores
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
#: stlm's finish reasons → vLLM's ``finished_reason`` label values
VLLM_FINISHED = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}


class Counter:
    """A counter per label set; ``inc`` also feeds the paired counters (same labels, or none)."""

    def __init__(
        self, metric: prom.Counter, model: str, *, pairs: Sequence[Callable[[float, tuple[str, ...]], None]] = ()
    ) -> None:
        self._metric, self._model, self._pairs = metric, model, tuple(pairs)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        """Add ``amount`` (>= 0) to the series of ``labels`` (one value per label name)."""
        self._metric.labels(self._model, *labels).inc(amount)
        for pair in self._pairs:
            pair(amount, labels)

    def get(self, *labels: str) -> float:
        """Current value of one series (0 if never incremented)."""
        return float(self._metric.labels(self._model, *labels)._value.get())


class Histogram:
    """Observations into one or more histograms (an stlm one and its vLLM twin)."""

    def __init__(self, *children: prom.Histogram) -> None:
        self._children = children

    def observe(self, value: float) -> None:
        """Record one value."""
        for child in self._children:
            child.observe(value)

    @property
    def count(self) -> int:
        """Number of observations."""
        for metric in self._children[0].collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    return int(sample.value)
        return 0


@dataclass
class Gauge:
    """A value read from ``read`` at scrape time (registered by :meth:`ServerMetrics.bind_gauges`)."""

    name: str
    help: str
    read: Callable[[], float]


class ServerMetrics:
    """Every metric ``stlm serve`` exports, labelled ``model_name``; gauges are bound later with
    :meth:`bind_gauges`, vLLM's scheduler gauges with :meth:`bind_vllm_gauges`."""

    def __init__(self, model_name: str = "") -> None:
        self.model = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (prom.ProcessCollector, prom.PlatformCollector, prom.GCCollector):
            collector(registry=self.registry)
        self.requests = self._counter(
            "stlm_requests_total",
            "Generation requests (completions and chat) by final HTTP status (499: the client disconnected first).",
            ["status"],
        )
        self._token_counters()
        self.latency = self._histogram(
            "stlm_request_latency_seconds", "Generation request latency, arrival to last byte.", LATENCY_BUCKETS
        )
        self.first_token = self._histogram(
            "stlm_time_to_first_token_seconds",
            "Sequence submission to its first sampled token.",
            LATENCY_BUCKETS,
            twin=(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                VLLM_TTFT_BUCKETS,
            ),
        )
        self.time_per_token = self._histogram(
            "stlm_time_per_output_token_seconds",
            "Per sequence of two tokens or more: (finish - first token) / (tokens - 1).",
            TOKEN_BUCKETS,
        )
        self.queue_time = self._histogram(
            "stlm_queue_time_seconds",
            "Sequence submission to a cache slot (time spent waiting).",
            LATENCY_BUCKETS,
            twin=(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                VLLM_REQUEST_BUCKETS,
            ),
        )
        self.step = self._histogram(
            "stlm_step_seconds", "Duration of one scheduler step (forward + sampling).", STEP_BUCKETS
        )
        self.batch = self._histogram("stlm_step_batch_size", "Rows fed per scheduler step.", BATCH_BUCKETS)

        self._vllm_only()

    def _token_counters(self) -> None:
        """Prompt and generated tokens, finished sequences: stlm's counters paired with vLLM's."""
        vllm_prompt = self._vllm_counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        vllm_generated = self._vllm_counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = prom.Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = self._counter(
            "stlm_prompt_tokens_total", "Prompt tokens fed to the model.", pairs=[vllm_prompt]
        )
        self.generated_tokens = self._counter(
            "stlm_generated_tokens_total", "Tokens generated (sampled).", pairs=[vllm_generated]
        )
        self.sequences = self._counter(
            "stlm_sequences_total",
            "Sequences finished, by finish reason.",
            ["reason"],
            pairs=[lambda n, labels: success.labels(self.model, VLLM_FINISHED.get(labels[0], "abort")).inc(n)],
        )
        for reason in ("stop", "length", "abort"):  # vLLM exports every reason from the start
            success.labels(self.model, reason)

    def _vllm_only(self) -> None:
        """vLLM's series without an stlm twin: e2e latency (generation requests that reached the
        scheduler), per-token gaps, prefix cache counters."""
        self.e2e_latency = self._histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", VLLM_REQUEST_BUCKETS
        )
        self.inter_token = Histogram(
            self._prom_histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                VLLM_TOKEN_BUCKETS,
            ),
            self._prom_histogram(
                "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", VLLM_TOKEN_BUCKETS
            ),
        )
        self.prefix_cache_queries = self._vllm_counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = self._vllm_counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )

    # -- construction helpers ----------------------------------------------------------------------
    def _counter(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        pairs: Sequence[Callable[[float, tuple[str, ...]], None]] = (),
    ) -> Counter:
        metric = prom.Counter(name, help_text, ["model_name", *labelnames], registry=self.registry)
        if not labelnames:
            metric.labels(self.model)  # a series from the start
        return Counter(metric, self.model, pairs=pairs)

    def _vllm_counter(self, name: str, help_text: str) -> Callable[[float, tuple[str, ...]], None]:
        child = prom.Counter(name, help_text, ["model_name"], registry=self.registry).labels(self.model)
        return lambda amount, labels: child.inc(amount)

    def _prom_histogram(self, name: str, help_text: str, buckets: Sequence[float]) -> prom.Histogram:
        metric = prom.Histogram(name, help_text, ["model_name"], buckets=buckets, registry=self.registry)
        return metric.labels(self.model)

    def _histogram(
        self, name: str, help_text: str, buckets: Sequence[float], twin: tuple[str, str, Sequence[float]] | None = None
    ) -> Histogram:
        children = [self._prom_histogram(name, help_text, buckets)]
        if twin is not None:
            children.append(self._prom_histogram(*twin))
        return Histogram(*children)

    # -- gauges --------------------------------------------------------------------------------------
    def bind_gauges(self, gauges: Sequence[Gauge]) -> None:
        """Register gauges read at scrape time (queue depth, slots, ...); they get the model label."""
        for gauge in gauges:
            metric = prom.Gauge(gauge.name, gauge.help, ["model_name"], registry=self.registry)
            metric.labels(self.model).set_function(gauge.read)

    def bind_vllm_gauges(
        self, running: Callable[[], float], waiting: Callable[[], float], cache_usage: Callable[[], float]
    ) -> None:
        """vLLM's scheduler gauges: sequences holding a slot, sequences waiting, cache usage (0..1)."""
        self.bind_gauges(
            [
                Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running),
                Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
                Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", cache_usage),
            ]
        )

    def render(self) -> str:
        """The whole exposition text (Prometheus text format 0.0.4)."""
        return prom.generate_latest(self.registry).decode()


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition text as ``{'name{labels}': value}`` (for tests and tools)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
