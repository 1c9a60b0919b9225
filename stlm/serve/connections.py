"""Connection limits uvicorn lacks: a deadline for a request's headers and a connection cap.

:class:`GuardedH11Protocol` is uvicorn's h11 protocol plus

* a header deadline: a connection must deliver a request's complete headers within
  ``header_timeout`` seconds of opening (or of the first byte of a request on a kept-alive
  connection), or it is closed — slowloris clients that trickle headers cannot hold sockets;
  uvicorn's own keep-alive timeout closes connections idle between requests, and h11 caps the
  header size (16 KB);
* a connection cap: past ``max_connections`` open connections, a new one evicts the connection
  that has waited longest for headers (or idled longest between requests); when every
  connection is busy with a request, the new one is answered 503 with ``Retry-After`` and closed.

Use :func:`protocol_class` to get the class for ``uvicorn.Config(http=...)``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from stlm.serve import jsonio
from stlm.serve.apierror import ApiError

__all__ = ["GuardedH11Protocol", "protocol_class"]

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's ``H11Protocol`` with a header deadline and a connection cap (class attributes)."""

    header_timeout: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._peer_done = False  # the client half-closed (shutdown(SHUT_WR)) after its request
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        if self._waiting():
            self._arm()  # the first bytes of a request: its headers are due within the deadline
        super().data_received(data)
        if not self._waiting():
            self._disarm()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio reads the result
        """A half-close: keep the connection open for writing, so the request in flight gets its answer
        (asyncio closes the transport when this returns a false value); closed after that answer."""
        self._peer_done = True
        if self._waiting():
            self.transport.close()  # nothing in flight: nobody is waiting for an answer
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = self.loop.time()
        if self._waiting():
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies
            if self._peer_done:
                self.transport.close()  # the client sends nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A malformed request (bad syntax, headers over 16 KB): an OpenAI-style 400, then close."""
        error = ApiError(400, f"malformed HTTP request ({msg.rstrip('.')})", code="invalid_http")
        self._write_error(error, b"400 Bad Request")

    # -- internals ----------------------------------------------------------------------------
    def _waiting(self) -> bool:
        """True while no request is being handled (waiting for headers, or idle)."""
        cycle: Any = self.cycle
        return cycle is None or bool(cycle.response_complete)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._waiting() and not self.transport.is_closing():
            log.info(
                "closing connection from %s: no complete request headers within %gs", self.client, self.header_timeout
            )
            self.transport.close()

    def _make_room(self) -> None:
        waiting = [
            c
            for c in self.connections
            if c is not self and isinstance(c, GuardedH11Protocol) and c._waiting() and not c.transport.is_closing()
        ]
        if waiting:
            victim = min(waiting, key=lambda c: c._idle_since)
            log.info(
                "connection cap (%d) reached: closing the connection from %s, waiting longest",
                self.max_connections,
                victim.client,
            )
            victim.transport.close()
            return
        log.warning(
            "connection cap (%d) reached and every connection is busy: refusing %s", self.max_connections, self.client
        )
        error = ApiError(
            503,
            f"the server has {self.max_connections} connections open, all busy (fix: retry shortly)",
            type="server_error",
            code="too_many_connections",
        )
        self._write_error(error, b"503 Service Unavailable")

    def _write_error(self, error: ApiError, status: bytes) -> None:
        """Write a whole error response outside of any request cycle, and close."""
        body = jsonio.dumps(error.body())
        head = [
            b"HTTP/1.1 " + status,
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            *(name + b": " + value for name, value in error.headers()),
            b"connection: close",
        ]
        if not self.transport.is_closing():
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            self.transport.close()


def protocol_class(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these limits (for ``uvicorn.Config(http=...)``)."""
    return type(
        "StlmH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": float(header_timeout), "max_connections": int(max_connections)},
    )
