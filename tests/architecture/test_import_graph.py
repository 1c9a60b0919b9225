"""Imports among stlm's modules, read with ast (function-level imports included): no module imports
itself through a circle, and every name comes from the module that defines it (a package's
``__init__`` may re-export its public names for users; a plain module may not pass names on)."""

from __future__ import annotations

import ast
from pathlib import Path

import stlm

STLM = Path(stlm.__file__).resolve().parent


def _name(path: Path) -> str:
    parts = list(path.relative_to(STLM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(STLM.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every absolute stlm import (``import stlm.x`` has no names)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "stlm":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "stlm"]
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, tree in TREES.items():
        for module, names, _ in _imports(tree):
            targets = [f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names] or [module]
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _defined(tree: ast.Module) -> set[str]:
    """Top-level names a module binds itself (defs, classes, assignments, also under if/try)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_the_graph_sees_the_known_edges() -> None:
    graph = _graph()
    assert len(graph) > 100 and "stlm.errors" in graph["stlm.runtime.generator"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert _cycles(_graph()) == []


def test_names_are_imported_from_the_module_that_defines_them() -> None:
    defined = {name: _defined(tree) for name, tree in TREES.items()}
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    passed_on = []
    for name, tree in TREES.items():
        for module, names, line in _imports(tree):
            if module not in MODULES or module in packages:
                continue
            for imported in names:
                if f"{module}.{imported}" not in MODULES and imported not in defined[module]:
                    passed_on.append(f"{MODULES[name].relative_to(STLM.parent)}:{line} {imported} from {module}")
    assert passed_on == []
