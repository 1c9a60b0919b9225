"""Shared fixtures: tiny random StableLM checkpoints (:mod:`stlm.testing`) and their exports.

Exports happen once per session; tests must not modify the session packages.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

import stlm.assets as _assets
from stlm.testing import Shape, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NEOX_TOKENIZER = _assets.NEOX_TOKENIZER  # bundled in the repository (stlm/assets): no ../shared needed

# Two shapes so the export is shown to follow config.json: head dim 16 (rotary 4) and 64 (rotary 16).
SHAPES = {
    "hd16": Shape(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=172, vocab_size=50304),
    "hd64": Shape(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=344, vocab_size=50304),
}


def neox_tokenizer() -> Path:
    """The real GPT-NeoX tokenizer (bundled with stlm)."""
    return NEOX_TOKENIZER


def build_checkpoint(folder: Path, shape: Shape = SHAPES["hd16"], *, seed: int = 0, **options: Any) -> Path:
    """A random checkpoint of ``shape`` with the GPT-NeoX tokenizer (numpy writer, transformers reads it)."""
    return write_random_checkpoint(folder, shape=shape, tokenizer=neox_tokenizer(), seed=seed, **options)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per shape in SHAPES."""
    base = tmp_path_factory.mktemp("checkpoints")
    return {name: build_checkpoint(base / name, shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())}


@pytest.fixture(scope="session")
def packages(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fp32 ONNX packages of each tiny checkpoint: '<shape>' (concat KV) and '<shape>-inplace'."""
    from stlm.export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("packages")
    found = {name: export_onnx(ck, base / name, kv_cache="concat") for name, ck in checkpoints.items()}
    found.update(
        {
            f"{name}-inplace": export_onnx(ck, base / f"{name}-inplace", kv_cache="inplace")
            for name, ck in checkpoints.items()
        }
    )
    return found


CHAT_TEMPLATES = ROOT / "tests" / "data" / "chat_templates"
SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


@pytest.fixture(scope="session")
def chat_checkpoint(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The head-dim-16 tiny checkpoint with a chat model's tokenizer_config.json (the Zephyr template
    and special tokens, as stablelm-zephyr-3b's)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("chat-checkpoint") / "hd16-chat"
    shutil.copytree(checkpoints["hd16"], folder)
    config = {
        **SPECIAL_TOKENS,
        "chat_template": (CHAT_TEMPLATES / "zephyr.jinja").read_text(),
        "tokenizer_class": "GPTNeoXTokenizer",
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def chat_package(chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-place fp32 package of :func:`chat_checkpoint` (it carries the chat template)."""
    from stlm.export.onnx_export import export_onnx

    return export_onnx(chat_checkpoint, tmp_path_factory.mktemp("chat-package") / "hd16-chat", kv_cache="inplace")


@pytest.fixture(scope="session")
def checkpoint(checkpoints: dict[str, Path]) -> Path:
    """The head-dim-16 tiny checkpoint."""
    return checkpoints["hd16"]


@pytest.fixture(scope="session")
def package(packages: dict[str, Path]) -> Path:
    """The head-dim-16 tiny package."""
    return packages["hd16"]


@pytest.fixture(scope="session")
def random_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random in-place package with its own small tokenizer (needs no ../shared)."""
    from stlm.export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("random-package")
    return export_onnx(
        write_random_checkpoint(base / "checkpoint", shape="tiny", seed=3), base / "tiny", kv_cache="inplace"
    )


# -- skip policy -------------------------------------------------------------------------------
# With STLM_ONLY_GPU_SKIPS=1 (set by .ci/run) the run fails when a test that is not marked `gpu`
# (or `shared`: needs the trained model in ../shared, absent from a public clone)
# skips: everything but the GPU checks must run on a CPU machine from a public clone.
_BAD_SKIPS: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("gpu") is None and item.get_closest_marker("shared") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _BAD_SKIPS.append(f"{item.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _BAD_SKIPS and os.environ.get("STLM_ONLY_GPU_SKIPS") == "1" and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _BAD_SKIPS and os.environ.get("STLM_ONLY_GPU_SKIPS") == "1":
        terminalreporter.section("tests skipped on a CPU machine that must run (STLM_ONLY_GPU_SKIPS=1)")
        for line in _BAD_SKIPS:
            terminalreporter.write_line(line)
