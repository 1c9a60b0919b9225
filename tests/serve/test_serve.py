"""`stlm serve`: the OpenAI-compatible server, driven over loopback with the real `openai` client.

One in-thread server (API key, 4 slots of 256 tokens, 16-token prefill chunks so that prompts are
fed in pieces) serves most tests; the 429 test starts its own 1-slot server, and the SIGTERM test
runs `python -m stlm serve` in a subprocess.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from stlm.runtime import Generator, SamplingParams
from stlm.runtime.sequence import SequenceState
from stlm.serve import BackgroundServer, CompletionService, ServeConfig, load_service
from stlm.serve.metrics import parse_metrics
from stlm.serve.scheduler import Job

KEY = "test-key"
PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a "
    "small model that dreamt of being large and wrote many stories about it.",
    "",
]


@pytest.fixture(scope="module")
def inplace_package(packages: dict[str, Path]) -> Path:
    """The tiny in-place package (fixed slots need the in-place KV cache)."""
    return packages["hd16-inplace"]


@pytest.fixture(scope="module")
def server(inplace_package: Path) -> Iterator[BackgroundServer]:
    service = load_service(
        ServeConfig(inplace_package, port=0, api_key=KEY, max_batch=4, max_queue=16, max_context=256, prefill_chunk=16)
    )
    with BackgroundServer(service) as srv:
        yield srv


@pytest.fixture(scope="module")
def generator(inplace_package: Path) -> Generator:
    return Generator.load(inplace_package)


@pytest.fixture
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def http(url: str, *, body: bytes | None = None, key: str | None = KEY) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET (no body) or POST."""
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def metrics(server: BackgroundServer) -> dict[str, float]:
    """The samples of /metrics, keyed without the model_name label every sample must carry."""
    status, text = http(f"{server.url}/metrics")
    assert status == 200
    label = f'model_name="{server.service.model}"'
    samples = {}
    for key, value in parse_metrics(text).items():
        assert label in key, key
        key = key.replace(label + ",", "").replace(label, "").replace("{}", "")
        samples[key] = value
    return samples


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


MODEL = "hd16-inplace"


def greedy(client: openai.OpenAI, prompt: str, n: int = 24, **kw: Any) -> Any:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, **kw)


