"""User mistakes: a clear StlmError naming the value and the fix, CLI exit 2, no traceback,
nothing half-written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stlm.cli import cli
from stlm.errors import StlmError


def run_cli(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# What a command may print on stderr before failing: its one-line banner and progress lines.
BANNER = re.compile(r"^(exporting |building |\s*$|\s*\w[\w ]*: \d+/\d+$)")


def assert_user_error(args: list[str], *needles: str) -> str:
    """Exit 2, nothing on stdout, and stderr = (a banner, then) ``error: …`` (its ``fix:`` line), no traceback."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    assert start is not None and all(BANNER.match(line) for line in lines[:start]), result.stderr
    message = "\n".join(lines[start:])
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_export_missing_folder(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    assert_user_error(["export", str(tmp_path / "nope"), "-o", str(out)], "does not exist", "fix:")
    assert not out.exists()


def test_export_other_architecture(tmp_path: Path, checkpoint: Path) -> None:
    other = tmp_path / "llama"
    shutil.copytree(checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    assert_user_error(["export", str(other), "-o", str(tmp_path / "pkg")], "'llama'", "LlamaForCausalLM", "StableLM")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("remove, needle", [("tokenizer.json", "tokenizer.json"), ("model.safetensors", "safetensors")])
def test_export_missing_file(tmp_path: Path, checkpoint: Path, remove: str, needle: str) -> None:
    broken = tmp_path / "ck"
    shutil.copytree(checkpoint, broken)
    (broken / remove).unlink()
    assert_user_error(["export", str(broken), "-o", str(tmp_path / "pkg")], needle)
    assert not (tmp_path / "pkg").exists()
    assert not any(p.name.startswith(".pkg") for p in tmp_path.iterdir()), "a temporary folder was left behind"


def test_export_truncated_weights_leave_nothing(tmp_path: Path, checkpoint: Path) -> None:
    broken = tmp_path / "ck"
    shutil.copytree(checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(["export", str(broken), "-o", str(tmp_path / "pkg")], "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_export_unknown_dtype(tmp_path: Path, checkpoint: Path) -> None:
    assert_user_error(["export", str(checkpoint), "-o", str(tmp_path / "pkg"), "--dtype", "fp8"], "'fp8'", "fp16")


def test_export_refuses_to_overwrite(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    assert_user_error(["export", str(checkpoint), "-o", str(tmp_path / "pkg")], "--overwrite")
    assert (tmp_path / "pkg" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_generate_corrupt_onnx(tmp_path: Path, package: Path, how: str) -> None:
    broken = tmp_path / "pkg"
    shutil.copytree(package, broken)
    graph = broken / "model.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 3] if how == "truncated" else b"not an onnx file" * 100)
    assert_user_error(["generate", str(broken), "--prompt", "hi"], "model.onnx", "export the package again")


def test_generate_missing_package(tmp_path: Path) -> None:
    assert_user_error(["generate", str(tmp_path / "none"), "--prompt", "hi"], "does not exist")


def test_generate_folder_without_manifest(tmp_path: Path) -> None:
    assert_user_error(["generate", str(tmp_path), "--prompt", "hi"], "stlm.json")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--max-new-tokens", "0"], ["--max-new-tokens 0"]),
        (["--max-new-tokens", "-3"], ["-3"]),
        (["--temperature", "-0.5"], ["--temperature -0.5"]),
        (["--top-p", "0"], ["--top-p 0"]),
        (["--top-p", "1.5"], ["1.5"]),
        (["--max-new-tokens", "5000"], ["5000", "context"]),
    ],
)
def test_generate_bad_sampling(package: Path, args: list[str], needles: list[str]) -> None:
    assert_user_error(["generate", str(package), "--prompt", "hello", *args], *needles)


def test_generate_prompt_longer_than_context(package: Path) -> None:
    long_prompt = "word " * 5000
    assert_user_error(["generate", str(package), "--prompt", long_prompt], "5001 tokens", "4096", "shorten")


def test_cli_prints_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stlm", "export", str(tmp_path / "missing"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_errors_are_stlm_errors(package: Path) -> None:
    from stlm.runtime import Generator

    gen = Generator.load(package)
    with pytest.raises(StlmError, match="string"):
        gen.generate(42)  # type: ignore[arg-type]


def test_export_hub_id_offline_names_the_id_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = assert_user_error(
        ["export", "stlm-tests/no-such-model", "-o", str(tmp_path / "pkg")], "stlm-tests/no-such-model", "local folder"
    )
    assert "hf download" in out
    assert not (tmp_path / "pkg").exists()
