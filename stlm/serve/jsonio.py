"""JSON in and out of the server: request bodies parsed within limits, responses never NaN.

:func:`loads` turns every malformed body into an :class:`ApiError` (400) naming what is wrong:
invalid UTF-8, invalid JSON, ``NaN``/``Infinity`` literals, integers beyond Python's digit limit,
nesting deeper than :data:`MAX_JSON_DEPTH`, lone UTF-16 surrogates (``"\\ud800"``, which is
valid JSON but not text). :func:`dumps` refuses NaN/inf (``allow_nan=False``), so a response is
always valid JSON. Both are pure and run off the event loop for large bodies.
"""

from __future__ import annotations

import json
import re
from typing import Any

from stlm.serve.apierror import ApiError

__all__ = ["MAX_JSON_DEPTH", "dumps", "loads"]

#: Deepest nesting of arrays/objects a request body may have (an OpenAI request needs ~6).
MAX_JSON_DEPTH = 64


def _bad(message: str, code: str = "invalid_json", param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _no_constants(name: str) -> Any:
    raise _bad(f"the request body is not valid JSON: {name} is not a JSON value (fix: send finite numbers)")


def loads(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of ``raw`` (UTF-8), or :class:`ApiError` 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise _bad(f"the request body nests arrays/objects more than {max_depth} levels deep", "too_deep") from None
    except ValueError as exc:  # JSONDecodeError, or an integer beyond the digit limit
        reason = str(exc).split("; use sys.set_int_max_str_digits")[0]
        raise _bad(f"the request body is not valid JSON ({reason[:200]})") from None
    # a lone surrogate can only come from a \\uD800-\\uDFFF escape: without one, skip the text checks
    _check(value, max_depth, texts=_SURROGATE_ESCAPE.search(raw) is not None)
    return value


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{_printable(part)}" if out else _printable(part))
    return out or "the body"


def _check_text(text: str, path: tuple[str | int, ...], what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        top = _printable(path[0]) if path and isinstance(path[0], str) else None
        raise _bad(
            f"{what} {_where(path)} contains a lone UTF-16 surrogate ({text[exc.start]!a}) at character "
            f"{exc.start}, which is not text (fix: send valid Unicode)",
            "invalid_unicode",
            top,
        ) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check(value: Any, max_depth: int, texts: bool = True) -> None:
    """Depth and (when ``texts``) text checks without recursion (a deep body must not blow the
    stack here)."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 0, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if texts:
                _check_text(item, path, "the string at")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise _bad(f"the request body nests arrays/objects more than {max_depth} levels deep", "too_deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if texts:
                        _check_text(key, (*path, key), "the key")
                    if isinstance(child, dict | list) or (texts and isinstance(child, str)):
                        stack.append((child, depth + 1, (*path, key)))
            else:
                stack.extend(
                    (child, depth + 1, (*path, i))
                    for i, child in enumerate(item)
                    if isinstance(child, dict | list) or (texts and isinstance(child, str))
                )


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; :class:`ValueError` for NaN/inf (never sent)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace"
    )
