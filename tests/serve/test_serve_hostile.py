"""`stlm serve` against hostile clients, over real loopback sockets (in-thread servers).

Every answer to a bad request is a 4xx with an OpenAI-style error body, never a 500, a traceback
in the log or NaN in JSON; slow or oversized clients are cut off by the limits and cannot stall
anyone else. Process-level attacks (RSS, SIGTERM deadline, CLI refusals) are in
test_serve_process.py; fuzzing in test_serve_fuzz.py.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_http import exchange, is_closed, post_json, read_response, request_bytes, strict_json, wait_for

from stlm.errors import InvalidArgumentError
from stlm.serve import BackgroundServer, ServeConfig, load_service
from stlm.serve.guard import GuardPolicy

MB = 1 << 20


@pytest.fixture(scope="module")
def inplace_package(packages: dict[str, Path]) -> Path:
    return packages["hd16-inplace"]


def serve(package: Path, **options: Any) -> BackgroundServer:
    settings: dict[str, Any] = dict(port=0, max_batch=2, max_queue=4, max_context=256)
    settings.update(options)
    return BackgroundServer(load_service(ServeConfig(package, **settings)))


@pytest.fixture(scope="module")
def server(inplace_package: Path) -> Iterator[BackgroundServer]:
    """Key-less (so Host/Origin/Content-Type are checked), short body timeout."""
    with serve(inplace_package, body_timeout=1.5, header_timeout=2.0) as srv:
        yield srv


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log() -> Iterator[list[logging.LogRecord]]:
    """WARNING+ records of stlm and uvicorn (uvicorn's loggers do not propagate to the root)."""
    handler = _Records()
    loggers = [logging.getLogger("stlm"), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def errors(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR or r.exc_info]


def assert_error_body(answer: Any, code: str | None = None) -> None:
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"], answer
    if code is not None:
        assert answer["error"]["code"] == code, answer


DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"prompt": "\\ud800"}', "prompt", "invalid_unicode"),
        (b'{"prompt": ["fine", "a\\udfffb"]}', "prompt", "invalid_unicode"),
        (b'{"prompt": "hi", "stop": ["\\ud83d"]}', "stop", "invalid_unicode"),
        (b'{"prompt": "hi", "user": "x\\udc00"}', "user", "invalid_unicode"),
        (DEEP, None, "too_deep"),
        (b'{"prompt": "hi", "logit_bias": ' + b"[" * 70 + b"]" * 70 + b"}", None, "too_deep"),
        (b"[]", None, "invalid_json"),
        (b'"a prompt"', None, "invalid_json"),
        (b"42", None, "invalid_json"),
        (b"null", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"\xff\xfe{}", None, "invalid_json"),
        (b'{"prompt": "hi", "temperature": NaN}', None, "invalid_json"),
        (b'{"prompt": "hi", "top_p": -Infinity}', None, "invalid_json"),
        (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", None, "invalid_json"),
        (b'{"prompt": "hi", "max_tokens": 1e400}', "max_tokens", "invalid_type"),
        (b'{"prompt": "hi", "seed": -1}', "seed", "invalid_value"),
        (json.dumps({"prompt": "hi", "stop": ["a"] * 17}).encode(), "stop", "invalid_value"),
        (json.dumps({"prompt": ["x"] * 1000}).encode(), "prompt", "invalid_value"),
        (json.dumps({"prompt": "hi", "top_k": 1.5}).encode(), "top_k", "invalid_type"),
        (json.dumps({"prompt": "hi", "repetition_penalty": 0}).encode(), "repetition_penalty", "invalid_value"),
    ],
)
def test_hostile_bodies_get_400(
    server: BackgroundServer, server_log: list[logging.LogRecord], body: bytes, param: str | None, code: str
) -> None:
    status, headers, answer = post_json(server.port, body)
    assert status == 400, answer
    assert_error_body(answer, code)
    assert answer["error"]["param"] == param
    assert headers["x-request-id"].startswith("req-")
    assert not errors(server_log)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1e-310, "min_p": 0.1, "logprobs": 1},
        {"temperature": 1e-310, "logprobs": 1},
        {"temperature": 5e-324, "top_p": 0.5, "logprobs": 2},
        {"temperature": 1e-310, "logprobs": 1, "stream": True},
        {"repetition_penalty": 1e-300, "logprobs": 1},
        {"repetition_penalty": 1e300, "temperature": 0, "logprobs": 1},
        {"temperature": 1.7e308, "min_p": 1e-300, "logprobs": 1},
        {"top_p": 5e-324, "top_k": 10**30, "seed": 2**70},
    ],
)
def test_extreme_sampling_values_are_handled(
    server: BackgroundServer, server_log: list[logging.LogRecord], options: dict[str, Any]
) -> None:
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 6, **options}).encode()
    status, _, data = exchange(server.port, request_bytes("POST", "/v1/completions", body))
    assert status == 200, data
    if options.get("stream"):
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [strict_json(e) for e in events[:-1]]
        logprobs = [
            x
            for c in chunks
            if c["choices"] and c["choices"][0]["logprobs"]
            for x in c["choices"][0]["logprobs"]["token_logprobs"]
        ]
    else:
        answer = strict_json(data)
        assert answer["usage"]["completion_tokens"] >= 1
        lp = answer["choices"][0]["logprobs"]
        logprobs = lp["token_logprobs"] if lp else []
    assert all(isinstance(x, float) and math.isfinite(x) and x <= 0 for x in logprobs), logprobs
    assert not errors(server_log)


