"""What operators' tools read from `stlm serve`: model routes, vLLM-named metrics, a Grafana
dashboard over them, and OpenTelemetry traces carrying the client's trace id.

Each test drives a real in-thread server on loopback with the `openai` client (or urllib);
metrics are scraped and parsed with prometheus_client's own parser; spans go to OpenTelemetry's
in-memory exporter, or over OTLP/HTTP to a loopback receiver decoding the protobuf.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stlm.serve import BackgroundServer, ServeConfig, load_service

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "stlm-vllm-dashboard.json"
# vLLM's boundaries (vllm/v1/metrics/loggers.py), copied here independently of stlm's constants
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0]
VLLM_TTFT += [40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0]
VLLM_TPOT += [80.0]
VLLM_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0]
VLLM_E2E += [480.0, 960.0, 1920.0, 7680.0]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def server(packages: dict[str, Path]) -> Iterator[BackgroundServer]:
    """A fresh server per test (its metrics start from zero): 2 slots, no API key, loopback."""
    service = load_service(ServeConfig(packages["hd16-inplace"], port=0, max_batch=2, max_context=256))
    with BackgroundServer(service) as srv:
        yield srv


def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def scrape(server: BackgroundServer) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """({(sample name, sorted labels without model_name): value}, {family name: type}) of /metrics."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            if family.name.startswith(("vllm:", "stlm_")):
                assert s.labels.get("model_name") == server.service.model, s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[s.name, labels] = s.value
    return samples, types


