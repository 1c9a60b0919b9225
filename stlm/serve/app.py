"""The ASGI app of ``stlm serve``: OpenAI-compatible routes over the continuous-batching scheduler.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, the tokenizer and operational routes of :mod:`stlm.serve.ops`
(``/tokenize``, ``/detokenize``, ``/tokenizer_info``, ``/version``, ``/health``, ``/ready``,
``/metrics``). Each generation request becomes a :class:`~stlm.serve.service.Plan` whose decoding
states become :class:`~stlm.serve.scheduler.Job`\\ s; the scheduler thread posts their step
outputs to the event loop, and the response (:mod:`stlm.serve.responses`) streams or collects
them. A client that disconnects cancels its jobs, which frees their slots at the scheduler's
next step.

Every route sits behind :class:`~stlm.serve.guard.Guard` (request ids, API key / Host checks,
body limits, generic 500s). CPU work — parsing a body, rendering a chat, tokenizing prompts —
runs on :class:`~stlm.serve.offload.CpuPool` threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from stlm.errors import StlmError
from stlm.serve import protocol
from stlm.serve.apierror import ApiError
from stlm.serve.guard import Guard, GuardPolicy, internal_error, request_id
from stlm.serve.jobs import Job, QueueFullError, SchedulerStoppedError, StepOutput
from stlm.serve.ops import json_response, ops_routes
from stlm.serve.responses import ChatResponse, CompletionResponse, GenerationResponse
from stlm.serve.service import CompletionService, Plan

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _error_response(exc: ApiError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers())


def _generation_route(service: CompletionService, prepare: str, kind: type[GenerationResponse]) -> Callable[..., Any]:
    """The route of one generation API: ``service.<prepare>(body)`` makes the plan, ``kind`` answers."""

    async def route(request: Request) -> Response | GenerationResponse:
        arrived = time.monotonic()
        rid = request_id(request.scope)
        try:
            raw = await request.body()  # the guard enforces the size and time limits while reading
            make: Callable[[bytes], Plan] = getattr(service, prepare)
            plan = await service.cpu.run(lambda: make(raw))
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
            jobs = [
                Job(state, _poster(loop, queue, i), tag=f"{rid}#{i}", prompt_logprobs=plan.prompt_logprobs)
                for i, state in enumerate(plan.states)
            ]
            service.scheduler.submit(jobs)
        except ApiError as exc:
            return _counted(service, _error_response(exc), arrived)
        except QueueFullError as exc:
            error = ApiError(
                429, str(exc).replace("\n  fix: ", " (fix: ") + ")", type="rate_limit_error", code="queue_full"
            )
            return _counted(service, _error_response(error), arrived)
        except SchedulerStoppedError as exc:
            error = ApiError(503, exc.problem, type="server_error", code="shutting_down")
            return _counted(service, _error_response(error), arrived)
        except StlmError as exc:
            return _counted(service, _error_response(protocol.api_error_from(exc)), arrived)
        return kind(service, plan, jobs, queue, arrived, rid)

    return route


def _routes(service: CompletionService) -> list[Route]:
    return [
        Route("/v1/completions", _generation_route(service, "prepare", CompletionResponse), methods=["POST"]),
        Route("/v1/chat/completions", _generation_route(service, "prepare_chat", ChatResponse), methods=["POST"]),
        *ops_routes(service),
    ]


def _poster(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[int, StepOutput]], index: int
) -> Callable[[StepOutput], None]:
    def post(output: StepOutput) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, output))

    return post


def _counted(service: CompletionService, response: Response, arrived: float) -> Response:
    service.metrics.requests.inc(1, str(response.status_code))
    service.metrics.latency.observe(time.monotonic() - arrived)
    return response


# -- errors that escape a route ------------------------------------------------------------------
async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _stlm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StlmError)
    return _error_response(protocol.api_error_from(exc))


async def _client_gone(request: Request, exc: Exception) -> Response:
    log.debug("request %s: the client disconnected before its body was read", request_id(request.scope))
    return Response(status_code=499)


async def _server_error(request: Request, exc: Exception) -> Response:
    rid = request_id(request.scope)
    log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
    return _error_response(internal_error(rid))


def create_app(service: CompletionService) -> ASGIApp:
    """The ASGI app (behind :class:`~stlm.serve.guard.Guard`); its startup starts the scheduler,
    its shutdown stops it (by then the server has finished or cancelled every request)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.scheduler.start()
        log.info(
            "serving %s: %d slots × %d tokens, queue %d, chat template: %s",
            service.model,
            service.scheduler.max_batch,
            service.capacity,
            service.scheduler.max_queue,
            "none" if service.chat_template is None else service.chat_template.origin,
        )
        yield
        log.info("stopping the scheduler")
        await anyio.to_thread.run_sync(lambda: service.scheduler.stop(drain=False, timeout=2.0))
        service.cpu.close()

    app = Starlette(
        routes=_routes(service),
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            ApiError: _api_error,
            StlmError: _stlm_error,
            ClientDisconnect: _client_gone,
            Exception: _server_error,
        },
    )
    return Guard(app, GuardPolicy.from_config(service.config))
