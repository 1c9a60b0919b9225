"""Operational routes: tokenizer endpoints (vLLM's shapes, which lm-eval's remote tokenizer reads),
version, liveness and readiness, models, metrics.

- ``POST /tokenize`` ``{"prompt": str}`` or ``{"messages": [...]}`` (rendered with the chat
  template; ``add_generation_prompt`` default true), ``add_special_tokens`` (accepted; this
  tokenizer adds none), ``return_token_strs`` → ``{"count", "max_model_len", "tokens",
  "token_strs"}``.
- ``POST /detokenize`` ``{"tokens": [ids]}`` → ``{"prompt": text}``.
- ``GET /tokenizer_info`` → the special tokens, ``tokenizer_class``, ``model_max_length`` and
  ``chat_template`` (lm-eval's ``local-completions`` uses the server's tokenizer when it answers).
- ``GET /version`` → ``{"version"}``; ``GET /health`` liveness: 200 while the scheduler runs
  (serving or draining), 503 once it failed or stopped; ``GET /ready`` readiness: 200 only while
  it accepts work (503 while starting, once the shutdown began, or after a failure).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import stlm
from stlm.errors import StlmError
from stlm.runtime.chat import missing_template
from stlm.serve import jsonio
from stlm.serve.apierror import ApiError
from stlm.serve.chat_protocol import parse_chat_request
from stlm.serve.metrics import CONTENT_TYPE
from stlm.serve.protocol import api_error_from, bad, request_object, typed
from stlm.serve.service import CompletionService

__all__ = ["model_cards", "ops_routes"]

MAX_DETOKENIZE = 1 << 20  # ids per /detokenize request


def json_response(
    body: dict[str, Any], status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """A JSON response (strict JSON)."""
    response = Response(jsonio.dumps(body), status_code=status, media_type="application/json")
    response.raw_headers.extend(headers or [])
    return response


def _tokenize(service: CompletionService, raw: bytes) -> dict[str, Any]:
    body = request_object(
        raw, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
    )
    service.check_model(typed(body, "model", (str,), "a string"))
    typed(body, "add_special_tokens", (bool,), "a boolean")
    strings = bool(typed(body, "return_token_strs", (bool,), "a boolean"))
    if ("prompt" in body) == ("messages" in body):
        raise bad("prompt", "pass either prompt (a string) or messages (a chat)", "missing_field")
    if "prompt" in body:
        text = typed(body, "prompt", (str,), "a string")
        if text is None:
            raise bad("prompt", "prompt must be a string", "invalid_type")
    else:
        text = _render(service, body)
    ids = service.generator.tokenizer.encode(text)
    return {
        "count": len(ids),
        "max_model_len": service.capacity,
        "tokens": ids,
        "token_strs": [service.texts.text_of(i) for i in ids] if strings else None,
    }


def _render(service: CompletionService, body: dict[str, Any]) -> str:
    if service.chat_template is None:
        raise ApiError(400, api_error_from(missing_template(service.model)).message, param="messages")
    generation = typed(body, "add_generation_prompt", (bool,), "a boolean")
    chat = parse_chat_request(jsonio.dumps({"messages": body["messages"]}))
    try:
        return service.chat_template.render(chat.messages, add_generation_prompt=generation is not False)
    except StlmError as exc:
        raise ApiError(400, api_error_from(exc).message, param="messages") from None


def _detokenize(service: CompletionService, raw: bytes) -> dict[str, Any]:
    body = request_object(raw, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < service.vocab_size for t in tokens):
        raise bad("tokens", f"tokens must be a list of token ids from 0 to {service.vocab_size - 1}")
    if len(tokens) > MAX_DETOKENIZE:
        raise bad("tokens", f"tokens has {len(tokens)} ids; at most {MAX_DETOKENIZE}", "invalid_value")
    return {"prompt": service.decode(tokens)}


def tokenizer_info(service: CompletionService) -> dict[str, Any]:
    """``/tokenizer_info``: what a client needs to tokenize as the server does."""
    manifest, template = service.generator.manifest, service.chat_template
    tokens = dict(template.variables) if template is not None else {}
    tokenizer = service.generator.tokenizer
    for key, token_id in (
        ("bos_token", manifest.generation.bos_token_id),
        ("eos_token", manifest.generation.eos_token_id),
    ):
        name = tokenizer.backend.id_to_token(token_id)
        if name is not None:
            tokens.setdefault(key, name)
    pad = tokenizer.backend.id_to_token(manifest.generation.pad_token_id)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "pad_token": tokens.get("pad_token", pad),
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": service.capacity,
        "vocab_size": tokenizer.vocab_size,
        "chat_template": template.source if template is not None else None,
    }


def _health(service: CompletionService) -> Response:
    s = service.scheduler
    if s.crashed is not None or (s.stopping and not s.running):  # logged when it happened
        state = "error" if s.crashed is not None else "stopped"
        return json_response({"status": state}, 503, ApiError(503, "").headers())
    return json_response(
        {
            "status": "draining" if s.stopping or service.draining else "ok",
            "model": service.model,
            "slots_in_use": s.slots_in_use,
            "queue_depth": s.queue_depth,
        }
    )


def _ready(service: CompletionService) -> Response:
    s = service.scheduler
    if s.crashed is not None or s.stopping or service.draining or not s.alive:
        state = "error" if s.crashed is not None else "draining" if s.stopping or service.draining else "starting"
        return json_response({"status": state}, 503, ApiError(503, "").headers())
    return json_response({"status": "ready", "model": service.model})


def model_cards(service: CompletionService) -> list[dict[str, Any]]:
    """The ``model`` objects the server lists: the served model (adapters are appended after it,
    each with ``parent`` naming the base model, vLLM's shape)."""
    base = {
        "id": service.model,
        "object": "model",
        "created": 0,
        "owned_by": "stlm",
        "root": service.model,
        "parent": None,
        "max_model_len": service.capacity,
    }
    return [base]


def _models(service: CompletionService) -> Response:
    return json_response({"object": "list", "data": model_cards(service)})


def _model(service: CompletionService, model_id: str) -> Response:
    """``GET /v1/models/{id}``: one of :func:`model_cards`, or an OpenAI-style 404."""
    for card in model_cards(service):
        if card["id"] == model_id:
            return json_response(card)
    error = ApiError(
        404, f"the model {model_id!r} does not exist; this server serves {service.model!r}", code="model_not_found"
    )
    return json_response(error.body(), error.status, error.headers())


def ops_routes(service: CompletionService) -> list[Route]:
    """Routes besides the generation routes."""

    def answer(make: Callable[[CompletionService], Response]) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            return make(service)

        return route

    def cpu_json(
        work: Callable[[CompletionService, bytes], dict[str, Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            raw = await request.body()
            return json_response(await service.cpu.run(lambda: work(service, raw)))

        return route

    async def one_model(request: Request) -> Response:
        return _model(service, request.path_params["model_id"])

    return [
        Route("/v1/models", answer(_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", one_model, methods=["GET"]),
        Route("/health", answer(_health), methods=["GET"]),
        Route("/ready", answer(_ready), methods=["GET"]),
        Route("/metrics", answer(lambda s: Response(s.metrics.render(), media_type=CONTENT_TYPE)), methods=["GET"]),
        Route("/version", answer(lambda s: json_response({"version": stlm.__version__})), methods=["GET"]),
        Route("/tokenizer_info", answer(lambda s: json_response(tokenizer_info(s))), methods=["GET"]),
        Route("/tokenize", cpu_json(_tokenize), methods=["POST"]),
        Route("/detokenize", cpu_json(_detokenize), methods=["POST"]),
    ]
