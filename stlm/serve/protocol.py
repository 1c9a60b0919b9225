"""The OpenAI completions protocol: request validation, error bodies, response and chunk bodies.

Pure functions of their arguments (no I/O), so every rule here is testable without a server.
Accepted request fields: ``model``, ``prompt`` (a string, a list of strings, a list of token ids
or a list of token-id lists), ``max_tokens`` (default 16), ``temperature``, ``top_p``,
``top_k``, ``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``seed``, ``stop`` (str or list of str), ``stream``, ``stream_options``
(``include_usage``, ``continuous_usage_stats``), ``logprobs`` (0-5 alternatives per token),
``echo``, ``n``, ``best_of`` (≥ n; not with ``stream``), ``user``, and ``suffix`` only as null.
the structured-output and stop/length fields and the ignored extras of
:mod:`stlm.serve.structured`. Any other field is a 400, so a misspelt option is never silently ignored. The chat protocol
(:mod:`stlm.serve.chat_protocol`) shares the sampling fields parsed here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stlm.errors import StlmError
from stlm.runtime.sampling import SamplingParams
from stlm.serve import jsonio
from stlm.serve.apierror import ApiError
from stlm.serve.structured import CONTROL_FIELDS, IGNORED_FIELDS, STRUCTURED_FIELDS, extra_params

__all__ = [
    "ApiError",  # re-exported
    "CompletionRequest",
    "Prompt",
    "StreamOptions",
    "api_error_from",
    "parse_completion_request",
]

DEFAULT_MAX_TOKENS = 16  # the OpenAI default (completions)
MAX_LOGPROBS = 5  # OpenAI's limit for completions' logprobs
MAX_STOP = 16  # stop strings per request (OpenAI allows 4); each costs work at every step
MAX_LOGIT_BIAS = 1024  # entries of logit_bias; each costs work at every step

#: a prompt: text, or token ids
Prompt = str | tuple[int, ...]

# request fields every generation request accepts (besides its prompt / messages)
SAMPLING_FIELDS = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "user",
    }
) | (STRUCTURED_FIELDS | CONTROL_FIELDS | IGNORED_FIELDS)  # stlm.serve.structured
_FIELDS = SAMPLING_FIELDS | {"prompt", "max_tokens", "logprobs", "echo", "best_of", "suffix"}


def api_error_from(
    exc: StlmError,
    *,
    status: int = 400,
    code: str | None = "invalid_value",
    names: Mapping[str, str] | None = None,
    fields: Collection[str] = (),
) -> ApiError:
    """An :class:`ApiError` carrying a :class:`StlmError`'s message (problem and fix), internal
    field names replaced by the API's (``names``; default ``max_new_tokens`` → ``max_tokens``), and,
    when the message starts with ``name=...`` or with one of ``fields``, that request parameter."""
    if isinstance(exc, ApiError):
        return exc
    names = {"max_new_tokens": "max_tokens"} if names is None else names
    problem, fix = exc.problem, exc.fix
    for internal, public in names.items():
        pattern = re.compile(rf"\b{re.escape(internal)}\b")
        problem = pattern.sub(public, problem)
        fix = None if fix is None else pattern.sub(public, fix)
    match = re.match(r"(\w+)(=?)", problem)
    param = match.group(1) if match and (match.group(2) or match.group(1) in fields) else None
    message = problem if fix is None else f"{problem} (fix: {fix})"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message, type=kind, param=param, code=code)


def bad(param: str, message: str, code: str = "invalid_type") -> ApiError:
    """A 400 about request field ``param``."""
    return ApiError(400, message, param=param, code=code)


def typed(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], expected: str) -> Any:
    """``body[name]`` if it is of ``kinds`` (None if absent or null), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise bad(name, f"{name} must be {expected}, got {type(value).__name__} {json.dumps(value)[:60]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(name, f"{name} must be finite, got {value}", "invalid_value")
    return value


def request_object(raw: bytes, fields: frozenset[str] | set[str]) -> dict[str, Any]:
    """The JSON object of a request body, every field known (else a 400 listing the accepted ones)."""
    body = jsonio.loads(raw)
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    for name in body:
        if name not in fields:
            raise bad(name, f"unknown field {name!r}; accepted: {', '.join(sorted(fields))}", "unknown_field")
    return body


@dataclass(frozen=True)
class StreamOptions:
    """``stream`` and its ``stream_options``."""

    stream: bool = False
    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage: bool = False  # usage so far in every chunk


def stream_options(body: Mapping[str, Any]) -> StreamOptions:
    """``stream`` and ``stream_options`` of a request (options only with ``stream: true``)."""
    stream = bool(typed(body, "stream", (bool,), "a boolean"))
    options = typed(body, "stream_options", (dict,), "an object")
    if options is None:
        return StreamOptions(stream)
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true", "invalid_value")
    extra = set(options) - {"include_usage", "continuous_usage_stats"}
    if extra:
        raise bad("stream_options", f"unknown stream_options field(s) {sorted(extra)}", "unknown_field")
    include = bool(typed(options, "include_usage", (bool,), "a boolean"))
    continuous = bool(typed(options, "continuous_usage_stats", (bool,), "a boolean"))
    return StreamOptions(stream, include, continuous)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got {json.dumps(stop)[:80]}")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"stop has {len(stop)} strings; at most {MAX_STOP} are accepted", "invalid_value")
    return tuple(stop)


def _logit_bias(body: Mapping[str, Any]) -> dict[str, Any] | None:
    bias = typed(body, "logit_bias", (dict,), "an object mapping token ids to numbers from -100 to 100")
    if bias is not None and len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", "invalid_value")
    return bias


def sampling_params(
    body: Mapping[str, Any], max_tokens: tuple[str, int | None], names: Mapping[str, str], **fields: Any
) -> SamplingParams:
    """The :class:`SamplingParams` of a request's shared sampling fields; ``max_tokens`` is
    ``(field name, value)`` (None: ``SamplingParams``' default, the caller replaces it), ``fields``
    are further ``SamplingParams`` fields."""
    number = (int, float)
    options: dict[str, Any] = {
        "max_new_tokens": max_tokens[1],
        "temperature": typed(body, "temperature", number, "a number"),
        "top_p": typed(body, "top_p", number, "a number"),
        "top_k": typed(body, "top_k", (int,), "an integer"),
        "min_p": typed(body, "min_p", number, "a number"),
        "repetition_penalty": typed(body, "repetition_penalty", number, "a number"),
        "presence_penalty": typed(body, "presence_penalty", number, "a number"),
        "frequency_penalty": typed(body, "frequency_penalty", number, "a number"),
        "seed": typed(body, "seed", (int,), "an integer"),
        "logit_bias": _logit_bias(body),
    }
    typed(body, "user", (str,), "a string")
    typed(body, "model", (str,), "a string")
    fields = {**extra_params(body), **fields}
    try:
        return SamplingParams(**{k: v for k, v in options.items() if v is not None}, stop=_stop(body), **fields)
    except StlmError as exc:
        raise api_error_from(exc, names={"max_new_tokens": max_tokens[0], **names}, fields=body.keys()) from None


def count(body: Mapping[str, Any], name: str, default: int) -> int:
    """A positive integer field (``n``, ``best_of``)."""
    value = typed(body, name, (int,), "an integer >= 1")
    if value is None:
        return default
    if value < 1:
        raise bad(name, f"{name}={value} is invalid: expected an integer >= 1", "invalid_value")
    return int(value)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``POST /v1/completions`` body."""

    model: str | None
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool = False
    n: int = 1
    best_of: int = 1
    continuous_usage: bool = False


def _token_list(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value):
        return tuple(value)
    return None


def _prompts(body: Mapping[str, Any]) -> tuple[Prompt, ...]:
    prompt = body.get("prompt")
    expected = (
        "a string, a non-empty list of strings, a non-empty list of token ids (integers >= 0) or a list of such lists"
    )
    if "prompt" not in body:
        raise bad("prompt", f"prompt is required: {expected}", "missing_field")
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(prompt)
        ids = _token_list(prompt)
        if ids is not None:
            return (ids,)
        lists = [_token_list(p) for p in prompt]
        if all(ids is not None for ids in lists):
            return tuple(ids for ids in lists if ids is not None)
    raise bad("prompt", f"prompt must be {expected}, got {json.dumps(prompt)[:80]}")


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Validate a completions request body; :class:`ApiError` (400) naming the first bad field.

    ``raw`` is parsed by :func:`stlm.serve.jsonio.loads` (depth limit, no lone surrogates)."""
    body = request_object(raw, _FIELDS)
    if body.get("suffix") is not None:
        raise bad("suffix", "suffix is not supported by this model (fix: omit it)", "unsupported_value")
    prompts = _prompts(body)
    streaming = stream_options(body)
    echo = bool(typed(body, "echo", (bool,), "a boolean"))
    n = count(body, "n", 1)
    best_of = count(body, "best_of", n)
    if best_of < n:
        raise bad("best_of", f"best_of={best_of} is invalid: expected best_of >= n ({n})", "invalid_value")
    if best_of > n and streaming.stream:
        raise bad("best_of", f"best_of={best_of} > n cannot be streamed (fix: pass stream: false)", "invalid_value")
    logprobs = typed(body, "logprobs", (int,), f"an integer from 0 to {MAX_LOGPROBS}")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(
            "logprobs", f"logprobs={logprobs} is invalid: expected an integer from 0 to {MAX_LOGPROBS}", "invalid_value"
        )
    max_tokens = typed(body, "max_tokens", (int,), "an integer")
    params = sampling_params(
        body,
        ("max_tokens", DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens),
        {"top_logprobs": "logprobs"},
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )
    return CompletionRequest(
        body.get("model"),
        prompts,
        params,
        streaming.stream,
        streaming.include_usage,
        logprobs,
        echo,
        n,
        best_of,
        streaming.continuous_usage,
    )


# -- responses ---------------------------------------------------------------------------------
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def finite(x: float | None) -> float | None:
    """``x``, or None when it is not finite (NaN/inf are not JSON; never expected)."""
    return x if x is not None and math.isfinite(x) else None


def logprobs_body(
    tokens: Sequence[str],
    token_logprobs: Sequence[float | None],
    top_logprobs: Sequence[dict[str, float] | None] | None = None,
    text_offset: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The completions ``logprobs`` object."""
    return {
        "tokens": list(tokens),
        "token_logprobs": [finite(x) for x in token_logprobs],
        "top_logprobs": None if top_logprobs is None else list(top_logprobs),
        "text_offset": None if text_offset is None else list(text_offset),
    }


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(
    object_name: str,
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A response or chunk body: ``text_completion``, ``chat.completion`` or ``chat.completion.chunk``."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": object_name,
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