def test_chunked_body_is_cut_at_the_limit(server: BackgroundServer) -> None:
    limit = server.service.config.max_body_bytes
    head = request_bytes(
        "POST", "/v1/completions", headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    )
    chunk = b"x" * (64 << 10)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        while sent <= limit + len(chunk):  # stop right after crossing the limit, so the server reads all we sent
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
        status, headers, data = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert_error_body(strict_json(data), "request_too_large")
        assert is_closed(sock, 5)
    # declared too large: refused before a byte of the body is sent
    declared = request_bytes(
        "POST", "/v1/completions", headers={"Content-Type": "application/json", "Content-Length": str(200 * MB)}
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(declared)
        status, headers, data = read_response(sock)
        assert status == 413 and str(200 * MB) in strict_json(data)["error"]["message"]
    assert exchange(server.port, request_bytes("GET", "/health"))[0] == 200


def test_a_slow_body_gets_408(server: BackgroundServer) -> None:
    raw = request_bytes(
        "POST", "/v1/completions", headers={"Content-Type": "application/json", "Content-Length": "100"}
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw + b'{"prompt": ')  # ... and nothing more
        start = time.monotonic()
        status, headers, data = read_response(sock, timeout=10)
        waited = time.monotonic() - start
        assert status == 408 and headers["connection"] == "close", data
        assert_error_body(strict_json(data), "request_timeout")
        assert waited < server.service.config.body_timeout + 3
        assert is_closed(sock, 5)


def test_slowloris_cannot_stall_others_nor_the_shutdown(inplace_package: Path) -> None:
    cap, header_timeout = 16, 1.0
    srv = serve(
        inplace_package, max_connections=cap, header_timeout=header_timeout, body_timeout=60, shutdown_timeout=3
    )
    srv.start()
    slow: list[socket.socket] = []
    try:
        # 3 × the cap of connections that trickle header bytes
        for _ in range(3 * cap):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(sock)
        latencies = []
        for _ in range(10):  # others are served meanwhile (each new connection evicts the slowest waiter)
            for sock in slow:
                try:
                    sock.send(b"a")
                except OSError:
                    pass
            start = time.monotonic()
            assert exchange(srv.port, request_bytes("GET", "/health"), timeout=10)[0] == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.1)
        assert max(latencies) < 5, latencies
        # after the header deadline none of them is still open
        deadline = time.monotonic() + header_timeout + 5
        assert all(is_closed(sock, max(0.1, deadline - time.monotonic())) for sock in slow)
        # a cap of busy connections (bodies that never finish): the next one is told to retry
        busy = []
        for _ in range(cap):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            sock.sendall(
                request_bytes(
                    "POST", "/v1/completions", headers={"Content-Type": "application/json", "Content-Length": "100"}
                )
                + b"{"
            )
            busy.append(sock)
        time.sleep(0.3)
        status, headers, data = exchange(srv.port, request_bytes("GET", "/health"), timeout=10)
        assert status == 503 and headers["retry-after"] and strict_json(data)["error"]["code"] == "too_many_connections"
        slow.extend(busy)
    finally:
        start = time.monotonic()
        srv.stop()
        stopped = time.monotonic() - start
        for sock in slow:
            sock.close()
    assert stopped < srv.service.config.shutdown_timeout + 2, stopped


