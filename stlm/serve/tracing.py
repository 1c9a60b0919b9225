"""OpenTelemetry traces of generation requests (``stlm serve --otlp-traces-endpoint URL``).

Per request, once its response is done: a ``stlm.request`` span (arrival to last byte; parent:
the client's W3C ``traceparent``/``tracestate`` headers, so the tree carries the client's trace
id) with, per sequence, ``stlm.queue`` (submission to a cache slot), ``stlm.prefill`` (slot to
first token) and ``stlm.decode`` (first token to the end) children. The spans are built from the
times the scheduler noted on each job, so no tracing code runs in the scheduler thread. Token
counts are attributes (``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``).

opentelemetry is imported only here, only when an endpoint is given (the ``tracing`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from starlette.types import Scope

from stlm.extras import MissingExtraError
from stlm.serve.jobs import Job

__all__ = ["RequestTracer", "otlp_tracer"]

INSTALL = "pip install 'stlm[tracing]'"


def otlp_tracer(endpoint: str, service_name: str = "stlm") -> RequestTracer:
    """A tracer exporting over OTLP/HTTP (protobuf) to ``endpoint`` (e.g. ``http://host:4318/v1/traces``)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise MissingExtraError(
            f"--otlp-traces-endpoint needs the 'tracing' extra, which is not installed (missing: {exc.name})",
            fix=f"{INSTALL}  (from a clone: pip install -e '.[tracing]')",
        ) from None
    return RequestTracer(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)), service_name)


class RequestTracer:
    """Records the span tree of each finished request through ``processor`` (an OpenTelemetry
    ``SpanProcessor``: batched OTLP in production, a simple processor over an in-memory exporter
    in tests)."""

    def __init__(self, processor: Any, service_name: str = "stlm") -> None:
        from opentelemetry.propagate import extract
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind, set_span_in_context

        self._extract, self._in_context, self._server = extract, set_span_in_context, SpanKind.SERVER
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("stlm.serve")
        # monotonic → epoch nanoseconds (span times are wall-clock)
        self._offset = time.time_ns() - time.monotonic_ns()

    def _ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self._offset

    def record(self, scope: Scope, arrived: float, jobs: Sequence[Job], status: int, prompt_tokens: int) -> None:
        """The spans of one request (``scope``: its ASGI scope, for the headers and the route)."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        parent = self._extract(headers)
        ended = time.monotonic()
        generated = sum(len(job.state.generated) for job in jobs)
        request = self.tracer.start_span(
            f"{scope.get('method', 'POST')} {scope.get('path', '')}",
            context=parent,
            kind=self._server,
            start_time=self._ns(arrived),
            attributes={
                "http.response.status_code": status,
                "gen_ai.usage.input_tokens": prompt_tokens,
                "gen_ai.usage.output_tokens": generated,
                "stlm.sequences": len(jobs),
            },
        )
        context = self._in_context(request)
        for index, job in enumerate(jobs):
            self._sequence(context, index, job, ended)
        request.end(end_time=self._ns(ended))

    def _sequence(self, context: Any, index: int, job: Job, ended: float) -> None:
        finished = job.finished_at or ended
        admitted = job.admitted_at or finished
        first = job.first_token_at or finished
        common: dict[str, Any] = {"stlm.sequence.index": index}
        phases: tuple[tuple[str, float, float, dict[str, Any]], ...] = (
            ("stlm.queue", job.submitted, admitted, {}),
            ("stlm.prefill", admitted, first, {"gen_ai.usage.input_tokens": len(job.state.prompt)}),
            (
                "stlm.decode",
                first,
                finished,
                {
                    "gen_ai.usage.output_tokens": len(job.state.generated),
                    "gen_ai.response.finish_reasons": [job.state.finish_reason or "cancelled"],
                },
            ),
        )
        for name, start, end, attributes in phases:
            span = self.tracer.start_span(
                name, context=context, start_time=self._ns(start), attributes={**common, **attributes}
            )
            span.end(end_time=self._ns(max(start, end)))

    def shutdown(self) -> None:
        """Flush and stop the exporter (the server's shutdown)."""
        self.provider.shutdown()
