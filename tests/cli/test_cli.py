"""The CLI's habits: -v/-q anywhere, STLM_<COMMAND>_<OPTION> environment variables, --dtype
spellings, make-checkpoint's options, generate --threads, errors that name flags, --revision."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from stlm.cli import cli
from stlm.cli.common import QUIET_ENV, option_flags, with_flags
from stlm.errors import InvalidArgumentError
from stlm.runtime import SamplingParams
from tests.conftest import neox_tokenizer


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    result = CliRunner().invoke(cli, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_of(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    return result.stderr[result.stderr.index("error: ") :]


# -- -v / -q -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_command_leaves_only_the_result(checkpoint: Path, tmp_path: Path, where: str) -> None:
    args = ["export", str(checkpoint), "-o", str(tmp_path / "pkg")]
    result = invoke(*(["-q", *args] if where == "before" else [*args, "-q"]))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "pkg")
    assert result.stderr == ""


def test_without_quiet_export_shows_its_banner_and_progress(checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("export", str(checkpoint), "-o", str(tmp_path / "pkg"))
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("exporting ") and "layers: 2/2" in result.stderr


def test_quiet_perplexity_shows_no_progress(package: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    loud = invoke("perplexity", str(package), str(text), "--ctx", "32", "--chunks", "2", "--json")
    quiet = invoke("perplexity", str(package), str(text), "--ctx", "32", "--chunks", "2", "--json", "-q")
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    assert "2/2" in loud.stderr and quiet.stderr == ""
    assert json.loads(quiet.stdout)["ppl"] == json.loads(loud.stdout)["ppl"]


@pytest.mark.parametrize("args", [["-v", "make-checkpoint"], ["make-checkpoint", "-v"]])
def test_verbose_before_or_after_the_command_logs_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, args: list[str]
) -> None:
    before = logging.getLogger().level
    result = invoke(*args, "-o", str(tmp_path / "ck"), "--preset", "tiny", "--tokenizer", str(neox_tokenizer()))
    assert result.exit_code == 0, result.output
    assert any("wrote a random" in r.getMessage() for r in caplog.records)
    assert logging.getLogger().level == before  # an in-process caller gets its level back


def test_without_verbose_info_is_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    invoke("make-checkpoint", "-o", str(tmp_path / "ck"), "--preset", "tiny", "--tokenizer", str(neox_tokenizer()))
    assert not any("wrote a random" in r.getMessage() for r in caplog.records)


def test_quiet_silences_other_progress_bars_only_while_it_runs() -> None:
    seen: dict[str, str | None] = {}
    before = {k: os.environ.get(k) for k in QUIET_ENV}

    @cli.command("probe-env", hidden=True)
    def probe() -> None:
        seen.update({k: os.environ.get(k) for k in QUIET_ENV})

    try:
        assert invoke("-q", "probe-env").exit_code == 0
    finally:
        cli.commands.pop("probe-env")
    assert seen == QUIET_ENV  # tqdm (lm-eval) and huggingface_hub bars are off under -q
    assert {k: os.environ.get(k) for k in QUIET_ENV} == before


def test_every_command_takes_verbose_and_quiet_and_names_its_envvars() -> None:
    for name, command in cli.commands.items():
        flags = {o for p in command.params for o in p.opts}
        assert {"-v", "-q", "--verbose", "--quiet"} <= flags, name
        prefix = "STLM_" + name.upper().replace("-", "_") + "_"
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("verbose", "quiet", "help"):
                assert isinstance(param.envvar, str), (name, param.name)
                assert param.envvar.startswith(prefix) or param.envvar == "STLM_API_KEY", param.envvar


# -- environment variables ---------------------------------------------------------------------


def test_options_from_the_environment_match_the_flags(package: Path) -> None:
    flags = invoke("generate", str(package), "-p", "hello", "-n", "6", "-t", "0", "--threads", "1")
    env = {"STLM_GENERATE_MAX_NEW_TOKENS": "6", "STLM_GENERATE_TEMPERATURE": "0", "STLM_GENERATE_THREADS": "1"}
    from_env = invoke("generate", str(package), "-p", "hello", env=env)
    assert flags.exit_code == 0 and from_env.exit_code == 0, flags.output + from_env.output
    assert from_env.stdout == flags.stdout
    overridden = invoke("generate", str(package), "-p", "hello", "-n", "2", env=env)
    assert overridden.stdout != flags.stdout  # a flag wins over the environment


def test_a_bad_value_from_the_environment_names_the_flag(package: Path) -> None:
    message = error_of(invoke("generate", str(package), "-p", "hi", env={"STLM_GENERATE_TOP_P": "1.5"}))
    assert "--top-p 1.5" in message and "top_p=" not in message


def test_quiet_from_the_environment(checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("export", str(checkpoint), "-o", str(tmp_path / "pkg"), env={"STLM_QUIET": "1"})
    assert result.exit_code == 0 and result.stderr == ""


def test_empty_api_key_in_the_environment_is_refused(package: Path) -> None:
    message = error_of(invoke("serve", str(package), env={"STLM_API_KEY": ""}))
    assert "--api-key is empty" in message


def test_serve_options_from_the_environment_are_checked(package: Path) -> None:
    message = error_of(invoke("serve", str(package), env={"STLM_SERVE_MAX_BATCH": "0"}))
    assert "--max-batch" in message


# -- errors name flags -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag_text", "field_text"),
    [
        (["--top-p", "1.5"], "--top-p 1.5", "top_p="),
        (["--repetition-penalty", "0"], "--repetition-penalty 0", "repetition_penalty="),
        (["--min-p", "2"], "--min-p 2", "min_p="),
        (["-n", "0"], "--max-new-tokens 0", "max_new_tokens="),
    ],
)
def test_generate_errors_name_the_flag(package: Path, args: list[str], flag_text: str, field_text: str) -> None:
    message = error_of(invoke("generate", str(package), "-p", "hi", *args))
    assert flag_text in message and field_text not in message


def test_the_library_keeps_naming_python_fields() -> None:
    with pytest.raises(InvalidArgumentError, match=r"top_p=1\.5"):
        SamplingParams(top_p=1.5)


def test_with_flags_rewrites_whole_names_only() -> None:
    flags = {"top_p": "--top-p", "seed": "--seed"}
    assert with_flags("top_p=2 (use top_p=1.0); max_top_p=3, x.seed=1", flags) == (
        "--top-p 2 (use --top-p 1.0); max_top_p=3, x.seed=1"
    )
    assert option_flags(cli.commands["generate"])["max_new_tokens"] == "--max-new-tokens"


# -- --dtype, make-checkpoint, --threads, --revision ---------------------------------------------


@pytest.mark.parametrize(("spelling", "expected"), [("bfloat16", "bfloat16"), ("fp16", "float16")])
def test_make_checkpoint_takes_both_dtype_spellings(tmp_path: Path, spelling: str, expected: str) -> None:
    out = tmp_path / "ck"
    result = invoke("make-checkpoint", "-o", str(out), "--preset", "tiny", "--dtype", spelling)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert expected in (config.get("dtype"), config.get("torch_dtype"))


def test_export_takes_numpy_dtype_names(checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("-q", "export", str(checkpoint), "-o", str(tmp_path / "pkg"), "--dtype", "float16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pkg" / "stlm.json").read_text())["variant"]["weight_dtype"] == "fp16"


def test_an_unknown_dtype_lists_both_spellings(tmp_path: Path) -> None:
    message = error_of(invoke("make-checkpoint", "-o", str(tmp_path / "ck"), "--dtype", "float8"))
    assert "'float8'" in message and "bf16" in message and "bfloat16" in message
    assert not (tmp_path / "ck").exists()


def test_make_checkpoint_folder_once_and_never_over_files(tmp_path: Path) -> None:
    assert "none was given" in error_of(invoke("make-checkpoint"))
    assert "both" in error_of(invoke("make-checkpoint", str(tmp_path / "a"), "-o", str(tmp_path / "b")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "--overwrite" in error_of(invoke("make-checkpoint", "-o", str(tmp_path / "full"), "--preset", "tiny"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "full").iterdir())) == 1
    legacy = invoke("make-checkpoint", str(tmp_path / "positional"), "--preset", "tiny")
    assert legacy.exit_code == 0 and (tmp_path / "positional" / "config.json").is_file()


def test_generate_threads_is_checked(package: Path) -> None:
    result = invoke("generate", str(package), "-p", "hi", "--threads", "0")
    assert result.exit_code == 2 and "--threads" in result.stderr


def test_revision_applies_to_hub_ids_only(checkpoint: Path, tmp_path: Path) -> None:
    message = error_of(invoke("export", str(checkpoint), "-o", str(tmp_path / "p"), "--revision", "v1"))
    assert "--revision 'v1'" in message and "local folder" in message


@pytest.mark.slow
def test_revision_picks_the_snapshot_of_a_hub_id(checkpoint: Path, tmp_path: Path) -> None:
    """A Hugging Face cache holding revision v1 of acme/tiny (and no main): offline, huggingface_hub
    resolves refs/v1 to its snapshot only when stlm passes the revision on."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}

    def export(*extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "stlm", "-q", "export", "acme/tiny", "-o", str(tmp_path / "p"), *extra]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)

    missing = export()
    assert missing.returncode == 2 and "could not fetch 'acme/tiny'" in missing.stderr, missing.stderr
    found = export("--revision", "v1")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(tmp_path / "p") and (tmp_path / "p" / "model.onnx").is_file()


# -- a missing extra, in process -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "perplexity"])
def test_reference_checkpoint_without_torch_names_the_extra(
    command: str, checkpoint: Path, package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("torch", "transformers"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = (
        ["verify", str(checkpoint), str(package)]
        if command == "verify"
        else ["perplexity", str(package), str(text), "--ctx", "32", "--reference", str(checkpoint)]
    )
    message = error_of(invoke(*args))
    assert "pip install 'stlm[reference]'" in message
