"""Observability of Ray Serve replicas: in-process probes of the app and its metrics exported by Ray.

Behind Ray's proxy, ``GET /metrics`` answers from whichever replica the router picks, so a
Prometheus scraping it sees one replica at a time. Instead every replica copies its exposition
(the same series as ``stlm serve``'s ``/metrics``) into Ray's metrics every few seconds; each
Ray node's metrics agent then serves them on its metrics export port, prefixed ``ray_`` and
tagged with the deployment, replica and application (``ray_stlm_requests_total{replica=...}``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

from stlm.serve.metrics import ServerMetrics, parse_metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message

__all__ = ["MetricsExporter", "parse_sample", "probe"]

log = logging.getLogger(__name__)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_sample(key: str) -> tuple[str, dict[str, str]]:
    """``'name{a="1",b="x"}'`` → ``('name', {'a': '1', 'b': 'x'})`` (a key of :func:`parse_metrics`)."""
    match = _SAMPLE.match(key)
    if match is None:
        raise ValueError(f"not a Prometheus sample name: {key!r}")
    labels = {
        name: re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)
        for name, value in _LABEL.findall(match[2] or "")
    }
    return match[1], labels


async def probe(app: ASGIApp, path: str) -> tuple[int, bytes]:
    """``GET path`` on ``app`` in-process (no socket): ``(status, body)``."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],  # in-process: a loopback name passes the Host guard
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    request_sent = False
    status, body = 0, bytearray()

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects; the app returns first
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


class MetricsExporter:
    """Copies a replica's :class:`ServerMetrics` into Ray Serve gauges every ``interval`` seconds.

    Counters and histogram buckets keep their names and labels and become Ray gauges holding the
    cumulative value (``rate()`` and ``histogram_quantile()`` work on them as on the originals).
    """

    def __init__(self, metrics: ServerMetrics, interval: float) -> None:
        self.metrics, self.interval = metrics, interval
        self._gauges: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._task: asyncio.Task[None] | None = None

    def export(self) -> int:
        """Copy every sample once; returns how many were set."""
        from ray.serve import metrics as ray_metrics

        gauge_type: Any = ray_metrics.Gauge
        done = 0
        for key, value in parse_metrics(self.metrics.render()).items():
            name, labels = parse_sample(key)
            gauge, keys = self._gauges.get(name) or (None, tuple(sorted(labels)))
            if gauge is None:
                gauge = gauge_type(name, description=f"stlm serve's {name} of this replica", tag_keys=keys)
                self._gauges[name] = gauge, keys
            if tuple(sorted(labels)) == keys:
                gauge.set(value, tags=labels)
                done += 1
        return done

    def start(self) -> None:
        """Export periodically from the running event loop (idempotent; no-op without a loop)."""
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name="stlm-metrics-export")

    async def _run(self) -> None:
        try:
            import ray.serve.metrics  # noqa: F401
        except ImportError:  # not inside Ray (the replica class also runs without it, e.g. in tests)
            return
        while True:
            try:
                self.export()
            except Exception:  # metrics must never take a replica down
                log.exception("exporting metrics to Ray failed")
            await asyncio.sleep(self.interval)
