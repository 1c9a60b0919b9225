"""Layers: `stlm.runtime` never loads the exporter, onnx, torch or transformers (services embed it
without them), and the exporter never imports the runtime."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import stlm

STLM = Path(stlm.__file__).resolve().parent

SCRIPT = """
import json, sys
import stlm.runtime
from stlm.runtime import Generator
gen = Generator.load(sys.argv[1])
text = gen.generate("Hello world", max_new_tokens=4, temperature=0)
pieces = list(gen.stream("Hello world", max_new_tokens=4, temperature=0))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"heavy": heavy, "text": text, "stream": "".join(pieces)}))
"""

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import stlm.runtime
for info in pkgutil.walk_packages(stlm.runtime.__path__, "stlm.runtime."):
    importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "torch", "transformers") or m.startswith("stlm.export"))
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("stlm.runtime.")), "loaded": loaded}))
"""


def test_runtime_loads_neither_torch_nor_transformers(package: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(package)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["text"] == result["stream"]


def test_every_runtime_module_imports_without_the_exporter() -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        "stlm.runtime.tensorrt_backend" in result["modules"] and "stlm.runtime.onnxruntime_backend" in result["modules"]
    )
    assert result["loaded"] == []


def _imported_modules(package: str) -> dict[str, set[str]]:
    """``{module file: stlm modules it imports}`` for every module of ``package``, function-level imports included."""
    found: dict[str, set[str]] = {}
    folder = STLM / package.split(".", 1)[1].replace(".", "/")
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(STLM.parent))] = {n for n in names if n.startswith("stlm.")}
    return found


def test_runtime_and_exporter_do_not_import_each_other() -> None:
    runtime = {
        f: {m for m in mods if m.startswith("stlm.export")} for f, mods in _imported_modules("stlm.runtime").items()
    }
    export = {
        f: {m for m in mods if m.startswith("stlm.runtime")} for f, mods in _imported_modules("stlm.export").items()
    }
    assert len(runtime) > 10 and len(export) > 10
    assert {f: m for f, m in runtime.items() if m} == {}
    assert {f: m for f, m in export.items() if m} == {}


BASE_COMMANDS = """
import json, sys
import stlm.cli, stlm.testing, stlm.quality.verify, stlm.quality
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("onnx", "torch", "transformers") or m.startswith("stlm.export"))
print(json.dumps(loaded))
"""


def test_the_cli_and_base_commands_import_without_the_exporter() -> None:
    """The base install runs generate, bench, verify REF.json, perplexity and make-checkpoint: importing
    the CLI (and what those commands import) must not load stlm.export (it needs onnx) or torch."""
    proc = subprocess.run([sys.executable, "-c", BASE_COMMANDS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
