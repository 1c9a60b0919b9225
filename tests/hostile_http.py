"""Raw HTTP over loopback sockets for the hostile-client tests: every read has a timeout."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any


def strict_json(data: bytes | str) -> Any:
    """json.loads that refuses NaN/Infinity (which are not JSON)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in a response body")

    return json.loads(data, parse_constant=refuse)


def request_bytes(
    method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> bytes:
    """A whole HTTP/1.1 request (Content-Length and JSON content type unless ``headers`` say otherwise)."""
    head = {"Host": host}
    if body is not None:
        head["Content-Type"] = "application/json"
        head["Content-Length"] = str(len(body))
    head.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one response; the body is read to Content-Length or EOF."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a whole response head ({data[:200]!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        try:
            while chunk := sock.recv(65536):
                body += chunk
        except TimeoutError:
            pass
    return status, headers, body


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_response(sock, timeout)


def post_json(port: int, body: bytes, path: str = "/v1/completions", **headers: str) -> tuple[int, dict[str, str], Any]:
    """POST a JSON body; (status, headers, parsed JSON body)."""
    status, head, data = exchange(port, request_bytes("POST", path, body, headers))
    return status, head, strict_json(data) if head.get("content-type", "").startswith("application/json") else data


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """True once the peer closed ``sock`` (EOF or reset) within ``timeout`` seconds (data is drained)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> None:
    """Poll ``condition`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(step)
