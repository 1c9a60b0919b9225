"""Ray Serve's HTTP proxy, taught to answer a lost replica with a retryable OpenAI-style error.

When the replica holding a request dies (OOM kill, node loss, crash), Ray's proxy gets an actor
error and sends nothing, so the client would read uvicorn's bare ``500 Internal Server Error``
(or a stream cut mid-way). :class:`LostReplicaMiddleware` turns that into what the single-process
server sends for a request it could not finish: a ``503`` with an OpenAI error body
(``code: replica_unavailable``) and ``Retry-After``, or, once a stream has started, a final SSE
``error`` event. Clients (the ``openai`` package retries 5xx by default) send the request again
and Ray routes it to a live replica.

Ray loads it in every proxy from the environment (set by :func:`stlm.serve.ray.driver.serve_on_ray`
for the Ray instance it starts, and in the KubeRay manifest)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=stlm.serve.ray.proxy:proxy_middlewares
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stlm.serve.apierror import ApiError

__all__ = ["CALLBACK_ENV", "CALLBACK_PATH", "LostReplicaMiddleware", "proxy_middlewares"]

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "stlm.serve.ray.proxy:proxy_middlewares"
RETRY_AFTER_S = 1
LOST = (
    "the server replica handling this request stopped before it finished (it is being replaced); "
    "the request was not completed: retry it"
)


def _lost_error() -> ApiError:
    return ApiError(503, LOST, type="server_error", code="replica_unavailable")


@dataclass
class _Progress:
    """What the proxy has sent of one response, and whether the client is gone."""

    started: bool = False
    finished: bool = False
    sse: bool = False
    done_event: bool = False
    client_gone: bool = False


class LostReplicaMiddleware:
    """Pure ASGI middleware around Ray's proxy: completes responses the proxy left unanswered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        progress = _Progress()

        async def watched() -> Message:
            message = await receive()
            progress.client_gone |= message["type"] == "http.disconnect"
            return message

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                progress.started = True
                progress.sse = (
                    dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
                )
            elif message["type"] == "http.response.body":
                progress.finished = not message.get("more_body", False)
                progress.done_event = message.get("body", b"").endswith(b"data: [DONE]\n\n")
            await send(message)

        await self.app(scope, watched, tracked)
        if not (progress.finished or progress.client_gone):  # done, or nobody left to answer
            await _complete(scope, send, progress)


async def _complete(scope: Scope, send: Send, progress: _Progress) -> None:
    log.warning("%s %s: the replica was lost before the response ended", scope.get("method"), scope.get("path"))
    body = json.dumps(_lost_error().body()).encode()
    if not progress.started:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif progress.sse and not progress.done_event:  # a stream cut before its [DONE] event
        await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n"})
    else:
        await send({"type": "http.response.body", "body": b""})


def proxy_middlewares() -> list[Middleware]:
    """The callback Ray Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(LostReplicaMiddleware)]
