"""Bounded load test of ``stlm serve`` over loopback: errors, throughput, latency, batching gain.

By default it builds the tiny random StableLM (head dim 16, the real GPT-NeoX tokenizer when
``../shared`` has it; needs the ``export`` extra), starts ``python -m stlm serve`` on a free
loopback port, runs a fixed number of non-streamed requests, and stops the server. ``--package``
serves an existing package instead; ``--url`` targets a running server (loopback only).

Phases (each a fixed number of requests, every request with a timeout, so the script always ends):

1. main load: ``--clients`` concurrent clients x ``--requests`` requests each; prints errors,
   requests/s, generated tokens/s, p50 / p99 latency;
2. scaling: generated tokens/s with 1 client, then with 8 clients (8 requests each); the
   ratio shows what continuous batching buys (target >= 3x).

Run: ``.venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 8] [--max-tokens 64]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stlm.assets import NEOX_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = NEOX_TOKENIZER  # bundled with stlm
PROMPTS = [
    "Hello world",
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole",
    "Dear Sir or Madam,",
]
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Result:
    """One request's outcome."""

    ok: bool
    latency: float
    tokens: int
    error: str = ""


def _request(
    url: str, body: dict[str, object], conn: http.client.HTTPConnection | None
) -> tuple[Result, http.client.HTTPConnection]:
    parts = urllib.parse.urlsplit(url)
    if conn is None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=TIMEOUT_S)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            return Result(False, elapsed, 0, f"HTTP {response.status}: {data[:200]!r}"), conn
        return Result(True, elapsed, int(json.loads(data)["usage"]["completion_tokens"])), conn
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        conn.close()
        fresh = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=TIMEOUT_S)
        return Result(False, time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}"), fresh


def run_load(url: str, model: str, *, clients: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    """``clients`` threads each sending ``requests`` requests back to back; (results, wall seconds)."""

    def client(c: int) -> list[Result]:
        conn: http.client.HTTPConnection | None = None
        out = []
        for r in range(requests):
            body = {
                "model": model,
                "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": c * 1000 + r,
            }
            result, conn = _request(url, body, conn)
            out.append(result)
        if conn is not None:
            conn.close()
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    return results, time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _report(name: str, results: list[Result], wall: float) -> float:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    latencies = [r.latency for r in ok] or [float("nan")]
    print(
        f"{name}: {len(results)} requests, {len(results) - len(ok)} errors, {wall:.2f} s, "
        f"{len(ok) / wall:.1f} req/s, {tokens / wall:.0f} tokens/s, "
        f"latency p50 {_percentile(latencies, 0.5) * 1e3:.0f} ms, p99 {_percentile(latencies, 0.99) * 1e3:.0f} ms"
    )
    for r in [r for r in results if not r.ok][:3]:
        print(f"  error: {r.error}")
    return tokens / wall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build_tiny(folder: Path) -> Path:
    from stlm.export.onnx_export import export_onnx
    from stlm.testing import write_random_checkpoint

    checkpoint = write_random_checkpoint(
        folder / "checkpoint", shape="tiny", tokenizer=TOKENIZER if TOKENIZER.is_file() else None
    )
    return export_onnx(checkpoint, folder / "tiny", kv_cache="inplace", overwrite=True)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy in time")


def _model_id(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
    conn.request("GET", "/v1/models")
    return str(json.loads(conn.getresponse().read())["data"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    """Run the phases and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--package", type=Path, help="package to serve (default: build the tiny model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="server slots when this script starts it")
    parser.add_argument("--threads", type=int, default=None, help="server ONNX Runtime threads")
    args = parser.parse_args(argv)
    if args.url and urllib.parse.urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address (this script only loads local servers)")

    proc: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="stlm-serve-load-") as tmp:
        url = args.url
        if url is None:
            package = args.package or _build_tiny(Path(tmp))
            port = _free_port()
            command = [
                sys.executable,
                "-m",
                "stlm",
                "serve",
                str(package),
                "--port",
                str(port),
                "--max-batch",
                str(args.max_batch),
                "--max-queue",
                str(max(64, args.clients)),
                "--max-context",
                "512",
            ]
            if args.threads:
                command += ["--threads", str(args.threads)]
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
        try:
            if proc is not None:
                _wait_healthy(url, proc)
            model = _model_id(url)
            print(
                f"server {url}, model {model!r}, {args.max_tokens} new tokens per request, cpu count {os.cpu_count()}"
            )
            run_load(url, model, clients=4, requests=2, max_tokens=8)  # warm-up
            results, wall = run_load(
                url, model, clients=args.clients, requests=args.requests, max_tokens=args.max_tokens
            )
            _report(f"{args.clients} clients x {args.requests}", results, wall)
            one = _report("1 client  x 8", *run_load(url, model, clients=1, requests=8, max_tokens=args.max_tokens))
            eight = _report("8 clients x 8", *run_load(url, model, clients=8, requests=8, max_tokens=args.max_tokens))
            print(f"tokens/s at 8 clients / at 1 client: {eight / one:.2f}x (target >= 3x)")
            errors = sum(not r.ok for r in results)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
