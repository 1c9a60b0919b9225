"""One-off, re-runnable: move stlm's root modules into sub-packages that show the layers (issue #20).

Run from the repository root (stdlib only; git must be on PATH)::

    python scripts/restructure.py            # apply
    python scripts/restructure.py --dry-run  # only print what it would do

Idempotent: a move whose source is gone and whose destination exists is "already done"; the
reference rewrites only match the old names, so a second run changes nothing. What it cannot map
(a root module or a test file missing from the tables) is left where it is and printed.

Steps: 1. ``git mv`` the modules by :data:`MOVES` (one merge: ``reference_model.py`` into
``quality/reference.py``); 2. rewrite every reference (imports, dotted paths, "stlm.X" strings,
``stlm/X.py`` paths) in .py/.md/.toml/.sh/.yaml files, the Dockerfile and ``.ci/``; 3. ``git mv``
the tests by :data:`TEST_MOVES` into folders mirroring the package, fixing ``Path(__file__)`` depth
and ``tests/test_x.py`` mentions; 4. run ``ruff check --fix --select I`` and ``ruff format`` on
the touched files when ruff is found (imports re-sort after the rewrite).
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

# old module path (relative to the repo root) -> new module path
MOVES: dict[str, str] = {
    # the commands: the top layer (may import every other layer)
    "stlm/cli.py": "stlm/cli/commands.py",
    "stlm/cli_common.py": "stlm/cli/common.py",
    "stlm/cli_eval.py": "stlm/cli/eval.py",
    "stlm/cli_output.py": "stlm/cli/output.py",
    "stlm/cli_quality.py": "stlm/cli/quality.py",
    "stlm/cli_serve.py": "stlm/cli/serve.py",
    "stlm/demo.py": "stlm/cli/demo.py",  # `stlm demo`: export + runtime, so it belongs to the top layer
    # what a package is: read by the exporter, the runtime and the server alike
    "stlm/config.py": "stlm/package/config.py",
    "stlm/contract.py": "stlm/package/contract.py",
    "stlm/variant.py": "stlm/package/variant.py",
    "stlm/manifest.py": "stlm/package/manifest.py",
    "stlm/dtypes.py": "stlm/package/dtypes.py",
    "stlm/rope.py": "stlm/package/rope.py",
    "stlm/ort_versions.py": "stlm/package/ort_versions.py",
    "stlm/chat_template.py": "stlm/package/chat_template.py",
    # checkpoint resolution: the reference side needs it too, without the exporter (onnx)
    "stlm/export/checkpoint.py": "stlm/package/checkpoint.py",
    # plumbing with no model knowledge
    "stlm/staging.py": "stlm/support/staging.py",
    "stlm/extras.py": "stlm/support/extras.py",
    "stlm/gpu_env.py": "stlm/support/gpu_env.py",
    "stlm/progress.py": "stlm/support/progress.py",
    # is the package still the model?
    "stlm/verify.py": "stlm/quality/verify.py",
    "stlm/verify_reference.py": "stlm/quality/verify_reference.py",
    "stlm/tolerance.py": "stlm/quality/tolerance.py",
    "stlm/polygraphy_json.py": "stlm/quality/polygraphy_json.py",  # the reference-logits file format
}

# old module -> existing module it is merged into (appended; the merged module's imports of it dropped)
MERGES: dict[str, str] = {
    "stlm/reference_model.py": "stlm/quality/reference.py",
}

# docstrings of the sub-packages the moves create (an existing __init__.py is kept as it is)
NEW_PACKAGES: dict[str, str] = {
    "stlm/cli": '"""The ``stlm`` command (click): the top layer, the only one that may import every other."""\n\n'
    "from stlm.cli.commands import cli, main\n\n"
    '__all__ = ["cli", "main"]\n',
    "stlm/package": '"""What a package is: its config, contract, variant, manifest, dtypes, rope, ONNX Runtime\n'
    "versions, chat template and checkpoint resolution. Read by the exporter, the runtime and the server;\n"
    'imports none of them."""\n',
    "stlm/support": '"""Plumbing with no model knowledge: atomic writes, optional extras, the GPU environment, progress."""\n',
}

