"""The OpenAI completions protocol: request validation, error bodies, response and chunk bodies.

Pure functions of their arguments (no I/O), so every rule here is testable without a server.
Accepted request fields: ``model``, ``prompt`` (str or list of str), ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``seed``, ``stop``
(str or list of str), ``stream``, ``stream_options.include_usage``, ``logprobs`` (int 0-5: the
sampled tokens' log-probabilities; alternatives are not reported), ``user``; OpenAI fields stlm
does not implement are accepted only at their neutral value (``n``/``best_of`` 1, ``echo``
false, ``presence_penalty``/``frequency_penalty`` 0, empty ``logit_bias``, no ``suffix``).
Any other field is a 400, so a misspelt option is never silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from stlm.errors import StlmError
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.sequence import Completion
from stlm.serve import jsonio
from stlm.serve.apierror import ApiError

__all__ = ["ApiError", "CompletionRequest", "api_error_from", "parse_completion_request"]  # ApiError: re-exported

DEFAULT_MAX_TOKENS = 16  # the OpenAI default
MAX_LOGPROBS = 5
MAX_STOP = 16  # stop strings per request (OpenAI allows 4); each costs work at every step

# SamplingParams field -> request field, for naming the bad parameter in errors
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}
# fields stlm accepts only at their neutral value
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "user",
    *_NEUTRAL,
}


def api_error_from(exc: StlmError, *, status: int = 400, code: str | None = "invalid_value") -> ApiError:
    """An :class:`ApiError` carrying a :class:`StlmError`'s message (problem and fix) and, when the
    message starts with ``name=...``, the request parameter it is about."""
    if isinstance(exc, ApiError):
        return exc
    match = re.match(r"(\w+)=", exc.problem)
    param = _PARAM_NAMES.get(match.group(1), match.group(1)) if match else None
    problem = re.sub(r"^max_new_tokens=", "max_tokens=", exc.problem)
    message = problem if exc.fix is None else f"{problem} (fix: {exc.fix})"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message, type=kind, param=param, code=code)


def _bad(param: str, message: str, code: str = "invalid_type") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``POST /v1/completions`` body."""

    model: str | None
    prompts: tuple[str, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], expected: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise _bad(name, f"{name} must be {expected}, got {type(value).__name__} {json.dumps(value)[:60]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(name, f"{name} must be finite, got {value}", "invalid_value")
    return value


def _prompts(body: dict[str, Any]) -> tuple[str, ...]:
    prompt = body.get("prompt")
    expected = "a string or a non-empty list of strings (token-id prompts are not supported)"
    if "prompt" not in body:
        raise _bad("prompt", f"prompt is required: {expected}", "missing_field")
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return tuple(prompt)
    raise _bad("prompt", f"prompt must be {expected}, got {json.dumps(prompt)[:80]}")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"stop must be a non-empty string or a list of them, got {json.dumps(stop)[:80]}")
    if len(stop) > MAX_STOP:
        raise _bad("stop", f"stop has {len(stop)} strings; at most {MAX_STOP} are accepted", "invalid_value")
    return tuple(stop)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Validate a completions request body; :class:`ApiError` (400) naming the first bad field.

    ``raw`` is parsed by :func:`stlm.serve.jsonio.loads` (depth limit, no lone surrogates)."""
    body = jsonio.loads(raw)
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    for name in body:
        if name not in _FIELDS:
            raise _bad(name, f"unknown field {name!r}; accepted: {', '.join(sorted(_FIELDS))}", "unknown_field")
    for name, neutral in _NEUTRAL.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise _bad(
                name,
                f"{name}={json.dumps(body[name])[:60]} is not supported by this server "
                f"(accepted: {', '.join(json.dumps(v) for v in neutral)})",
                "unsupported_value",
            )
    model = _typed(body, "model", (str,), "a string")
    prompts = _prompts(body)
    number = (int, float)
    options: dict[str, Any] = {
        "max_new_tokens": _typed(body, "max_tokens", (int,), "an integer"),
        "temperature": _typed(body, "temperature", number, "a number"),
        "top_p": _typed(body, "top_p", number, "a number"),
        "top_k": _typed(body, "top_k", (int,), "an integer"),
        "min_p": _typed(body, "min_p", number, "a number"),
        "repetition_penalty": _typed(body, "repetition_penalty", number, "a number"),
        "seed": _typed(body, "seed", (int,), "an integer"),
    }
    _typed(body, "user", (str,), "a string")
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    stream_options = _typed(body, "stream_options", (dict,), "an object")
    include_usage = False
    if stream_options is not None:
        extra = set(stream_options) - {"include_usage", "continuous_usage_stats"}
        if extra:
            raise _bad("stream_options", f"unknown stream_options field(s) {sorted(extra)}", "unknown_field")
        include_usage = bool(_typed(stream_options, "include_usage", (bool,), "a boolean"))
    logprobs = _typed(body, "logprobs", (int,), "an integer from 0 to 5")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _bad(
            "logprobs", f"logprobs={logprobs} is invalid: expected an integer from 0 to {MAX_LOGPROBS}", "invalid_value"
        )
    if options["max_new_tokens"] is None:
        options["max_new_tokens"] = DEFAULT_MAX_TOKENS
    try:
        params = SamplingParams(
            **{k: v for k, v in options.items() if v is not None}, stop=_stop(body), logprobs=logprobs is not None
        )
    except StlmError as exc:
        raise api_error_from(exc) from None
    return CompletionRequest(model, prompts, params, stream, include_usage, logprobs)


# -- responses ---------------------------------------------------------------------------------
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def logprobs_body(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (``top_logprobs`` is not computed: null).

    A log-probability that is not finite (never expected: sampling is NaN-proof) is sent as null,
    since NaN/inf are not JSON."""
    finite = [x if math.isfinite(x) else None for x in logprobs]
    return {"tokens": tokens, "token_logprobs": finite, "top_logprobs": None, "text_offset": None}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, created: int, model: str, completions: list[Completion], token_texts: list[list[str]] | None
) -> dict[str, Any]:
    """A non-streamed ``text_completion`` response for finished sequences."""
    choices = []
    for i, c in enumerate(completions):
        logprobs = None
        if token_texts is not None and c.logprobs is not None:
            logprobs = logprobs_body(token_texts[i], list(c.logprobs))
        choices.append(
            {
                "text": c.text,
                "index": i,
                "logprobs": logprobs,
                "finish_reason": FINISH_REASONS.get(c.finish_reason, c.finish_reason),
            }
        )
    usage = usage_body(sum(c.prompt_tokens for c in completions), sum(len(c.token_ids) for c in completions))
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunk_body(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event ``data: ...`` (``[DONE]`` passes as a str)."""
    payload = data.encode() if isinstance(data, str) else jsonio.dumps(data)
    return b"data: " + payload + b"\n\n"
