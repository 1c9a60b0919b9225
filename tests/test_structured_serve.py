"""Structured outputs and vLLM's stop/length fields through the server, with the openai client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from stlm.serve import BackgroundServer, ServeConfig, load_service

pytest.importorskip("llguidance")

KEY = "k"
MODEL = "hd16-chat"
SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["kind", "n"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Give me JSON."}]


@pytest.fixture(scope="module")
def client(chat_package: Path) -> Iterator[openai.OpenAI]:
    config = ServeConfig(chat_package, port=0, api_key=KEY, max_batch=4, max_queue=16, max_context=256, prefill_chunk=8)
    with BackgroundServer(load_service(config)) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_response_format_json_schema_on_chat_and_completions(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=32,
        temperature=1.0,
        seed=1,
        n=3,
        response_format=fmt,  # type: ignore[arg-type]
    )
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    done = client.completions.create(
        model=MODEL, prompt="JSON:", max_tokens=32, seed=2, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMA)
    obj = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=64, seed=3, response_format={"type": "json_object"}
    )
    assert obj.choices[0].message.content.startswith("{")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"regex": "[0-9]{3}"}},
        {"guided_regex": "[0-9]{3}"},
        {"structured_outputs": {"choice": ["123", "456"]}},
        {"guided_choice": ["123", "456"]},
        {"guided_grammar": "start: /[0-9]{3}/"},
        {"grammar": "root ::= [0-9] [0-9] [0-9]"},
        {"guided_json": {"type": "integer", "minimum": 100, "maximum": 999}},
        {"json_schema": {"type": "integer", "minimum": 100, "maximum": 999}},
    ],
)
def test_vllm_and_llama_server_fields(client: openai.OpenAI, extra: dict[str, object]) -> None:
    out = client.completions.create(model=MODEL, prompt="n=", max_tokens=8, seed=5, extra_body=extra)
    assert re.fullmatch(r"[0-9]{3}", out.choices[0].text), out.choices[0].text
    streamed = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, seed=5, stream=True, extra_body=extra
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert re.fullmatch(r"[0-9]{3}", text), text


def test_stop_controls_through_extra_body(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0)
    ids = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=6, temperature=0, extra_body={"min_tokens": 6, "ignore_eos": True}
    )
    assert ids.usage.completion_tokens == 6  # type: ignore[union-attr]
    assert free.choices[0].text.startswith(ids.choices[0].text[:1])
    long = client.completions.create(
        model=MODEL, prompt="Hi " * 50, max_tokens=2, temperature=0, extra_body={"truncate_prompt_tokens": 5}
    )
    assert long.usage.prompt_tokens == 5  # type: ignore[union-attr]


def test_unknown_field_policy(client: openai.OpenAI) -> None:
    ok = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, extra_body={"priority": 0, "request_id": "r1", "cache_salt": "s"}
    )
    assert ok.choices[0].text is not None
    for body in ({"use_beam_search": True}, {"guided_whitespace_pattern": " "}, {"response_format": {"type": "xml"}}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="strin"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"guided_json": {"type": "strin"}})
    with pytest.raises(openai.BadRequestError, match="several"):
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=2, extra_body={"guided_regex": "a", "guided_choice": ["a"]}
        )