def test_models_health_and_completion(server: BackgroundServer, client: openai.OpenAI, generator: Generator) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(f"{server.url}/health", key=None) == (
        200,
        {"status": "ok", "model": MODEL, "slots_in_use": 0, "queue_depth": 0},
    )
    result = greedy(client, PROMPTS[1], 12)
    choice = result.choices[0]
    assert result.object == "text_completion" and choice.finish_reason == "length"
    assert choice.text == generator.generate(PROMPTS[1], max_new_tokens=12, temperature=0)
    prompt_tokens = len(generator.tokenizer.encode(PROMPTS[1]))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )
    # a list of prompts: one choice each, in order; the empty prompt starts from BOS
    several = client.completions.create(model=MODEL, prompt=[*PROMPTS[:2], ""], max_tokens=5, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[1].text == choice.text[: len(several.choices[1].text)]
    assert [c.finish_reason for c in several.choices] == ["length"] * 3 and several.usage.completion_tokens == 15
    # logprobs: one entry per generated token
    with_lp = greedy(client, PROMPTS[0], 6, logprobs=1)
    lp = with_lp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == with_lp.usage.completion_tokens == 6
    assert "".join(lp.tokens) == with_lp.choices[0].text and all(x <= 0 for x in lp.token_logprobs)


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    for prompt in PROMPTS[:3]:
        full = greedy(client, prompt, 30)
        chunks = list(greedy(client, prompt, 30, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
        assert chunks[-1].usage == full.usage


def test_stop_strings(client: openai.OpenAI) -> None:
    full = greedy(client, PROMPTS[0], 30).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    result = greedy(client, PROMPTS[0], 30, stop=[stop, "never-appears"])
    assert (result.choices[0].text, result.choices[0].finish_reason) == (expected, "stop")
    assert result.usage.completion_tokens < 30
    streamed = list(greedy(client, PROMPTS[0], 30, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_api_key(server: BackgroundServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    for path in ("/v1/completions", "/v1/models", "/metrics"):  # no Authorization header at all
        status, answer = http(f"{server.url}{path}", key=None, body=b'{"prompt": "hi"}' if "compl" in path else None)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert http(f"{server.url}/health", key=None)[0] == 200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'{"max_tokens": 4}', "prompt", "missing_field"),
        (b'{"prompt": 42}', "prompt", "invalid_type"),
        (b'{"prompt": [1, "a"]}', "prompt", "invalid_type"),
        (b'{"prompt": [[1], []]}', "prompt", "invalid_type"),
        (b'{"prompt": [-1]}', "prompt", "invalid_type"),
        (b'{"prompt": [50304]}', "prompt", "invalid_value"),
        (b'{"prompt": "hi", "max_tokens": "5"}', "max_tokens", "invalid_type"),
        (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens", "invalid_value"),
        (b'{"prompt": "hi", "temperature": -1}', "temperature", "invalid_value"),
        (b'{"prompt": "hi", "temperature": "hot"}', "temperature", "invalid_type"),
        (b'{"prompt": "hi", "top_p": 1.5}', "top_p", "invalid_value"),
        (b'{"prompt": "hi", "top_p": 0}', "top_p", "invalid_value"),
        (b'{"prompt": "hi", "stream": "yes"}', "stream", "invalid_type"),
        (b'{"prompt": "hi", "stop": [""]}', "stop", "invalid_type"),
        (b'{"prompt": "hi", "n": 0}', "n", "invalid_value"),
        (b'{"prompt": "hi", "n": 2, "best_of": 1}', "best_of", "invalid_value"),
        (b'{"prompt": "hi", "best_of": 2, "stream": true}', "best_of", "invalid_value"),
        (b'{"prompt": "hi", "n": 100}', "n", "invalid_value"),
        (b'{"prompt": "hi", "suffix": "x"}', "suffix", "unsupported_value"),
        (b'{"prompt": "hi", "logit_bias": {"x": 1}}', "logit_bias", "invalid_value"),
        (b'{"prompt": "hi", "presence_penalty": 3}', "presence_penalty", "invalid_value"),
        (b'{"prompt": "hi", "stream_options": {"include_usage": true}}', "stream_options", "invalid_value"),
        (b'{"prompt": "hi", "max_tokenz": 3}', "max_tokenz", "unknown_field"),
        (b'{"prompt": "hi", "max_tokens": 300}', "max_tokens", "context_length_exceeded"),
        (json.dumps({"prompt": "word " * 300}).encode(), "prompt", "context_length_exceeded"),
    ],
)
def test_bad_requests_get_400(server: BackgroundServer, body: bytes, param: str | None, code: str) -> None:
    status, answer = http(f"{server.url}/v1/completions", body=body)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert (answer["error"]["type"], answer["error"]["param"], answer["error"]["code"]) == (
        "invalid_request_error",
        param,
        code,
    )


def test_bad_request_through_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", top_p=2.0)
    assert err.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_full_queue_gets_429(inplace_package: Path) -> None:
    service = load_service(ServeConfig(inplace_package, port=0, max_batch=1, max_queue=1, max_context=256))
    with BackgroundServer(service) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)

        def long_request(i: int) -> tuple[int, Any]:
            try:
                r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=240, temperature=1.0, seed=i)
                return 200, r.choices[0].finish_reason
            except openai.RateLimitError as exc:
                return exc.status_code, exc.body

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(long_request, range(6)))
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 1, results
    assert all(body["code"] == "queue_full" for status, body in results if status == 429)
    assert all(reason == "length" for status, reason in results if status == 200)


def test_queue_limit_counts_sequences_left_waiting(generator: Generator) -> None:
    from stlm.errors import InvalidArgumentError
    from stlm.serve import QueueFullError, Scheduler

    scheduler = Scheduler(generator.backend, max_batch=1, capacity=64, max_queue=1)  # not started: nothing moves

    def jobs(n: int) -> list[Job]:
        state = lambda: SequenceState([1, 2, 3], SamplingParams(max_new_tokens=4), generator.tokenizer, 0)  # noqa: E731
        return [Job(state(), lambda out: None) for _ in range(n)]

    with pytest.raises(InvalidArgumentError, match="never fit"):
        scheduler.submit(jobs(3))
    scheduler.submit(jobs(1))  # takes the free slot at the next step
    scheduler.submit(jobs(1))  # waits
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit(jobs(1))
    assert scheduler.queue_depth == 2


def test_disconnect_frees_the_slot(server: BackgroundServer, client: openai.OpenAI) -> None:
    before = metrics(server)
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=240, temperature=1.0, seed=3, stream=True
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    wait_for(lambda: metrics(server)["stlm_slots_in_use"] == 0)
    after = metrics(server)
    assert (
        after['stlm_sequences_total{reason="cancelled"}']
        == before.get('stlm_sequences_total{reason="cancelled"}', 0) + 1
    )
    assert after["stlm_generated_tokens_total"] - before["stlm_generated_tokens_total"] < 240
    wait_for(lambda: metrics(server).get('stlm_requests_total{status="499"}', 0) >= 1)
    assert greedy(client, PROMPTS[1], 4).choices[0].finish_reason == "length"
    # a non-streamed request whose client hangs up is cancelled too
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 240, "temperature": 1.0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        wait_for(lambda: metrics(server)["stlm_slots_in_use"] == 1)
    wait_for(lambda: metrics(server)["stlm_slots_in_use"] == 0)
    assert (
        metrics(server)['stlm_sequences_total{reason="cancelled"}']
        == after['stlm_sequences_total{reason="cancelled"}'] + 1
    )


def test_greedy_same_alone_and_in_a_batch(
    server: BackgroundServer, client: openai.OpenAI, generator: Generator
) -> None:
    alone = [greedy(client, p, 32).choices[0].text for p in PROMPTS]
    # the runtime's own generator (whole prompt in one piece) agrees with the chunked server
    assert alone == [generator.generate(p, SamplingParams(max_new_tokens=32, temperature=0)) for p in PROMPTS]
    before = metrics(server)

    def run(i: int) -> str:
        time.sleep(0.01 * i)  # staggered: later requests join a batch that is already decoding
        if i >= len(PROMPTS):  # sampled neighbours with their own seeds and lengths
            return (
                client.completions.create(
                    model=MODEL,
                    prompt=PROMPTS[i % 4],
                    max_tokens=20 + 9 * i,
                    temperature=0.9,
                    seed=i,
                    extra_body={"top_k": 40},
                )
                .choices[0]
                .text
            )
        return greedy(client, PROMPTS[i], 32).choices[0].text

    for _ in range(2):
        with ThreadPoolExecutor(7) as pool:
            batched = list(pool.map(run, range(7)))
        assert batched[:4] == alone
    after = metrics(server)
    single = after['stlm_step_batch_size_bucket{le="1"}'] - before['stlm_step_batch_size_bucket{le="1"}']
    steps = after["stlm_step_batch_size_count"] - before["stlm_step_batch_size_count"]
    assert steps - single > 10, "the requests never shared a step"


class _Poisoned:
    """The real backend, except that a row fed ``doomed`` gets NaN logits once it has generated three
    tokens (what an overflowing model returns): sampling that row fails inside the scheduler."""

    def __init__(self, inner: Any, doomed: list[int]) -> None:
        self.inner, self.doomed, self.manifest, self.name = inner, doomed, inner.manifest, inner.name
        self.fed: dict[int, list[int]] = {}

    def new_cache(self, batch: int, capacity: int) -> Any:
        return self.inner.new_cache(batch, capacity)

    def forward(self, cache: Any, tokens: Any) -> Any:
        logits = self.inner.forward(cache, tokens)
        for row, new in enumerate(tokens):
            seq = self.fed.setdefault(row, [])
            seq.extend(new)
            if new and seq[: len(self.doomed)] == self.doomed and len(seq) >= len(self.doomed) + 3:
                logits[row] = float("nan")
        return logits

    def forward_all(self, cache: Any, tokens: Any) -> Any:
        return self.inner.forward_all(cache, tokens)

    def release(self, cache: Any, row: int) -> None:
        self.fed.pop(row, None)
        self.inner.release(cache, row)


def test_a_failing_request_does_not_affect_others(
    inplace_package: Path, generator: Generator, caplog: pytest.LogCaptureFixture
) -> None:
    doomed = generator.encode_prompt("this request is doomed")
    poisoned = Generator(_Poisoned(generator.backend, doomed), generator.tokenizer, generator.manifest)  # type: ignore[arg-type]
    config = ServeConfig(inplace_package, port=0, max_batch=4, max_queue=16, max_context=256, prefill_chunk=16)
    with BackgroundServer(CompletionService(poisoned, config)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        expected = greedy(client, PROMPTS[2], 32).choices[0].text
        with ThreadPoolExecutor(3) as pool:
            good = pool.submit(lambda: greedy(client, PROMPTS[2], 32).choices[0].text)
            bad = pool.submit(lambda: greedy(client, "this request is doomed", 20))
            bad_stream = pool.submit(lambda: list(greedy(client, "this request is doomed", 20, stream=True)))
            assert good.result() == expected
            with pytest.raises(openai.InternalServerError) as err:
                bad.result()
            # the client learns a request id, never the exception; the log has both
            assert err.value.body["type"] == "server_error" and "NaN" not in err.value.body["message"]
            rid = err.value.response.headers["x-request-id"]
            assert rid in err.value.body["message"]
            assert any(rid in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)
            with pytest.raises(openai.APIError, match="internal error while handling request req-"):
                bad_stream.result()
        wait_for(lambda: metrics(server)["stlm_slots_in_use"] == 0)
        assert metrics(server)['stlm_requests_total{status="500"}'] == 2
        assert http(f"{server.url}/health")[0] == 200
        assert greedy(client, PROMPTS[2], 32).choices[0].text == expected


def test_metrics_exposition(server: BackgroundServer) -> None:
    status, text = http(f"{server.url}/metrics")
    assert status == 200
    for name in (
        "stlm_requests_total",
        "stlm_generated_tokens_total",
        "stlm_queue_depth",
        "stlm_running_batch_size",
        "stlm_slots_in_use",
        "stlm_slots_total",
        "stlm_request_latency_seconds",
        "stlm_time_to_first_token_seconds",
        "stlm_time_per_output_token_seconds",
        "stlm_queue_time_seconds",
    ):
        assert f"# TYPE {name} " in text
    samples = metrics(server)  # every sample is labelled with the model name
    assert samples["stlm_slots_total"] == 4 and samples['stlm_requests_total{status="200"}'] >= 1
    assert samples["stlm_request_latency_seconds_count"] == sum(
        v for k, v in samples.items() if k.startswith("stlm_requests_total")
    )


def test_server_imports_neither_torch_nor_transformers(inplace_package: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from stlm.serve import ServeConfig, create_app, load_service; "
        "create_app(load_service(ServeConfig(Path(sys.argv[1])))); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(inplace_package)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_concat_packages_are_refused(packages: dict[str, Path]) -> None:
    from stlm.errors import PackageError

    with pytest.raises(PackageError, match="--kv-cache inplace"):
        load_service(ServeConfig(packages["hd16"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve_drains_on_sigterm(inplace_package: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stlm",
            "serve",
            str(inplace_package),
            "--port",
            str(port),
            "--max-batch",
            "2",
            "--max-context",
            "300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                return http(f"{url}/health", key=None)[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=250,
            temperature=1.0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        received = [next(chunks)]
        proc.send_signal(signal.SIGTERM)
        received.extend(chunks)  # the in-flight stream runs to its end
        assert received[-1].usage.completion_tokens == 250
        assert [c.choices[0].finish_reason for c in received if c.choices][-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