def buckets(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> list[float]:
    return sorted(float(dict(labels)["le"]) for n, labels in samples if n == f"{name}_bucket")[:-1]  # without +Inf


# -- models ------------------------------------------------------------------------------------------
def test_models_retrieve_and_unknown_ids(server: BackgroundServer) -> None:
    api = client(server)
    model = server.service.model
    listed = api.models.list().data
    got = api.models.retrieve(model)
    assert got.id == model and got.object == "model" and [m.id for m in listed] == [model]
    assert got.model_dump() == listed[0].model_dump()
    with pytest.raises(openai.NotFoundError) as err:
        api.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and "no-such-model" in err.value.body["message"]


# -- metrics -----------------------------------------------------------------------------------------
N = 3


def test_a_scrape_after_n_requests_shows_the_vllm_series(server: BackgroundServer) -> None:
    api = client(server)
    usages = []
    started = time.monotonic()
    for i in range(N):
        response = api.completions.create(model=server.service.model, prompt=f"Request {i}:", max_tokens=5 + i)
        usages.append(response.usage)
    wall = time.monotonic() - started
    # one more, streamed: while it runs the scheduler gauges show one running sequence
    stream = api.completions.create(model=server.service.model, prompt="Streamed", max_tokens=200, stream=True)
    next(iter(stream))
    during, _ = scrape(server)
    assert during["vllm:num_requests_running", ()] == 1 and during["vllm:num_requests_waiting", ()] == 0
    assert during["vllm:kv_cache_usage_perc", ()] == 0.5  # 1 of 2 slots
    stream.response.close()
    wait_for(lambda: scrape(server)[0].get(("stlm_requests_total", (("status", "499"),)), 0) == 1)

    samples, types = scrape(server)
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    streamed = samples["vllm:generation_tokens_total", ()] - generated
    assert streamed >= 1
    assert samples["vllm:prompt_tokens_total", ()] >= prompt + 1  # + the streamed request's prompt
    finished = {
        dict(labels)["finished_reason"]: v for (n, labels), v in samples.items() if n == "vllm:request_success_total"
    }
    assert finished["stop"] + finished["length"] == N and finished["abort"] == 1
    assert samples["stlm_requests_total", (("status", "200"),)] == N  # each request counted once
    assert samples["vllm:e2e_request_latency_seconds_count", ()] == N + 1
    assert samples["vllm:e2e_request_latency_seconds_sum", ()] > 0
    assert samples["vllm:time_to_first_token_seconds_count", ()] == N + 1
    assert samples["vllm:request_queue_time_seconds_count", ()] == N + 1
    # a gap per token after each sequence's first
    gaps = generated - N + streamed - 1
    assert samples["vllm:inter_token_latency_seconds_count", ()] == gaps
    assert samples["vllm:time_per_output_token_seconds_count", ()] == gaps
    ttft_sum = samples["vllm:time_to_first_token_seconds_sum", ()]
    assert 0 < ttft_sum and samples["stlm_time_to_first_token_seconds_sum", ()] == ttft_sum
    assert samples["vllm:e2e_request_latency_seconds_sum", ()] - ttft_sum < wall + 60
    assert samples["vllm:prefix_cache_queries_total", ()] == 0 and samples["vllm:prefix_cache_hits_total", ()] == 0
    assert samples["vllm:num_requests_running", ()] == 0 and samples["vllm:kv_cache_usage_perc", ()] == 0
    assert buckets(samples, "vllm:time_to_first_token_seconds") == VLLM_TTFT
    assert buckets(samples, "vllm:inter_token_latency_seconds") == VLLM_TPOT
    assert buckets(samples, "vllm:time_per_output_token_seconds") == VLLM_TPOT
    assert buckets(samples, "vllm:e2e_request_latency_seconds") == VLLM_E2E
    assert buckets(samples, "vllm:request_queue_time_seconds") == VLLM_E2E
    assert types["process_cpu_seconds"] == "counter" and samples["process_cpu_seconds_total", ()] > 0


def _dashboard_series(dashboard: dict[str, Any]) -> set[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    assert exprs, "the dashboard has no queries"
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", re.sub(r"\[[^\]]*\]", "", expr))  # selectors and ranges
        names |= {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if n.startswith(("vllm:", "stlm_"))}
    return names


def test_every_series_of_the_grafana_dashboard_is_exported(server: BackgroundServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    api = client(server)
    api.completions.create(model=server.service.model, prompt="Hello", max_tokens=3)
    samples, types = scrape(server)
    exported = {name for name, _ in samples} | set(types)
    used = _dashboard_series(dashboard)
    assert {"vllm:num_requests_running", "vllm:time_to_first_token_seconds_bucket"} <= used
    missing = sorted(name for name in used if name not in exported)
    assert not missing, f"the dashboard queries series the server does not export: {missing}"
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert "model_name" in variables


# -- tracing -----------------------------------------------------------------------------------------
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def test_spans_per_request_carry_the_clients_trace_id(packages: dict[str, Path]) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from stlm.serve.tracing import RequestTracer

    service = load_service(ServeConfig(packages["hd16-inplace"], port=0, max_batch=2, max_context=256))
    exporter = InMemorySpanExporter()
    service.tracer = RequestTracer(SimpleSpanProcessor(exporter))
    with BackgroundServer(service) as srv:
        api = client(srv)
        response = api.completions.create(
            model=service.model, prompt="Trace me", max_tokens=4, n=2, extra_headers={"traceparent": TRACEPARENT}
        )
        wait_for(lambda: len(exporter.get_finished_spans()) == 7)  # request + 2 × (queue, prefill, decode)
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    (request,) = [s for s in spans if s.parent is not None and format(s.parent.span_id, "016x") == PARENT_ID]
    assert request.name == "POST /v1/completions" and request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert request.attributes["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    children = [s for s in spans if s is not request]
    assert all(s.parent is not None and s.parent.span_id == request.context.span_id for s in children)
    assert sorted(s.name for s in children) == sorted(["stlm.queue", "stlm.prefill", "stlm.decode"] * 2)
    decoded = sum(s.attributes["gen_ai.usage.output_tokens"] for s in children if s.name == "stlm.decode")
    assert decoded == response.usage.completion_tokens
    for index in (0, 1):
        phases = {s.name: s for s in children if s.attributes["stlm.sequence.index"] == index}
        assert phases["stlm.queue"].end_time <= phases["stlm.prefill"].start_time + 1
        assert phases["stlm.prefill"].end_time <= phases["stlm.decode"].start_time + 1
        assert (
            request.start_time <= phases["stlm.queue"].start_time and phases["stlm.decode"].end_time <= request.end_time
        )


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_otlp_endpoint_receives_the_span_tree(packages: dict[str, Path]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    try:
        config = ServeConfig(packages["hd16-inplace"], port=0, max_batch=2, max_context=256, otlp_traces_endpoint=url)
        with BackgroundServer(load_service(config)) as srv:
            api = client(srv)
            api.completions.create(
                model="hd16-inplace", prompt="Hi", max_tokens=2, extra_headers={"traceparent": TRACEPARENT}
            )
        # the server's shutdown flushed the batch
    finally:
        receiver.shutdown()
    spans = []
    for body in _Collector.bodies:
        message = ExportTraceServiceRequest.FromString(body)
        spans += [s for r in message.resource_spans for scope in r.scope_spans for s in scope.spans]
    assert sorted(s.name for s in spans) == ["POST /v1/completions", "stlm.decode", "stlm.prefill", "stlm.queue"]
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}


def test_opentelemetry_is_imported_only_with_the_flag(packages: dict[str, Path]) -> None:
    script = (
        "import sys\n"
        "from stlm.serve import ServeConfig, load_service, create_app\n"
        f"s = load_service(ServeConfig({str(packages['hd16-inplace'])!r}, max_batch=1, max_context=64))\n"
        "create_app(s)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    missing = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"  # as if the tracing extra were not installed
        "from stlm.cli import main\n"
        f"sys.argv = ['stlm', 'serve', {str(packages['hd16-inplace'])!r}, '--port', '0',"
        " '--otlp-traces-endpoint', 'http://127.0.0.1:9/v1/traces']\n"
        "main()\n"
    )
    run = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "error:" in run.stderr and "pip install 'stlm[tracing]'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
