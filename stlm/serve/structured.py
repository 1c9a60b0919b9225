"""Request fields for structured outputs and vLLM's stop/length controls (completions and chat).

Structured outputs, at most one per request (a 400 names the clash otherwise):
OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema`` with ``strict``), vLLM's
``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) and its
legacy ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, and
llama-server's ``grammar`` (GBNF) and ``json_schema``. A grammar written with ``::=`` is GBNF,
otherwise Lark. vLLM's stop/length controls: ``stop_token_ids``, ``min_tokens``, ``ignore_eos``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``bad_words``,
``truncate_prompt_tokens`` (see :mod:`stlm.runtime.sampling.controls`).

Unknown-field policy (docs/serving.md): :data:`IGNORED_FIELDS` are vLLM/OpenAI extras that do
not change the output (scheduling, caching, bookkeeping) and are accepted and ignored; every
other unknown field is a 400, so nothing that would change the output is silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stlm.errors import StlmError
from stlm.runtime.constraints import Constraint
from stlm.serve.apierror import ApiError

__all__ = ["CONTROL_FIELDS", "IGNORED_FIELDS", "STRUCTURED_FIELDS", "extra_params"]

#: the fields that carry a constraint, in the order they are looked at
_ORDER = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "grammar",
    "json_schema",
)
STRUCTURED_FIELDS = frozenset({*_ORDER, "guided_decoding_backend"})
CONTROL_FIELDS = frozenset(
    {
        "stop_token_ids",
        "min_tokens",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "bad_words",
        "truncate_prompt_tokens",
    }
)
#: accepted and ignored: they never change the generated output
IGNORED_FIELDS = frozenset({"request_id", "priority", "cache_salt", "service_tier", "store", "metadata"})
_OUTPUTS_KEYS = frozenset({"json", "regex", "choice", "grammar", "json_object", "backend"})


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _grammar(text: Any, param: str) -> Constraint:
    if not isinstance(text, str) or not text:
        raise _bad(param, f"{param} must be a non-empty grammar string", "invalid_type")
    return Constraint("gbnf" if "::=" in text else "lark", text)


def _schema(value: Any, param: str) -> Constraint:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _bad(param, f"{param} is a string that is not JSON; pass the JSON Schema as an object") from None
    if not isinstance(value, dict):
        raise _bad(param, f"{param} must be a JSON Schema object", "invalid_type")
    return Constraint("json_schema", value)


def _response_format(value: Any) -> Constraint | None:
    if not isinstance(value, dict) or "type" not in value:
        raise _bad("response_format", 'response_format must be an object with "type"', "invalid_type")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise _bad("response_format", 'response_format json_schema needs {"json_schema": {"schema": {...}}}')
        if not isinstance(spec.get("strict", True), bool | None):
            raise _bad("response_format", "response_format.json_schema.strict must be a boolean", "invalid_type")
        return _schema(spec["schema"], "response_format")
    raise _bad(
        "response_format",
        f"response_format type {json.dumps(kind)[:40]} is not supported: expected text, json_object or json_schema",
        "unsupported_value",
    )


def _structured_outputs(value: Any) -> Constraint | None:
    if not isinstance(value, dict):
        raise _bad("structured_outputs", "structured_outputs must be an object", "invalid_type")
    unknown = set(value) - _OUTPUTS_KEYS
    if unknown:
        raise _bad(
            "structured_outputs",
            f"structured_outputs has unsupported key(s) {sorted(unknown)}; accepted: {', '.join(sorted(_OUTPUTS_KEYS))}",
            "unknown_field",
        )
    found = [k for k in ("json", "regex", "choice", "grammar") if value.get(k) is not None]
    if value.get("json_object"):
        found.append("json_object")
    if len(found) > 1:
        raise _bad("structured_outputs", f"structured_outputs sets {found}; pass exactly one")
    if not found:
        return None
    return _one(found[0], value[found[0]], "structured_outputs")


def _one(key: str, value: Any, param: str) -> Constraint:
    if key == "json":
        return _schema(value, param)
    if key == "regex":
        if not isinstance(value, str) or not value:
            raise _bad(param, f"{param}: the regex must be a non-empty string", "invalid_type")
        return Constraint("regex", value)
    if key == "choice":
        return Constraint("choice", value)
    if key == "json_object":
        return Constraint("json_object")
    return _grammar(value, param)


def constraint_from(body: Mapping[str, Any]) -> Constraint | None:
    """The request's output constraint (None: free text); a 400 names a bad or clashing field."""
    sources: dict[str, Any] = {}
    try:
        if body.get("response_format") is not None:
            sources["response_format"] = _response_format(body["response_format"])
        if body.get("structured_outputs") is not None:
            sources["structured_outputs"] = _structured_outputs(body["structured_outputs"])
        for key, name in (("json", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice")):
            if body.get(name) is not None:
                sources[name] = _one(key, body[name], name)
        for name in ("guided_grammar", "grammar"):
            if body.get(name) is not None:
                sources[name] = _grammar(body[name], name)
        if body.get("json_schema") is not None:
            sources["json_schema"] = _schema(body["json_schema"], "json_schema")
    except ApiError:
        raise
    except StlmError as exc:
        culprit = next((n for n in _ORDER if body.get(n) is not None and n not in sources), "response_format")
        message = exc.problem if exc.fix is None else f"{exc.problem} (fix: {exc.fix})"
        raise _bad(culprit, message) from None
    chosen = {k: v for k, v in sources.items() if v is not None}
    if len(chosen) > 1:
        raise _bad(next(iter(chosen)), f"the request sets several output constraints ({', '.join(chosen)}); pass one")
    return next(iter(chosen.values()), None)


def extra_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """``SamplingParams`` keywords from the structured-output and stop/length fields (validated
    by ``SamplingParams`` itself, except the JSON types checked here)."""
    out: dict[str, Any] = {}
    for name in CONTROL_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if name in ("stop_token_ids", "bad_words") and not isinstance(value, list):
            raise _bad(name, f"{name} must be a list", "invalid_type")
        out[name] = tuple(value) if isinstance(value, list) else value
    constraint = constraint_from(body)
    if constraint is not None:
        out["constraint"] = constraint
    return out
