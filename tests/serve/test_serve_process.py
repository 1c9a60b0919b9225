"""`stlm serve` as a process under attack: memory under oversized uploads, /health while huge
prompts are tokenized, SIGTERM with clients that never finish, and options it must refuse.

Each test starts ``python -m stlm serve`` on the tiny in-place package and talks to it over
loopback; the numbers it measures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import pytest
from hostile_http import exchange, is_closed, read_response, request_bytes, strict_json, wait_for

MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``python -m stlm serve PACKAGE ARGS`` on a free port; its log goes to a file."""

    def __init__(self, package: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        command = [sys.executable, "-m", "stlm", "serve", str(package), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                return exchange(self.port, request_bytes("GET", "/health"), timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=90, step=0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@pytest.fixture(scope="module")
def inplace_package(packages: dict[str, Path]) -> Path:
    return packages["hd16-inplace"]


@pytest.fixture(scope="module")
def process(inplace_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = ServeProcess(inplace_package, tmp_path_factory.mktemp("serve") / "log.txt", "--max-batch", "2")
    try:
        yield server
    finally:
        server.close()


def chunked_upload(port: int, total: int, chunk: int = MB) -> int:
    """POST ``total`` bytes chunked (stopping when the server hangs up); the bytes it got out."""
    piece = b"x" * chunk
    framed = b"%x\r\n" % chunk + piece + b"\r\n"
    head = request_bytes(
        "POST", "/v1/completions", headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    )
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head)
            while sent < total:
                sock.sendall(framed)
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed the connection after its 413
            pass
    return sent


@pytest.mark.slow
def test_rss_stays_flat_under_oversized_chunked_uploads(process: ServeProcess) -> None:
    assert (
        exchange(process.port, request_bytes("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}'))[0] == 200
    )
    chunked_upload(process.port, 8 * MB)  # warm the 413 path once
    time.sleep(0.5)
    rss0, hwm0 = process.memory()
    with ThreadPoolExecutor(4) as pool:
        sent = list(pool.map(lambda _: chunked_upload(process.port, 200 * MB), range(4)))
    time.sleep(0.5)
    rss1, hwm1 = process.memory()
    print(
        f"\nRSS before {rss0 / MB:.0f} MB, after {rss1 / MB:.0f} MB; peak before {hwm0 / MB:.0f} MB, after "
        f"{hwm1 / MB:.0f} MB; client got out {[s // MB for s in sent]} MB of 4 × 200 MB"
    )
    assert all(s < 100 * MB for s in sent), sent  # the server hung up long before 200 MB
    assert rss1 - rss0 < 64 * MB
    assert hwm1 <= max(hwm0, rss0 + 128 * MB)
    assert exchange(process.port, request_bytes("GET", "/health"))[0] == 200


@pytest.mark.slow
def test_health_answers_while_huge_prompts_are_tokenized(process: ServeProcess) -> None:
    words = "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(800_000))[: 4 * MB - 100]
    bodies = [json.dumps({"prompt": text[i:], "max_tokens": 1}).encode() for i in range(4)]
    assert all(len(b) <= 4 * MB for b in bodies)

    def post(body: bytes) -> tuple[int, float]:
        start = time.monotonic()
        status, _, data = exchange(process.port, request_bytes("POST", "/v1/completions", body), timeout=300)
        assert strict_json(data)["error"]["code"] == "context_length_exceeded"
        return status, time.monotonic() - start

    def poll(sock: socket.socket, until: Callable[[], bool]) -> list[float]:
        latencies: list[float] = []
        while not until() and len(latencies) < 20_000:
            start = time.monotonic()
            sock.sendall(request_bytes("GET", "/health"))
            assert read_response(sock)[0] == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
        return sorted(latencies)

    def summary(latencies: list[float]) -> str:
        p50, p90 = statistics.median(latencies), latencies[int(0.9 * len(latencies))]
        return f"{len(latencies)} polls, median {p50 * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms"

    with socket.create_connection(("127.0.0.1", process.port), timeout=30) as sock:  # one keep-alive connection
        stop_at = time.monotonic() + 2
        idle = poll(sock, lambda: time.monotonic() > stop_at)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, body) for body in bodies]
            time.sleep(0.5)  # the bodies are in; tokenization has begun
            busy = poll(sock, lambda: all(f.done() for f in futures))
            results = [f.result() for f in futures]
    print(f"\n/health idle: {summary(idle)}")
    print(f"/health while 4 × 4 MB prompts are tokenized ({max(t for _, t in results):.1f} s): {summary(busy)}")
    assert [s for s, _ in results] == [400] * 4
    assert len(busy) >= 10, "tokenization finished before /health was polled"
    # the event loop never waits for the tokenizer (before: blocked for 4.6 s). The worst case is
    # left loose: on a loaded 2-core machine the OS alone delays a thread by a few 100 ms.
    assert busy[int(0.9 * len(busy))] < 0.1 and busy[-1] < 2.0


@pytest.mark.slow
def test_sigterm_ends_the_process_within_the_shutdown_deadline(inplace_package: Path, tmp_path: Path) -> None:
    deadline = 2.0
    server = ServeProcess(
        inplace_package,
        tmp_path / "log.txt",
        *("--shutdown-timeout", str(deadline), "--max-batch", "1", "--max-context", "4096"),
        *("--header-timeout", "60", "--body-timeout", "60"),
    )
    clients: list[socket.socket] = []
    try:
        unfinished = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        unfinished.sendall(
            request_bytes(
                "POST", "/v1/completions", headers={"Content-Type": "application/json", "Content-Length": "1000"}
            )
            + b'{"prompt": '
        )
        endless = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # never reads its stream
        endless.sendall(
            request_bytes(
                "POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 4000, "stream": True}).encode()
            )
        )
        clients += [unfinished, endless]
        for _ in range(10):  # and some that never finish their headers
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127")
            clients.append(sock)

        def streaming() -> bool:
            answer = strict_json(exchange(server.port, request_bytes("GET", "/health"))[2])
            return bool(answer["slots_in_use"] == 1)

        wait_for(streaming, timeout=30)
        time.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(deadline + 30)
        took = time.monotonic() - start
        print(f"\nSIGTERM → exit {code} after {took:.2f} s (deadline {deadline} s)")
        assert code == 0, server.log()
        assert took <= deadline + 0.5, server.log()  # slack for a loaded machine; typically below the deadline
        status, _, data = read_response(unfinished, timeout=5)
        assert status == 503 and strict_json(data)["error"]["code"] == "shutting_down"
        endless.settimeout(10)
        received = b""
        while chunk := endless.recv(MB):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"data: " in received and b"[DONE]" not in received
        assert all(is_closed(sock, 5) for sock in clients[2:])
        assert "Traceback" not in server.log()
    finally:
        for sock in clients:
            sock.close()
        server.close()


@pytest.mark.slow
def test_a_second_signal_cancels_at_once(inplace_package: Path, tmp_path: Path) -> None:
    server = ServeProcess(inplace_package, tmp_path / "log.txt", "--shutdown-timeout", "60", "--body-timeout", "60")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as unfinished:
            head = request_bytes(
                "POST", "/v1/completions", headers={"Content-Type": "application/json", "Content-Length": "1000"}
            )
            unfinished.sendall(head + b'{"prompt": ')
            time.sleep(0.5)
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGINT)
            code = server.proc.wait(90)
            took = time.monotonic() - start
            assert code == 0 and took < 10, (code, took, server.log())
            assert read_response(unfinished, timeout=5)[0] == 503
        assert "Traceback" not in server.log()
    finally:
        server.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stlm", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_refuses_what_it_cannot_serve(inplace_package: Path) -> None:
    package = str(inplace_package)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases: list[tuple[tuple[str, ...], dict[str, str] | None, str]] = [
        ((package, "--api-key", ""), None, "--api-key is empty"),
        ((package,), {"STLM_API_KEY": ""}, "--api-key is empty"),
        ((package, "--api-key", "my key"), None, "--api-key contains spaces"),
        ((package, "--max-batch", "100000"), None, "KV cache"),
        ((package, "--max-batch", "0"), None, "--max-batch"),
        ((package, "--max-context", "100000"), None, "--max-context"),
        ((package, "--threads", "10000"), None, "--threads"),
        ((package, "--shutdown-timeout", "-1"), None, "--shutdown-timeout"),
        ((package, "--header-timeout", "nan"), None, "--header-timeout"),
        ((package, "--max-connections", "0"), None, "--max-connections"),
        ((package, "--port", "70000"), None, "--port"),
        ((package, "--port", str(taken.getsockname()[1])), None, "cannot listen"),
        ((package, "--host", "no-such-host.invalid"), None, "--host"),
        ((package, "--chat-template", "/no/such/template.jinja"), None, "does not exist"),
        ((package, "--chat-template", "{% for %}"), None, "not a valid Jinja template"),
    ]
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda case: run_cli(*case[0], env=case[1]), cases))
    finally:
        taken.close()
    for (args, _, expected), result in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.startswith("error: ") and expected in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