ROOT_KEEP = {"stlm/__init__.py", "stlm/__main__.py", "stlm/errors.py"}

TEST_MOVES: dict[str, str] = {
    "architecture": "test_code_shape test_runtime_isolation test_import_graph test_package_root",
    # test_data_safety, test_input_* import helpers from test_errors by name: the same folder
    "cli": "test_cli test_errors test_input_validation test_input_fuzz test_data_safety",
    "package": "test_chat_template test_variant test_rope test_real_format",
    "support": "test_gpu_env test_gpu_env_wiring",
    "export": "test_export_parity test_precision test_quantize test_kill_export test_tensorrt_export",
    "runtime": "test_generator test_onnxruntime_backend test_sampling test_sampling_hostile "
    "test_streaming_text test_tokenizer",
    "tensorrt": "test_tensorrt test_gpu_check",
    "plugins": "test_partial_rotary test_tensorrt_plugin_layer",
    "serve": "test_serve test_serve_fuzz test_serve_hostile test_serve_process test_openai_api "
    "test_openai_sampling test_ray_serve test_ray_deploy test_lm_eval_serve",
    "quality": "test_verify test_perplexity test_quality_table",
    "evaluation": "test_evaluation",
    "deploy": "test_deploy_manifests test_dockerfile",
}
# files that stay at tests/ root on purpose: conftest and the helpers tests import by name
TEST_ROOT_KEEP = {"conftest.py", "fake_gpu.py", "hostile_http.py", "trt_builder.py", "trt_standin.py"}

TEXT_GLOBS = ("*.py", "*.md", "*.toml", "*.sh", "*.yaml", "*.yml", "*.cfg", "*.txt", "Dockerfile", "run")
TEXT_DIRS = ("stlm", "tests", "benchmarks", "scripts", "docs", "deploy", ".ci")
TEXT_TOP = ("README.md", "pyproject.toml", "Dockerfile")


def module_name(path: str) -> str:
    """``stlm/package/config.py`` -> ``stlm.package.config``."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def git(*args: str, dry: bool) -> None:
    print("  $ git", " ".join(args))
    if not dry:
        subprocess.run(["git", *args], check=True)


def ensure_package(folder: Path, dry: bool, done: list[str]) -> None:
    init = folder / "__init__.py"
    if init.exists() or str(init) in done:
        return
    text = NEW_PACKAGES.get(folder.as_posix(), '"""(package)"""\n')
    print(f"  create {init}")
    done.append(str(init))
    if not dry:
        folder.mkdir(parents=True, exist_ok=True)
        init.write_text(text, encoding="utf-8")
        subprocess.run(["git", "add", str(init)], check=True)


def move_modules(dry: bool) -> list[str]:
    print("1. modules")
    touched: list[str] = []
    for src, dst in MOVES.items():
        s, d = Path(src), Path(dst)
        if not s.exists():
            print(f"  {'done' if d.exists() else 'MISSING'}: {src} -> {dst}")
            continue
        if d.exists():
            print(f"  CONFLICT (both exist, left alone): {src} and {dst}")
            continue
        ensure_package(d.parent, dry, touched)
        git("mv", src, dst, dry=dry)
        touched.append(dst)
    for src, dst in MERGES.items():
        if not Path(src).exists():
            print(f"  done: {src} merged into {dst}")
            continue
        print(f"  merge {src} into {dst}")
        if not dry:
            Path(dst).write_text(merge_modules(Path(src), Path(dst), module_name(src)), encoding="utf-8")
        git("rm", "-q", "-f", src, dry=dry)
        touched.append(dst)
    left = sorted(
        p.as_posix() for p in Path("stlm").glob("*.py") if p.as_posix() not in ROOT_KEEP | set(MOVES) | set(MERGES)
    )
    for path in left:
        print(f"  NOT MAPPED (left at stlm/ root): {path}")
    return touched


def _split(text: str) -> tuple[str, list[str], str]:
    """(docstring source, top-level import statements, the rest) of a module."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    body = list(tree.body)
    doc = ""
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        doc = "".join(lines[: body[0].end_lineno])
        body = body[1:]
    imports: list[str] = []
    while body and isinstance(body[0], ast.Import | ast.ImportFrom):
        node = body.pop(0)
        imports.append("".join(lines[node.lineno - 1 : node.end_lineno]).strip())
    rest = "".join(lines[body[0].lineno - 1 :]) if body else ""
    return doc, imports, rest


