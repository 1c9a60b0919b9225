"""Chat templates, shared by the exporter (which checks and copies them) and the runtime (which renders them).

A chat template is a Jinja template (Hugging Face's ``chat_template``) that turns a list of
messages into the prompt text. It runs in Jinja's :class:`ImmutableSandboxedEnvironment`
configured as transformers' ``apply_chat_template`` does: ``trim_blocks``/``lstrip_blocks``,
the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML, the globals
``raise_exception(message)`` and ``strftime_now(format)``, namespaces that refuse
underscore-prefixed attributes, and the ``{% generation %}`` tag (rendered as its body). A
package stores the template as :data:`CHAT_TEMPLATE_NAME` and the special tokens it reads
(``bos_token``, ``eos_token``, ...) in :data:`TOKENIZER_CONFIG_NAME`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stlm.errors import InvalidArgumentError

__all__ = [
    "CHAT_TEMPLATE_NAME",
    "SPECIAL_TOKEN_KEYS",
    "TOKENIZER_CONFIG_NAME",
    "chat_template_source",
    "compile_template",
    "special_tokens",
]

CHAT_TEMPLATE_NAME = "chat_template.jinja"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
#: tokenizer_config.json entries passed to a template as variables (transformers' special_tokens_map).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (as transformers')."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def compile_template(source: str, origin: str) -> jinja2.Template:
    """The compiled template of ``source``; :class:`InvalidArgumentError` naming ``origin`` and the
    line for a syntax error."""
    if not isinstance(source, str) or not source.strip():
        raise InvalidArgumentError(
            f"the chat template {origin} is empty",
            fix="pass a Jinja chat template (e.g. a model's chat_template.jinja)",
        )
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidArgumentError(
            f"the chat template {origin} is not a valid Jinja template: {exc.message} (line {exc.lineno})",
            fix="fix the template; it is rendered as transformers' apply_chat_template renders it",
        ) from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return str(value["content"])
    return None


def special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The special tokens of a tokenizer_config.json as the strings templates see (AddedToken dicts → content)."""
    found = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
    return {key: value for key, value in found.items() if value is not None}


def chat_template_source(value: str | Path) -> tuple[str, str]:
    """``(template, origin)`` of a ``--chat-template`` value: a file, or the template itself when
    no file of that name exists and the value holds a Jinja tag (as vLLM accepts)."""
    text = str(value)
    path = Path(text)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8"), repr(str(path))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot read the chat template file {text!r} ({exc})", fix="pass a readable UTF-8 Jinja file"
        ) from None
    if "{{" in text or "{%" in text:
        return text, "given inline"
    raise InvalidArgumentError(
        f"the chat template file {text!r} does not exist",
        fix="pass the path of a Jinja chat template file (or the template text itself)",
    )
