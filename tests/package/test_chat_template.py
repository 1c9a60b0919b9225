"""Chat templates: rendered as transformers' apply_chat_template renders them (checked against it),
sandboxed, carried by the export (or replaced with --chat-template), used by `stlm generate --chat`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from stlm.cli import cli
from stlm.errors import InvalidArgumentError
from stlm.export.onnx_export import export_onnx
from stlm.package.chat_template import CHAT_TEMPLATE_NAME, TOKENIZER_CONFIG_NAME
from stlm.package.manifest import read_manifest
from stlm.runtime import Generator
from stlm.runtime.chat import ChatTemplate, load_chat_template
from tests.conftest import SPECIAL_TOKENS

TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"
ZEPHYR = (TEMPLATES / "zephyr.jinja").read_text()
CHATML = (TEMPLATES / "chatml.jinja").read_text()
TOKENS = SPECIAL_TOKENS
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3?  ", "name": None},
    ],
]


def transformers_render(folder: Path, template: str, messages: list[dict[str, Any]], **kw: Any) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return str(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kw))


@pytest.mark.parametrize("template", [ZEPHYR, CHATML], ids=["zephyr", "chatml"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(
    chat_checkpoint: Path, template: str, chat: int, generation_prompt: bool
) -> None:
    ours = ChatTemplate(template, "test", TOKENS).render(CHATS[chat], add_generation_prompt=generation_prompt)
    theirs = transformers_render(chat_checkpoint, template, CHATS[chat], add_generation_prompt=generation_prompt)
    assert ours == theirs and "<|" in ours


def test_continue_final_message_equals_transformers(chat_checkpoint: Path) -> None:
    messages = [*CHATS[0], {"role": "assistant", "content": "Hi, I am"}]
    ours = ChatTemplate(ZEPHYR, "test", TOKENS).render(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    theirs = transformers_render(chat_checkpoint, ZEPHYR, messages, continue_final_message=True)
    assert ours == theirs and ours.endswith("Hi, I am")


def test_raise_exception_becomes_a_clear_error() -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidArgumentError, match="refused these messages: Conversation roles must alternate"):
        ChatTemplate(CHATML, "chatml", TOKENS).render(bad)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",  # no way out of the sandbox
        "{% set x = namespace() %}{% set x._y = 1 %}{{ x }}",  # namespaces refuse underscores
        "{{ messages.append(1) }}",  # immutable: no list mutation
        "{{ undefined_function() }}",
    ],
)
def test_the_sandbox_refuses_escapes(source: str) -> None:
    with pytest.raises(InvalidArgumentError, match="refused these messages"):
        ChatTemplate(source, "hostile", TOKENS).render(CHATS[0])


def test_helpers_transformers_templates_use() -> None:
    source = "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{% for m in messages %}{% break %}{% endfor %}"
    rendered = ChatTemplate(source, "t").render([{"role": "user", "content": "<é>"}])
    year, data, _ = rendered.split("|")
    assert len(year) == 4 and year.isdigit() and data == '[{"role": "user", "content": "<é>"}]'


def test_syntax_errors_name_the_line() -> None:
    with pytest.raises(InvalidArgumentError, match=r"not a valid Jinja template: .*\(line 2\)"):
        ChatTemplate("ok\n{% for %}", "broken.jinja")


def test_export_carries_the_checkpoints_template(chat_checkpoint: Path, tmp_path: Path) -> None:
    package = export_onnx(chat_checkpoint, tmp_path / "pkg", kv_cache="inplace")
    manifest = read_manifest(package)
    assert (manifest.chat_template, manifest.tokenizer_config) == (CHAT_TEMPLATE_NAME, TOKENIZER_CONFIG_NAME)
    assert (package / CHAT_TEMPLATE_NAME).read_text() == ZEPHYR
    generator = Generator.load(package)
    template = load_chat_template(package, manifest, generator.tokenizer)
    assert template is not None and template.variables["eos_token"] == "<|endoftext|>"
    assert template.render(CHATS[1]) == transformers_render(
        chat_checkpoint, ZEPHYR, CHATS[1], add_generation_prompt=True
    )
    # `stlm generate --chat` renders the prompt with it: same text as the library on the rendered prompt
    result = CliRunner().invoke(cli, ["generate", str(package), "--chat", "-p", "Hello!", "-n", "5", "-t", "0"])
    assert result.exit_code == 0, result.output
    prompt = template.render(CHATS[0])
    assert result.stdout == generator.generate(prompt, max_new_tokens=5, temperature=0) + "\n"


def test_export_chat_template_option(chat_checkpoint: Path, checkpoint: Path, tmp_path: Path) -> None:
    replaced = export_onnx(chat_checkpoint, tmp_path / "a", chat_template=TEMPLATES / "chatml.jinja")
    assert (replaced / CHAT_TEMPLATE_NAME).read_text() == CHATML
    # a checkpoint without a template: none in the package, unless given
    plain = export_onnx(checkpoint, tmp_path / "b")
    assert read_manifest(plain).chat_template is None and not (plain / CHAT_TEMPLATE_NAME).exists()
    result = CliRunner().invoke(cli, ["generate", str(plain), "--chat", "-p", "Hi", "-n", "2"])
    assert result.exit_code == 2 and "has no chat template" in result.output and "--chat-template FILE" in result.output
    given = export_onnx(checkpoint, tmp_path / "c", chat_template=TEMPLATES / "zephyr.jinja")
    assert read_manifest(given).chat_template == CHAT_TEMPLATE_NAME
    # a template that does not compile stops the export before anything is written
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    result = CliRunner().invoke(
        cli, ["export", str(checkpoint), "-o", str(tmp_path / "d"), "--chat-template", str(broken)]
    )
    assert result.exit_code == 2 and "not a valid Jinja template" in result.output
    assert not (tmp_path / "d").exists()