def test_without_a_key_only_local_json_requests(server: BackgroundServer) -> None:
    port = server.port

    def get(host: str, **headers: str) -> tuple[int, Any]:
        status, _, data = exchange(port, request_bytes("GET", "/v1/models", headers=headers, host=host))
        return status, strict_json(data)

    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST.:{port}", "[::1]:8000", "127.0.0.5"):
        assert get(host)[0] == 200, host
    for host in (
        "evil.example",
        f"evil.example:{port}",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
        "10.0.0.1",
    ):
        status, answer = get(host)
        assert status == 403 and answer["error"]["code"] == "host_not_allowed", host
    for origin in ("http://localhost:3000", f"http://127.0.0.1:{port}"):
        assert get("127.0.0.1", Origin=origin)[0] == 200
    for origin in ("http://evil.example", "null", "https://localhost.evil.example"):
        status, answer = get("127.0.0.1", Origin=origin)
        assert status == 403 and answer["error"]["code"] == "origin_not_allowed", origin
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, _, answer = post_json(port, body, **{"Content-Type": kind})  # type: ignore[arg-type]
        assert status == 415 and answer["error"]["code"] == "unsupported_media_type", kind
    assert post_json(port, body, **{"Content-Type": "application/json; charset=utf-8"})[0] == 200
    # the client's request id is kept, a hostile one replaced
    assert (
        exchange(port, request_bytes("GET", "/health", headers={"X-Request-Id": "abc-123"}))[1]["x-request-id"]
        == "abc-123"
    )
    assert exchange(port, request_bytes("GET", "/health", headers={"X-Request-Id": "a b\tc"}))[1][
        "x-request-id"
    ].startswith("req-")


def test_guard_policy_follows_the_bound_host() -> None:
    assert GuardPolicy.from_config(ServeConfig(Path("p"), host="0.0.0.0")).allowed_hosts is None
    assert GuardPolicy.from_config(ServeConfig(Path("p"), host="::")).allowed_hosts is None
    named = GuardPolicy.from_config(ServeConfig(Path("p"), host="Box.LAN")).allowed_hosts
    assert named is not None and "box.lan" in named and "localhost" in named
    for bad in ("", "\t"):
        with pytest.raises(InvalidArgumentError, match="--api-key"):
            ServeConfig(Path("p"), api_key=bad)
    with pytest.raises(InvalidArgumentError, match="--shutdown-timeout"):
        ServeConfig(Path("p"), shutdown_timeout=math.nan)


def test_api_key_is_required_on_every_route_but_health(inplace_package: Path) -> None:
    key = "k-" + "x" * 30
    with serve(inplace_package, api_key=key) as srv:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        for method, path, data in (
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("POST", "/v1/completions", body),
            ("GET", "/no/such/route", None),
        ):
            for auth in (None, "Bearer wrong", f"Basic {key}", f"Bearer {key}x", f"Bearer {key[:-1]}"):
                status, _, answer = exchange(srv.port, request_bytes(method, path, data, {"Authorization": auth}))  # type: ignore[dict-item]
                assert status == 401 and strict_json(answer)["error"]["code"] == "invalid_api_key", (path, auth)
        assert exchange(srv.port, request_bytes("GET", "/health"))[0] == 200
        good = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
        # with a key, Host and Content-Type are not policed (a proxy may rewrite them)
        assert exchange(srv.port, request_bytes("POST", "/v1/completions", body, good, host="api.example"))[0] == 200


def test_429_and_503_say_when_to_retry(inplace_package: Path) -> None:
    with serve(inplace_package, max_batch=1, max_queue=0) as srv:
        long = json.dumps({"prompt": "hi", "max_tokens": 250, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as holder:
            holder.sendall(request_bytes("POST", "/v1/completions", long))
            wait_for(lambda: srv.service.scheduler.slots_in_use == 1)
            status, headers, answer = post_json(srv.port, json.dumps({"prompt": "hi"}).encode())
            assert status == 429 and answer["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        srv.service.scheduler.stop(drain=False, timeout=10)
        status, headers, answer = post_json(srv.port, json.dumps({"prompt": "hi"}).encode())
        assert status == 503 and answer["error"]["code"] == "shutting_down" and int(headers["retry-after"]) >= 1
        # not ready once stopping; not live once the scheduler's thread ended
        status, headers, data = exchange(srv.port, request_bytes("GET", "/ready"))
        assert status == 503 and strict_json(data) == {"status": "draining"} and "retry-after" in headers
        status, headers, data = exchange(srv.port, request_bytes("GET", "/health"))
        assert status == 503 and strict_json(data) == {"status": "stopped"} and "retry-after" in headers


def test_internal_errors_reach_the_log_not_the_client(
    server: BackgroundServer, server_log: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes) -> Any:
        raise RuntimeError("Non-zero status code returned while running Gather node /model/layers.0/Gather_3")

    monkeypatch.setattr(server.service, "prepare", broken)
    status, headers, answer = post_json(server.port, json.dumps({"prompt": "hi"}).encode())
    assert status == 500 and answer["error"]["type"] == "server_error"
    rid = headers["x-request-id"]
    assert rid in answer["error"]["message"] and "Gather" not in json.dumps(answer)
    logged = [r for r in server_log if rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "Gather_3" in str(logged[0].exc_info[1])


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (300 << 10) + b"\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
    ],
)
def test_malformed_http_gets_a_json_400(server: BackgroundServer, raw: bytes) -> None:
    status, headers, data = exchange(server.port, raw)
    assert status == 400 and headers["connection"] == "close"
    assert_error_body(strict_json(data), "invalid_http")
