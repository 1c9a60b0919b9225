"""The shape the developers' brief asks of stlm's code, checked on every run: modules under 400
lines, functions under 60, and the graph variant read as typed fields, never parsed as strings."""

from __future__ import annotations

import ast
from pathlib import Path

import stlm

STLM = Path(stlm.__file__).resolve().parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(STLM.rglob("*.py"))


def test_modules_and_functions_are_short() -> None:
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(STLM.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert long_modules == [] and long_functions == []


def test_nobody_parses_the_variant() -> None:
    found = [str(p.relative_to(STLM.parent)) for p in _modules() if "variant.get(" in p.read_text(encoding="utf-8")]
    assert found == []
