"""Fuzzing the server's request parsing with hypothesis.

Property: whatever the body, the answer is a 2xx/4xx whose body is strict JSON (an OpenAI-style
error for 4xx) — never a 500, NaN, a traceback in the log or a server that stops answering.
The pure parser is fuzzed in-process with many examples; the live server over loopback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_http import exchange, request_bytes, strict_json, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlm.serve import BackgroundServer, ServeConfig, load_service
from stlm.serve.apierror import ApiError
from stlm.serve.chat_protocol import ChatRequest, parse_chat_request
from stlm.serve.protocol import CompletionRequest, parse_completion_request

FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "user",
    "n",
    "best_of",
    "echo",
    "suffix",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
]
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff", "ok\ud83d"])
TEXT = st.text(max_size=30) | SURROGATES
NUMBERS = (
    st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, -1, 0.0, -0.0, 1e-310, 5e-324, 1e-300, 1e300, 1.7e308, 2**63, 2**64 + 1])
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
TOKENS = st.lists(st.integers(-2, 50400), max_size=12)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.text(max_size=40)
    | st.lists(st.text(max_size=20), max_size=3)
    | TOKENS
    | st.lists(TOKENS, max_size=3)
    | JSON,
    "max_tokens": st.integers(-3, 40) | JSON,
    "temperature": NUMBERS | JSON,
    "top_p": st.floats(0, 1) | NUMBERS,
    "top_k": st.integers(-2, 60) | NUMBERS,
    "min_p": st.floats(0, 1) | NUMBERS,
    "repetition_penalty": NUMBERS,
    "seed": st.integers(-5, 2**80) | NUMBERS,
    "stop": st.lists(TEXT, max_size=3) | TEXT | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans() | JSON, "continuous_usage_stats": st.booleans() | JSON}
    )
    | JSON,
    "logprobs": st.integers(-1, 6) | JSON,
    "n": st.integers(-1, 4) | JSON,
    "best_of": st.integers(-1, 5) | JSON,
    "echo": st.booleans() | JSON,
    "presence_penalty": st.floats(-3, 3) | NUMBERS,
    "frequency_penalty": st.floats(-3, 3) | NUMBERS,
    "logit_bias": st.dictionaries(st.integers(-5, 50400).map(str) | TEXT, NUMBERS | JSON, max_size=4) | JSON,
}
BODIES = st.fixed_dictionaries({}, optional={name: VALUES.get(name, JSON) for name in FIELDS} | {"unknown_field": JSON})
CONTENT = TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text") | TEXT, "text": TEXT}), max_size=2) | JSON
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | JSON, "content": CONTENT},
    optional={"name": TEXT | JSON, "tool_calls": JSON},
)
CHAT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **{k: v for k, v in VALUES.items() if k not in ("prompt", "logprobs", "best_of", "echo")},
    "messages": st.lists(MESSAGE, max_size=4) | JSON,
    "max_completion_tokens": st.integers(-3, 40) | JSON,
    "logprobs": st.booleans() | JSON,
    "top_logprobs": st.integers(-1, 21) | JSON,
    "add_generation_prompt": st.booleans() | JSON,
    "continue_final_message": st.booleans() | JSON,
    "chat_template_kwargs": st.dictionaries(TEXT, JSON, max_size=3) | JSON,
    "response_format": st.just({"type": "text"}) | JSON,
    "tools": st.just([]) | JSON,
}
CHAT_BODIES = st.fixed_dictionaries(
    {"messages": CHAT_VALUES["messages"]},
    optional={name: strategy for name, strategy in CHAT_VALUES.items() if name != "messages"} | {"unknown": JSON},
)


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


@settings(max_examples=1500, deadline=None)
@given(body=BODIES | JSON)
def test_the_parser_answers_every_body_with_a_request_or_a_4xx(body: Any) -> None:
    try:
        request = parse_completion_request(encode(body))
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
        json.dumps(exc.body(), allow_nan=False)
        return
    assert isinstance(request, CompletionRequest) and request.prompts


@settings(max_examples=1000, deadline=None)
@given(body=CHAT_BODIES | JSON)
def test_the_chat_parser_answers_every_body_with_a_request_or_a_4xx(body: Any) -> None:
    try:
        request = parse_chat_request(encode(body))
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
        json.dumps(exc.body(), allow_nan=False)
        return
    assert isinstance(request, ChatRequest) and request.messages


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=200) | st.builds(lambda b: b"{" + b, st.binary(max_size=50)))
def test_the_parser_answers_any_bytes_with_a_request_or_a_400(raw: bytes) -> None:
    try:
        parse_completion_request(raw)
    except ApiError as exc:
        assert exc.status == 400


@pytest.fixture(scope="module")
def server(chat_package: Path) -> Iterator[BackgroundServer]:
    config = ServeConfig(chat_package, port=0, max_batch=4, max_queue=64, max_context=64)
    with BackgroundServer(load_service(config)) as srv:
        yield srv


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def logged_errors() -> Iterator[list[str]]:
    handler = _Errors()
    loggers = [logging.getLogger("stlm"), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_the_server_answers_every_body_with_json_and_no_500(
    server: BackgroundServer, logged_errors: list[str], body: dict[str, Any]
) -> None:
    status, headers, data = exchange(server.port, request_bytes("POST", "/v1/completions", encode(body)), timeout=60)
    assert status in (200, 400, 404), (status, data[:500])
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", data[-300:]
        for event in events[:-1]:
            assert "error" not in strict_json(event), event
    else:
        answer = strict_json(data)
        if status != 200:
            assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert not logged_errors


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=CHAT_BODIES)
def test_the_server_answers_every_chat_body_with_json_and_no_500(
    server: BackgroundServer, logged_errors: list[str], body: dict[str, Any]
) -> None:
    raw = request_bytes("POST", "/v1/chat/completions", encode(body))
    status, headers, data = exchange(server.port, raw, timeout=60)
    assert status in (200, 400, 404), (status, data[:500])
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", data[-300:]
        assert all("error" not in strict_json(event) for event in events[:-1])
    elif status != 200:
        assert set(strict_json(data)["error"]) == {"message", "type", "param", "code"}
    else:
        assert strict_json(data)["object"] == "chat.completion"
    assert not logged_errors


def test_the_server_is_healthy_after_the_fuzzing(server: BackgroundServer, logged_errors: list[str]) -> None:
    wait_for(lambda: strict_json(exchange(server.port, request_bytes("GET", "/health"))[2])["slots_in_use"] == 0)
    status, _, data = exchange(
        server.port, request_bytes("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 3, "temperature": 0}')
    )
    assert status == 200 and strict_json(data)["usage"]["completion_tokens"] == 3
    assert not logged_errors
