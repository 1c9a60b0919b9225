"""The ASGI app of ``stlm serve``: OpenAI-compatible routes over the continuous-batching scheduler.

Routes: ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``, ``GET /health``
(never needs the API key), ``GET /metrics`` (Prometheus text). Each request's prompts become
:class:`~stlm.serve.scheduler.Job`\\ s; the scheduler thread posts their step outputs to the event
loop, and the response streams or collects them. A client that disconnects cancels its jobs, which
frees their slots at the scheduler's next step.

Every route sits behind :class:`~stlm.serve.guard.Guard` (request ids, API key / Host checks,
body limits, generic 500s). CPU work — parsing a body, tokenizing prompts — runs on
:class:`~stlm.serve.offload.CpuPool` threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from stlm.errors import InvalidArgumentError, PackageError, StlmError
from stlm.runtime.generator import Generator
from stlm.runtime.sequence import SequenceState
from stlm.serve import jsonio, protocol
from stlm.serve.apierror import ApiError
from stlm.serve.config import ServeConfig, available_cpus
from stlm.serve.guard import Guard, GuardPolicy, internal_error, request_id
from stlm.serve.metrics import CONTENT_TYPE, Gauge, ServerMetrics
from stlm.serve.offload import CpuPool
from stlm.serve.prompts import PromptEncoder
from stlm.serve.protocol import CompletionRequest
from stlm.serve.resources import check_kv_cache, memory_budget
from stlm.serve.scheduler import Job, QueueFullError, Scheduler, SchedulerStoppedError, StepOutput

__all__ = ["CompletionService", "ServeConfig", "create_app", "load_service"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048


class CompletionService:
    """The loaded package, its scheduler and metrics: what the routes call."""

    def __init__(self, generator: Generator, config: ServeConfig) -> None:
        self.generator = generator
        self.config = config
        self.model = config.model_name or Path(config.package).resolve().name
        context = generator.context_length
        self.capacity = config.max_context or min(context, DEFAULT_MAX_CONTEXT)
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or not 2 <= self.capacity <= context:
            raise InvalidArgumentError(
                f"--max-context {config.max_context} is invalid: expected 2..{context} (the model's context)",
                fix=f"pass --max-context ≤ {context}",
            )
        backend = generator.backend.name
        check_kv_cache(generator.manifest, backend, config.max_batch, self.capacity, memory_budget(backend))
        self.encoder = PromptEncoder(generator.tokenizer, generator.manifest.generation.bos_token_id, self.capacity)
        self.cpu = CpuPool(max(1, min(4, available_cpus() // 2)))  # leave cores to the event loop and the model
        self.metrics = ServerMetrics()
        try:
            self.scheduler = Scheduler(
                generator.backend,
                max_batch=config.max_batch,
                capacity=self.capacity,
                max_queue=config.max_queue,
                prefill_chunk=config.prefill_chunk,
                metrics=self.metrics,
            )
        except (MemoryError, ValueError) as exc:  # the estimate passed but the allocation failed
            raise InvalidArgumentError(
                f"cannot allocate the KV cache of --max-batch {config.max_batch} × --max-context {self.capacity} "
                f"({type(exc).__name__}: {str(exc)[:200]})",
                fix="pass a smaller --max-batch or --max-context",
            ) from None
        s = self.scheduler
        self.metrics.bind_gauges(
            [
                Gauge("stlm_queue_depth", "Sequences waiting for a slot.", lambda: s.queue_depth),
                Gauge("stlm_running_batch_size", "Rows fed by the latest scheduler step.", lambda: s.running_batch),
                Gauge("stlm_slots_in_use", "Cache slots holding a sequence.", lambda: s.slots_in_use),
                Gauge("stlm_slots_total", "Cache slots (--max-batch).", lambda: s.max_batch),
                Gauge("stlm_slot_capacity_tokens", "Tokens one slot holds (--max-context).", lambda: s.capacity),
            ]
        )

    def prepare(self, raw: bytes) -> tuple[CompletionRequest, list[SequenceState]]:
        """Parse a request body and tokenize its prompts (CPU work: call it off the event loop)."""
        request = protocol.parse_completion_request(raw)
        return request, self.sequences(request)

    def sequences(self, request: CompletionRequest) -> list[SequenceState]:
        """One decoding state per prompt; 400 if a prompt (plus max_tokens) cannot fit a slot."""
        if request.model is not None and request.model != self.model:
            raise ApiError(
                404,
                f"the model {request.model!r} does not exist; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )
        most = self.scheduler.max_batch + self.scheduler.max_queue
        if len(request.prompts) > most:
            raise ApiError(
                400,
                f"the request has {len(request.prompts)} prompts; this server runs {self.scheduler.max_batch} "
                f"at once and queues {self.scheduler.max_queue} (fix: send at most {most} per request)",
                param="prompt",
                code="invalid_value",
            )
        states = []
        for i, ids in enumerate(self.encoder.encode(request.prompts)):
            where = f"prompt[{i}]" if len(request.prompts) > 1 else "the prompt"
            if len(ids) >= self.capacity:
                raise ApiError(
                    400,
                    f"{where} has {self.capacity} tokens or more; this server's context is {self.capacity} tokens "
                    "(fix: shorten it)",
                    param="prompt",
                    code="context_length_exceeded",
                )
            if len(ids) + request.params.max_new_tokens > self.capacity:
                raise ApiError(
                    400,
                    f"max_tokens={request.params.max_new_tokens} after {where} of {len(ids)} "
                    f"tokens exceeds this server's context of {self.capacity} tokens (fix: pass "
                    f"max_tokens ≤ {self.capacity - len(ids)})",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            states.append(SequenceState(ids, request.params, self.generator.tokenizer, self.generator.eos_token_id))
        return states

    def token_text(self, token_id: int) -> str:
        """The text of one token, for ``logprobs.tokens``."""
        return self.generator.tokenizer.decode([token_id], skip_special_tokens=False)


def load_service(config: ServeConfig) -> CompletionService:
    """Load ``config.package`` and build its scheduler (not started yet: the app's startup does)."""
    generator = Generator.load(config.package, threads=config.threads)
    manifest = generator.manifest
    if manifest.kind != "tensorrt" and manifest.variant.get("kv_cache", "concat") != "inplace":
        raise PackageError(
            f"{config.package} uses the 'concat' KV cache, whose arrays grow with every step: "
            "a long-running server needs fixed slots",
            fix="export the package with --kv-cache inplace (the ONNX Runtime default)",
        )
    return CompletionService(generator, config)


# -- responses ---------------------------------------------------------------------------------
def _json(body: dict[str, Any], status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    response = Response(jsonio.dumps(body), status_code=status, media_type="application/json")
    response.raw_headers.extend(headers or [])
    return response


def _error_response(exc: ApiError) -> Response:
    return _json(exc.body(), exc.status, exc.headers())


class _CompletionResponse:
    """Streams (SSE) or collects the outputs of a request's jobs; cancels them on disconnect."""

    def __init__(
        self,
        service: CompletionService,
        request: CompletionRequest,
        jobs: list[Job],
        queue: asyncio.Queue[tuple[int, StepOutput]],
        arrived: float,
        rid: str,
    ) -> None:
        self.service, self.request, self.jobs, self.queue, self.arrived = service, request, jobs, queue, arrived
        self.rid = rid
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.status = 499  # until the response has been sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
                try:
                    await (self._stream(send) if self.request.stream else self._collect(send))
                except OSError:
                    self.status = 499
                group.cancel_scope.cancel()
        finally:
            for job in self.jobs:
                job.cancel()
            self.service.metrics.requests.inc(1, str(self.status))
            self.service.metrics.latency.observe(time.monotonic() - self.arrived)

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        pending = len(self.jobs)
        while pending:
            index, output = await self.queue.get()
            pending -= output.finish_reason is not None
            yield index, output

    async def _collect(self, send: Send) -> None:
        finals: dict[int, StepOutput] = {}
        tokens: dict[int, list[int]] = {i: [] for i in range(len(self.jobs))}
        async for index, output in self._outputs():
            tokens[index].extend(output.token_ids)
            if output.finish_reason is not None:
                finals[index] = output
                if output.error is not None:  # the scheduler logged the details under this request id
                    for job in self.jobs:
                        job.cancel()
                    error = internal_error(self.rid)
                    await self._send_json(send, error.body(), error.status)
                    return
        completions = [finals[i].completion for i in range(len(self.jobs))]
        texts = None
        if self.request.logprobs is not None:
            texts = [[self.service.token_text(t) for t in tokens[i]] for i in range(len(self.jobs))]
        body = protocol.completion_body(
            self.id, self.created, self.service.model, [c for c in completions if c is not None], texts
        )
        await self._send_json(send, body, 200)

    async def _send_json(self, send: Send, body: dict[str, Any], status: int) -> None:
        try:
            data = jsonio.dumps(body)
        except ValueError:  # NaN/inf: never sent as (invalid) JSON
            log.exception("request %s: the response is not valid JSON", self.rid)
            status, data = 500, jsonio.dumps(internal_error(self.rid).body())
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})
        self.status = status

    async def _stream(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        status, prompt_tokens, completion_tokens = 200, 0, 0
        model = self.service.model
        async for index, output in self._outputs():
            if output.error is not None:
                status = 500
                await self._chunk(send, protocol.sse(internal_error(self.rid).body()))
                continue
            choice: dict[str, Any] = {"text": output.text, "index": index, "logprobs": None, "finish_reason": None}
            if self.request.logprobs is not None and output.token_ids:
                choice["logprobs"] = protocol.logprobs_body(
                    [self.service.token_text(t) for t in output.token_ids], list(output.logprobs)
                )
            if output.finish_reason is not None:
                choice["finish_reason"] = protocol.FINISH_REASONS.get(output.finish_reason, output.finish_reason)
                if output.completion is not None:
                    prompt_tokens += output.completion.prompt_tokens
                    completion_tokens += len(output.completion.token_ids)
            elif not output.text and choice["logprobs"] is None:
                continue
            await self._chunk(send, protocol.sse(protocol.chunk_body(self.id, self.created, model, [choice])))
        if self.request.include_usage:
            usage = protocol.usage_body(prompt_tokens, completion_tokens)
            await self._chunk(send, protocol.sse(protocol.chunk_body(self.id, self.created, model, [], usage)))
        await self._chunk(send, protocol.sse("[DONE]"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.status = status

    @staticmethod
    async def _chunk(send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})


# -- routes --------------------------------------------------------------------------------------
def _routes(service: CompletionService) -> list[Route]:
    async def completions(request: Request) -> Response | _CompletionResponse:
        arrived = time.monotonic()
        rid = request_id(request.scope)
        try:
            raw = await request.body()  # the guard enforces the size and time limits while reading
            parsed, states = await service.cpu.run(lambda: service.prepare(raw))
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
            jobs = [Job(state, _poster(loop, queue, i), tag=f"{rid}#{i}") for i, state in enumerate(states)]
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
        return _CompletionResponse(service, parsed, jobs, queue, arrived, rid)

    async def models(request: Request) -> Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": service.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "stlm",
                        "max_model_len": service.capacity,
                    }
                ],
            }
        )

    async def health(request: Request) -> Response:
        s = service.scheduler
        if s.crashed is not None:  # logged when it happened; the client learns only the state
            return _json({"status": "error"}, 503, ApiError(503, "").headers())
        if s.stopping:
            return _json({"status": "draining"}, 503, ApiError(503, "").headers())
        return _json(
            {"status": "ok", "model": service.model, "slots_in_use": s.slots_in_use, "queue_depth": s.queue_depth}
        )

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
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
            "serving %s: %d slots × %d tokens, queue %d",
            service.model,
            service.scheduler.max_batch,
            service.capacity,
            service.scheduler.max_queue,
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
            ClientDisconnect: _client_gone,
            Exception: _server_error,
        },
    )
    return Guard(app, GuardPolicy.from_config(service.config))