def merge_modules(src: Path, dst: Path, src_module: str) -> str:
    """``dst`` with ``src`` folded in: src's docstring and code first, then dst's code, imports united."""
    s_doc, s_imports, s_rest = _split(src.read_text(encoding="utf-8"))
    d_doc, d_imports, d_rest = _split(dst.read_text(encoding="utf-8"))
    imports: list[str] = []
    for line in [*s_imports, *d_imports]:
        if line not in imports and not re.match(rf"from {re.escape(src_module)} import ", line):
            imports.append(line)
    future = [i for i in imports if i.startswith("from __future__")]
    others = [i for i in imports if not i.startswith("from __future__")]
    doc = (s_doc or d_doc).rstrip() + "\n\n"
    return doc + "\n".join(future) + "\n\n" + "\n".join(others) + "\n\n\n" + s_rest.rstrip() + "\n\n\n" + d_rest


def rename_table() -> dict[str, str]:
    """old dotted module -> new dotted module, for every move and merge."""
    table = {module_name(s): module_name(d) for s, d in MOVES.items()}
    table.update({module_name(s): module_name(d) for s, d in MERGES.items()})
    # a module that became a package of the same name (stlm.cli) keeps its dotted name: the package
    # re-exports what callers used (cli, main), and rewriting it would not be idempotent
    return {old: new for old, new in table.items() if not new.startswith(old + ".")}


def _rewrite_from_stlm_import(text: str, table: dict[str, str]) -> str:
    """``from stlm import config, errors`` -> ``from stlm.package import config`` + ``from stlm import errors``."""

    def fix(match: re.Match[str]) -> str:
        indent, names = match.group(1), [n.strip() for n in match.group(2).split(",") if n.strip()]
        groups: dict[str, list[str]] = {}
        for name in names:
            base = name.split(" as ")[0].strip()
            new = table.get(f"stlm.{base}")
            parent, _, leaf = (new or f"stlm.{base}").rpartition(".")
            alias = name.split(" as ")[1].strip() if " as " in name else None
            shown = leaf if alias is None and leaf == base else f"{leaf} as {alias or base}"
            groups.setdefault(parent, []).append(shown)
        return "\n".join(f"{indent}from {p} import {', '.join(ns)}" for p, ns in groups.items())

    return re.sub(r"^([ \t]*)from stlm import ([\w ,]+)$", fix, text, flags=re.MULTILINE)


def rewrite_text(text: str, table: dict[str, str], path_table: dict[str, str]) -> str:
    text = _rewrite_from_stlm_import(text, table)
    for old in sorted(table, key=len, reverse=True):
        # dotted: stlm.config (not stlm.configure, not stlm.serve.config, not stlm.config.json files)
        text = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", table[old], text)
    for old in sorted(path_table, key=len, reverse=True):
        text = re.sub(rf"(?<![\w./-]){re.escape(old)}(?![\w])", path_table[old], text)
    return text


