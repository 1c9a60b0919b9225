"""The OpenAI chat completions protocol: request validation and the bodies of choices.

Accepted request fields: ``messages`` (``role`` system/developer/user/assistant, ``content`` a
string or a list of text parts, optional ``name``), ``max_completion_tokens`` or ``max_tokens``
(default: what fits the slot after the prompt), ``logprobs`` (bool), ``top_logprobs`` (0-20),
the sampling fields of :mod:`stlm.serve.protocol` (``temperature``, ``top_p``, ``top_k``,
``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
``seed``, ``stop``, ``n``, ``stream``, ``stream_options``, ``user``, ``model``),
``response_format`` and the other structured-output and stop/length fields of
:mod:`stlm.serve.structured`, ``tools`` only empty; and vLLM's extensions
``add_generation_prompt`` (default true), ``continue_final_message`` and ``chat_template_kwargs``
(variables for the template). Any other field is a 400 (the policy: :mod:`stlm.serve.structured`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stlm.runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.token_bytes import TokenTexts
from stlm.serve.protocol import (
    SAMPLING_FIELDS,
    bad,
    count,
    finite,
    request_object,
    sampling_params,
    stream_options,
    typed,
)

__all__ = ["ChatRequest", "chat_logprobs_body", "parse_chat_request"]

ROLES = ("system", "developer", "user", "assistant")
_FIELDS = SAMPLING_FIELDS | {
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
}
_MESSAGE_FIELDS = {"role", "content", "name"}


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body. ``max_tokens`` None: fill the slot."""

    model: str | None
    messages: tuple[dict[str, Any], ...]
    params: SamplingParams
    max_tokens: int | None
    max_tokens_field: str
    stream: bool
    include_usage: bool
    continuous_usage: bool
    logprobs: bool
    n: int = 1
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def _content(i: int, content: Any) -> str | None:
    where = f"messages[{i}].content"
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(
                    "messages",
                    f"{where}[{j}] is {json.dumps(part)[:80]}: only text parts "
                    '({"type": "text", "text": "..."}) are supported by this text-only model',
                    "unsupported_value",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad("messages", f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = body.get("messages")
    if "messages" not in body:
        raise bad("messages", "messages is required: a non-empty list of {role, content} objects", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"messages must be a non-empty list of objects, got {json.dumps(messages)[:80]}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("messages", f"messages[{i}] must be an object, got {json.dumps(message)[:60]}")
        extra = set(message) - _MESSAGE_FIELDS
        if extra:
            raise bad(
                "messages",
                f"messages[{i}] has unsupported field(s) {sorted(extra)} (tools are not supported); "
                f"accepted: {', '.join(sorted(_MESSAGE_FIELDS))}",
                "unsupported_value",
            )
        role = message.get("role")
        if role not in ROLES:
            raise bad("messages", f"messages[{i}].role is {json.dumps(role)[:40]}; expected one of {', '.join(ROLES)}")
        content = _content(i, message.get("content"))
        if content is None and role != "assistant":
            raise bad("messages", f"messages[{i}].content is required for role {role!r}", "missing_field")
        name = typed(message, "name", (str,), "a string")
        out.append({"role": role, "content": content, **({"name": name} if name is not None else {})})
    return tuple(out)


def _neutral(body: dict[str, Any]) -> None:
    if body.get("tools") not in (None, []):
        raise bad("tools", "tools are not supported by this server (fix: omit tools)", "unsupported_value")
    if body.get("tool_choice") not in (None, "none"):
        raise bad("tool_choice", 'tool_choice is not supported (accepted: "none")', "unsupported_value")


def _max_tokens(body: dict[str, Any]) -> tuple[str, int | None]:
    new = typed(body, "max_completion_tokens", (int,), "an integer")
    old = typed(body, "max_tokens", (int,), "an integer")
    if new is not None and old is not None and new != old:
        raise bad(
            "max_completion_tokens",
            f"max_completion_tokens={new} and max_tokens={old} disagree (fix: pass only max_completion_tokens)",
            "invalid_value",
        )
    return ("max_completion_tokens", new) if new is not None else ("max_tokens", old)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a chat completions request body; :class:`ApiError` (400) naming the first bad field."""
    body = request_object(raw, _FIELDS)
    messages = _messages(body)
    _neutral(body)
    streaming = stream_options(body)
    logprobs = bool(typed(body, "logprobs", (bool,), "a boolean"))
    top = typed(body, "top_logprobs", (int,), f"an integer from 0 to {MAX_TOP_LOGPROBS}")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"top_logprobs={top} is invalid: expected 0 to {MAX_TOP_LOGPROBS}", "invalid_value")
    if top and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true", "invalid_value")
    name, max_tokens = _max_tokens(body)
    params = sampling_params(body, (name, max_tokens), {}, logprobs=logprobs, top_logprobs=top or 0)
    generation_prompt = typed(body, "add_generation_prompt", (bool,), "a boolean")
    continue_final = bool(typed(body, "continue_final_message", (bool,), "a boolean"))
    if continue_final and generation_prompt:
        raise bad(
            "continue_final_message",
            "continue_final_message and add_generation_prompt exclude each other (fix: pass add_generation_prompt: false)",
            "invalid_value",
        )
    kwargs = typed(body, "chat_template_kwargs", (dict,), "an object")
    return ChatRequest(
        body.get("model"),
        messages,
        params,
        max_tokens,
        name,
        streaming.stream,
        streaming.include_usage,
        streaming.continuous_usage,
        logprobs,
        count(body, "n", 1),
        not continue_final if generation_prompt is None else generation_prompt,
        continue_final,
        dict(kwargs or {}),
    )


def _token(texts: TokenTexts, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": texts.text_of(token_id), "logprob": finite(logprob), "bytes": list(texts.bytes_of(token_id))}


def chat_logprobs_body(texts: TokenTexts, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``content`` with each token's log-probability, bytes and
    ``top_logprobs`` alternatives."""
    return {
        "content": [
            {**_token(texts, e.token_id, e.logprob), "top_logprobs": [_token(texts, i, lp) for i, lp in e.top]}
            for e in entries
        ]
    }
