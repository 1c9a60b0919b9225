"""The limits every route gets for free: a pure ASGI middleware in front of the app.

For each HTTP request :class:`Guard`

* gives it a request id (the client's ``X-Request-Id`` when it is a plain token, else a new
  one), sent back in ``X-Request-Id`` and written with every log line about the request;
* without an API key: answers only requests whose ``Host`` (and ``Origin``, when sent) is a
  loopback name or the ``--host`` the server was started with, and whose body is
  ``application/json`` — a web page cannot drive a key-less local server (DNS rebinding,
  "simple" cross-site requests);
* with an API key: requires ``Authorization: Bearer KEY`` (compared in constant time) on every
  path but the open ones (the probes ``/health`` and ``/ready``);
* enforces the body size while the body is read (``Content-Length`` or chunked): past the limit
  the read fails with 413, and a body that does not arrive within the body timeout with 408;
  responses sent before the body was read whole close the connection;
* answers an exception that escaped the app with a generic 500 naming the request id (the
  details go to the log, never to the client), and a request cancelled by the server's shutdown
  deadline with 503 (or, once its response has started, by ending the response).

Errors raised inside ``receive`` are :class:`ApiError`\\ s; a route either lets them propagate
(the app's handler answers them) or catches them like its own validation errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stlm.serve import jsonio
from stlm.serve.apierror import ApiError
from stlm.serve.config import LOOPBACK_HOSTS, ServeConfig

__all__ = ["Guard", "GuardPolicy", "internal_error", "request_id", "send_error"]

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_WILDCARDS = {"0.0.0.0", "::", "*", ""}
_BODY_METHODS = {"POST", "PUT", "PATCH"}


@dataclass(frozen=True)
class GuardPolicy:
    """What :class:`Guard` enforces; see :meth:`from_config`."""

    api_key: str | None
    allowed_hosts: frozenset[str] | None  # None: any Host (bound to a wildcard address)
    max_body_bytes: int
    body_timeout: float
    open_paths: frozenset[str] = frozenset({"/health", "/ready"})

    @classmethod
    def from_config(cls, config: ServeConfig) -> GuardPolicy:
        """The policy of a server started with ``config``."""
        host = config.host.strip().lower().strip("[]")
        allowed = None if host in _WILDCARDS else frozenset({*LOOPBACK_HOSTS, host})
        return cls(config.api_key, allowed, config.max_body_bytes, config.body_timeout)


def request_id(scope: Scope) -> str:
    """The id :class:`Guard` gave this request ('-' outside a guarded app)."""
    return str(scope.get("state", {}).get("request_id", "-"))


def internal_error(rid: str) -> ApiError:
    """The only thing a client learns about a failure inside the server."""
    return ApiError(
        500,
        f"internal error while handling request {rid}; the server log has the details under this id",
        type="server_error",
        code="internal_error",
    )


async def send_error(send: Send, error: ApiError) -> None:
    """Send ``error`` as a whole JSON response."""
    body = jsonio.dumps(error.body())
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *error.headers()]
    await send({"type": "http.response.start", "status": error.status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _host_name(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _is_allowed(name: str, allowed: frozenset[str]) -> bool:
    name = name.rstrip(".")
    if name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Body:
    """``receive`` with the body limits: size (413) and time (408) until the body is complete."""

    def __init__(self, receive: Receive, limit: int, deadline: float, expected: bool) -> None:
        self._receive, self.limit, self.deadline = receive, limit, deadline
        self.complete = not expected
        self.received = 0

    async def __call__(self) -> Message:
        if self.complete:
            return await self._receive()
        message: Message | None = None
        with anyio.move_on_after(max(0.0, self.deadline - time.monotonic())):
            message = await self._receive()
        if message is None:
            raise ApiError(
                408,
                "the request body did not arrive in time (fix: send the whole body at once, within the "
                "server's body timeout)",
                code="request_timeout",
            )
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise _too_large(self.received, self.limit, "at least ")
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True  # disconnected
        return message


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        "the server is shutting down and cancelled this request (fix: retry against another replica or after "
        "the restart)",
        type="server_error",
        code="shutting_down",
    )


def _too_large(size: int, limit: int, qualifier: str = "") -> ApiError:
    return ApiError(
        413,
        f"the request body has {qualifier}{size} bytes; the limit is {limit}",
        code="request_too_large",
    )


class Guard:
    """Pure ASGI middleware applying :class:`GuardPolicy` to every HTTP request."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app, self.policy = app, policy
        self._key_digest = hashlib.sha256(policy.api_key.encode()).digest() if policy.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(scope["headers"])}
        given = headers.get("x-request-id", "")
        rid = given if _CLIENT_ID.fullmatch(given) else f"req-{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = rid
        length = headers.get("content-length", "")
        body = _Body(
            receive,
            self.policy.max_body_bytes,
            time.monotonic() + self.policy.body_timeout,
            expected=(length.isdigit() and int(length) > 0) or "transfer-encoding" in headers,
        )
        started = finished = False

        async def guarded_send(message: Message) -> None:
            nonlocal started, finished
            finished = finished or (message["type"] == "http.response.body" and not message.get("more_body", False))
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-request-id", rid.encode())]
                if not body.complete:  # the rest of the body is not read: the connection cannot be reused
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await send_error(guarded_send, refusal)
            return
        try:
            await self.app(scope, body, guarded_send)
        except asyncio.CancelledError:  # the server's shutdown deadline passed: end the response cleanly
            log.warning(
                "request %s (%s %s) cancelled: the server is shutting down", rid, scope.get("method"), scope.get("path")
            )
            if not started:
                await send_error(guarded_send, _shutting_down())
            elif not finished:
                await guarded_send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as exc:
            if started:  # the app answered (its handler logged it), or the response was cut: nothing to send
                log.debug("request %s ended with %s after its response started", rid, type(exc).__name__)
                return
            if isinstance(exc, ApiError):
                await send_error(guarded_send, exc)
                return
            log.error("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"), exc_info=exc)
            await send_error(guarded_send, internal_error(rid))

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        policy = self.policy
        if policy.api_key is None:
            refused = self._foreign(headers)
            if refused is not None:
                return refused
        elif scope["path"] not in policy.open_paths and not self._authorized(headers.get("authorization", "")):
            return ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                type="authentication_error",
                code="invalid_api_key",
            )
        if policy.api_key is None and scope["method"] in _BODY_METHODS:
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(
                    415,
                    f"Content-Type {kind or '(none)'!r} is not accepted: send the body as application/json",
                    code="unsupported_media_type",
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_body_bytes:
            return _too_large(int(length), policy.max_body_bytes)
        return None

    def _authorized(self, given: str) -> bool:
        scheme, _, token = given.partition(" ")
        digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
        assert self._key_digest is not None
        return hmac.compare_digest(digest, self._key_digest) and scheme.lower() == "bearer"

    def _foreign(self, headers: dict[str, str]) -> ApiError | None:
        allowed = self.policy.allowed_hosts
        if allowed is None:
            return None
        host = headers.get("host")
        if host is not None and not _is_allowed(_host_name(host), allowed):
            return ApiError(
                403,
                f"the Host {host[:100]!r} is not this server's: without --api-key it answers only requests "
                "addressed to a loopback name (fix: use http://127.0.0.1:PORT, or start the server with "
                "--api-key)",
                type="permission_error",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not _is_allowed(_origin_host(origin), allowed):
            return ApiError(
                403,
                f"cross-origin request from {origin[:100]!r} refused: without --api-key this server answers "
                "only pages served from a loopback name (fix: start the server with --api-key)",
                type="permission_error",
                code="origin_not_allowed",
            )
        return None


def _origin_host(origin: str) -> str:
    try:
        return (urlsplit(origin.strip()).hostname or "").lower()
    except ValueError:
        return ""