def text_files() -> list[Path]:
    found: set[Path] = {Path(p) for p in TEXT_TOP if Path(p).is_file()}
    for folder in TEXT_DIRS:
        for pattern in TEXT_GLOBS:
            found.update(p for p in Path(folder).rglob(pattern) if p.is_file())
    me = Path(__file__).resolve()
    return sorted(
        p
        for p in found
        if p.resolve() != me and "data" not in p.parts[:2] and "results" not in p.parts[:2] and ".venv" not in p.parts
    )


def rewrite_references(dry: bool, extra_paths: dict[str, str]) -> list[str]:
    print("2. references")
    # tests import each other too (``from tests.test_serve import http``)
    table = rename_table() | {module_name(s): module_name(d) for s, d in extra_paths.items()}
    paths = {s: d for s, d in MOVES.items()} | dict(MERGES) | extra_paths
    touched = []
    for path in text_files():
        try:
            old = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = rewrite_text(old, table, paths)
        if new != old:
            print(f"  rewrote {path}")
            touched.append(str(path))
            if not dry:
                path.write_text(new, encoding="utf-8")
    return touched


def test_destinations() -> dict[str, str]:
    """``tests/test_x.py`` -> ``tests/<folder>/test_x.py`` for every test file in the table."""
    table = {}
    for folder, names in TEST_MOVES.items():
        for name in names.split():
            table[f"tests/{name}.py"] = f"tests/{folder}/{name}.py"
    return table


def deeper(text: str) -> str:
    """``Path(__file__)`` expressions one folder deeper: ``.parent`` -> ``.parents[1]``, ``.parents[n]`` -> n+1."""
    text = re.sub(
        r"(Path\(__file__\)(?:\.resolve\(\))?)\.parents\[(\d)\]", lambda m: f"{m[1]}.parents[{int(m[2]) + 1}]", text
    )
    return re.sub(r"(Path\(__file__\)(?:\.resolve\(\))?)\.parent(?![\w\[])", r"\1.parents[1]", text)


def move_tests(dry: bool) -> tuple[list[str], dict[str, str]]:
    print("3. tests")
    table = test_destinations()
    touched = []
    for src, dst in table.items():
        s, d = Path(src), Path(dst)
        if not s.exists():
            if not d.exists():
                print(f"  not in this tree: {src}")
            continue
        if d.exists():
            print(f"  CONFLICT (both exist, left alone): {src} and {dst}")
            continue
        if not dry:
            d.parent.mkdir(exist_ok=True)
        git("mv", src, dst, dry=dry)
        touched.append(dst)
        if not dry:
            d.write_text(deeper(d.read_text(encoding="utf-8")), encoding="utf-8")
    for path in sorted(Path("tests").glob("*.py")):
        if path.name not in TEST_ROOT_KEEP and path.as_posix() not in table:
            print(f"  NOT MAPPED (left at tests/ root): {path}")
    return touched, table


def run_ruff(files: list[str], dry: bool) -> None:
    print("4. ruff (imports re-sorted after the rewrite)")
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists() and Path(".venv/bin/ruff").exists():
        ruff = ".venv/bin/ruff"
    py = sorted({f for f in files if f.endswith(".py") and Path(f).exists()})
    if not Path(ruff).exists() and not shutil.which(ruff):
        print("  ruff not found: run `ruff check --fix --select I . && ruff format .` yourself")
        return
    if dry or not py:
        return
    subprocess.run([ruff, "check", "--fix", "--select", "I", "-q", *py], check=False)
    subprocess.run([ruff, "format", "-q", *py], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    args = parser.parse_args()
    if not (Path("stlm/__init__.py").is_file() and Path(".git").exists()):
        print("run from the repository root (stlm/__init__.py and .git not found)", file=sys.stderr)
        return 2
    touched = move_modules(args.dry_run)
    moved_tests, test_table = move_tests(args.dry_run)
    touched += moved_tests
    touched += rewrite_references(args.dry_run, test_table)
    run_ruff(touched, args.dry_run)
    print("done; review with `git status` and `git diff --stat HEAD`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
