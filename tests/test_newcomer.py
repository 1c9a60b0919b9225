"""What a new user tripped on (issue #25), run as they ran it: the ``stlm`` CLI in a subprocess,
exit codes and first lines checked. Ctrl-C is a real SIGINT to a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stlm.cli import cli
from stlm.cli_common import with_flags
from stlm.cli_output import print_generation
from stlm.quality.report import _nonnegative
from stlm.runtime import Generator, SamplingParams
from stlm.variant import QUANTIZE_PRESETS

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_tasks"
TIMEOUT = 240


def stlm(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stlm", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _wait(condition: object, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition() and proc.poll() is None and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)


# -- 1. eval: unavailable datasets, noise ---------------------------------------------------------------
def test_eval_of_a_task_whose_data_is_not_there_is_an_error(package: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "empty")}
    done = stlm("eval", str(package), "--tasks", "hellaswag", "--limit", "10", cwd=tmp_path, env=offline)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "fatal:" not in done.stderr
    error = done.stderr[done.stderr.index("error: ") :]
    assert error.startswith("error: task 'hellaswag' needs the dataset 'Rowan/hellaswag'"), error
    assert "HF_DATASETS_CACHE" in error and "--include_path" in error


def test_eval_of_local_tasks_is_quiet(package: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    tasks = ["--tasks", "stlm_shakespeare_mc,stlm_shakespeare_ppl", "--include_path", str(TASK_DIR), "--limit", "2"]
    loud = stlm("eval", str(package), *tasks, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})  # tmp_path: no git repo
    assert loud.returncode == 0, loud.stderr
    assert "fatal:" not in loud.stderr
    assert "WARNING lm_eval" not in loud.stderr, loud.stderr  # our own task YAMLs cause no warnings
    quiet = stlm("-q", "eval", str(package), *tasks, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # no tqdm bars under -q
    assert quiet.stdout.startswith("|")


# -- 2. Ctrl-C -----------------------------------------------------------------------------------------
def _blocked_on_stdin(pid: int) -> bool:
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "pipe" in wchan


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux /proc to see the child wait on stdin")
def test_ctrl_c_in_generate_exits_130_with_one_line(package: Path) -> None:
    args = [sys.executable, "-m", "stlm", "generate", str(package), "-p", "-", "-n", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _wait(lambda: _blocked_on_stdin(proc.pid), proc)  # loaded, reading the prompt: inside the command
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert err.decode().splitlines() == ["interrupted (Ctrl-C)"]


def test_ctrl_c_in_export_exits_130_and_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    args = [sys.executable, "-m", "stlm", "-q", "export", str(checkpoint), "-o", str(out)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _wait(lambda: out.with_name(f".{out.name}.partial-{proc.pid}").exists(), proc)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert err.decode().splitlines() == ["interrupted (Ctrl-C)"]
    assert "Aborted" not in err.decode() and not out.exists()


def test_interrupted_generate_prints_the_text_so_far(package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = Generator.load(package)
    params = SamplingParams(max_new_tokens=12, temperature=0)

    def cut_after_three():  # type: ignore[no-untyped-def]
        for n, piece in enumerate(gen.stream("Once upon", params)):
            if n == 3:
                raise KeyboardInterrupt
            yield piece

    expected = "".join(p for _, p in zip(range(3), gen.stream("Once upon", params), strict=False))
    with pytest.raises(KeyboardInterrupt):
        print_generation(cut_after_three(), stream=False)
    assert capsys.readouterr().out == expected and expected


# -- 4. quantization named -----------------------------------------------------------------------------
def test_export_header_names_the_preset_and_its_options(checkpoint: Path, tmp_path: Path) -> None:
    firsts = {}
    for preset in ("int4", "int4-rtn"):
        done = stlm("export", str(checkpoint), "-o", str(tmp_path / preset), "--quantize", preset)
        assert done.returncode == 0, done.stderr
        firsts[preset] = done.stderr.splitlines()[0]
    assert "(fp32, int4 (rtn, block 32, edge 8-bit), opset 18, onnxruntime)" in firsts["int4"]
    assert "(fp32, int4-rtn (rtn, block 32), opset 18, onnxruntime)" in firsts["int4-rtn"]
    described = CliRunner().invoke(cli, ["bench", str(tmp_path / "int4"), "--runs", "1", "--gen-len", "2"])
    assert described.exit_code == 0, described.output
    assert "int4 (rtn, block 32, edge 8-bit)" in described.stdout.splitlines()[0]


def test_every_preset_is_described_apart() -> None:
    described = {q.describe() for q in QUANTIZE_PRESETS.values()}
    assert len(described) == len(QUANTIZE_PRESETS) - 1  # int4-edge8 is int4


# -- 8. wording ----------------------------------------------------------------------------------------
def test_generate_prints_exactly_the_continuation_off_a_terminal(package: Path) -> None:
    done = stlm("generate", str(package), "-p", "Once upon", "-n", "6", "-t", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == Generator.load(package).generate("Once upon", max_new_tokens=6, temperature=0)


def test_verify_with_swapped_arguments_hints_at_the_order(package: Path, checkpoint: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(package), str(checkpoint)])
    assert result.exit_code == 2, result.output
    assert "look swapped" in result.stderr and f"stlm verify {checkpoint} {package}" in result.stderr


def test_verify_quiet_prints_only_the_verdict(package: Path, checkpoint: Path) -> None:
    pytest.importorskip("transformers")
    result = CliRunner().invoke(cli, ["-q", "verify", str(checkpoint), str(package), "--prompts", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "PASS\n"


def test_fix_bounds_name_the_flag_and_kld_is_never_negative() -> None:
    flags = {"max_new_tokens": "--max-new-tokens"}
    assert with_flags("pass max_new_tokens ≤ 6, or shorten", flags) == "pass --max-new-tokens ≤ 6, or shorten"
    assert f"{_nonnegative(-1e-9):.6f}" == "0.000000"
    assert _nonnegative(0.25) == 0.25


# -- 5. setup.sh says what it does ---------------------------------------------------------------------
def test_setup_script_announces_its_steps_and_lets_pip_name_the_packages() -> None:
    script = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], check=False).returncode == 0
    installs = [line for line in script.splitlines() if '"${PIP[@]}" install' in line and "pip" not in line.split()[-1]]
    assert installs and all(" -q " not in line for line in installs), installs  # only pip's own upgrade is -q
    assert [int(n) for n in re.findall(r'^\s*step (\d) "', script, flags=re.MULTILINE)] == [1, 2, 3, 4]


# -- 7. perplexity names its ctx -------------------------------------------------------------------------
def test_perplexity_first_line_names_the_ctx(package: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    done = stlm("perplexity", str(package), str(text), "--ctx", "32", "--chunks", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith(f"on {text}, ctx 32"), done.stdout
