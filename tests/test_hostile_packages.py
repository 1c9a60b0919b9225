"""Packages that lie (issue #27, item 5 and its notes): a foreign ``model.onnx``, a ``tokenizer.json``
with ids beyond the graph's vocabulary, a manifest BOS id beyond it, a string ``format_version``.
Each is refused when the package is opened: ``error:`` and exit 2 from ``generate``, and ``serve``
refuses to start; never a traceback. ``Generator.load`` of a non-path is an InvalidArgumentError."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stlm.errors import InvalidArgumentError
from stlm.runtime import Generator
from stlm.testing import write_random_checkpoint
from tests.conftest import neox_tokenizer

TIMEOUT = 120


def stlm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m stlm ARGS`` in a subprocess (this checkout's stlm)."""
    return subprocess.run(
        [sys.executable, "-m", "stlm", *args], input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )


def assert_refused(done: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Exit status 2, stderr's first line ``error: …`` holding each of ``needles``, no traceback."""
    err, out = done.stderr.decode(errors="replace"), done.stdout.decode(errors="replace")
    assert done.returncode == 2, (done.returncode, err[-2000:])
    assert "Traceback" not in err + out, err[-3000:]
    first = err.lstrip().splitlines()[0]
    assert first.startswith("error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def copy_package(package: Path, tmp_path: Path) -> Path:
    """A private copy of a session package (tests must not change those)."""
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / "stlm.json"
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def other_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model (head dim 64, 2 KV heads) with the same input and output names."""
    from stlm.export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("other")
    ckpt = write_random_checkpoint(base / "ckpt", shape="tiny-hd64", seed=5)
    return export_onnx(ckpt, base / "pkg", kv_cache="inplace")


def test_a_foreign_graph_is_refused_at_load(random_package: Path, other_package: Path, tmp_path: Path) -> None:
    pkg = copy_package(random_package, tmp_path)
    shutil.copy(other_package / "model.onnx", pkg / "model.onnx")
    assert_refused(stlm("generate", str(pkg), "-p", "hi", "-n", "2"), "model.onnx", "manifest")


def test_serve_refuses_to_start_with_a_foreign_graph(random_package: Path, other_package: Path, tmp_path: Path) -> None:
    pkg = copy_package(random_package, tmp_path)
    shutil.copy(other_package / "model.onnx", pkg / "model.onnx")
    assert_refused(stlm("serve", str(pkg), "--port", "0"), "model.onnx")


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused(random_package: Path, tmp_path: Path) -> None:
    pkg = copy_package(random_package, tmp_path)
    vocab = json.loads((pkg / "stlm.json").read_text())["model"]["vocab_size"]
    assert vocab < 50000  # the GPT-NeoX tokenizer's ids go to 50280
    shutil.copy(neox_tokenizer(), pkg / "tokenizer.json")
    assert_refused(stlm("generate", str(pkg), "-p", "hi", "-n", "2"), "tokenizer.json", str(vocab))
    assert_refused(stlm("serve", str(pkg), "--port", "0"), "tokenizer.json")


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id"])
def test_a_manifest_token_id_beyond_the_vocabulary_is_refused(random_package: Path, tmp_path: Path, key: str) -> None:
    pkg = copy_package(random_package, tmp_path)
    edit_manifest(pkg, **{f"generation__{key}": 10**6})
    assert_refused(stlm("generate", str(pkg), "--prompt", "", "-n", "2"), key, "1000000")


def test_a_string_format_version_is_named_as_not_an_integer(random_package: Path, tmp_path: Path) -> None:
    pkg = copy_package(random_package, tmp_path)
    edit_manifest(pkg, format_version="2")
    err = assert_refused(stlm("generate", str(pkg), "-p", "hi"), "expected an integer")
    assert "newer" not in err


@pytest.mark.parametrize("folder", [123, None, 1.5, b"pkg"])
def test_generator_load_of_a_non_path_is_an_invalid_argument(folder: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="expected a path"):
        Generator.load(folder)
