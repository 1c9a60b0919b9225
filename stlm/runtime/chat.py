"""Chat messages → prompt text with a package's chat template (as transformers' apply_chat_template).

The template runs sandboxed (:mod:`stlm.package.chat_template`) and sees ``messages`` (dicts without
None values), ``add_generation_prompt``, the package's special tokens (``bos_token``,
``eos_token``, ...: from its ``tokenizer_config.json``, else the tokens of the manifest's BOS/EOS
ids) and any extra variables the caller passes. The rendered text is tokenized without adding
special tokens (the template writes them), as transformers does.

StableLM-3B-4E1T is a base model without a template; its tuned siblings (e.g. stablelm-zephyr-3b)
carry one, which ``stlm export`` copies. ``--chat-template FILE`` gives or replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stlm.errors import InvalidArgumentError, PackageError
from stlm.package.chat_template import chat_template_source, compile_template, special_tokens
from stlm.package.manifest import Manifest
from stlm.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from stlm.runtime.generator import Generator

__all__ = ["ChatTemplate", "NoChatTemplateError", "chat_prompt", "load_chat_template", "missing_template"]

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_RESERVED = frozenset({"messages", "add_generation_prompt"})


class NoChatTemplateError(InvalidArgumentError):
    """The package has no chat template and none was given."""


class ChatTemplate:
    """A compiled chat template and the variables it sees besides the messages."""

    def __init__(self, source: str, origin: str, variables: Mapping[str, str] | None = None) -> None:
        self.source, self.origin = source, origin
        self.variables = dict(variables or {})
        self._template = compile_template(source, origin)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text of ``messages``; :class:`InvalidArgumentError` if the template refuses them.

        ``continue_final_message`` leaves the last message open (the model continues it) instead of
        adding the assistant's header (``add_generation_prompt``); the two exclude each other.
        """
        if not messages:
            raise InvalidArgumentError("messages is empty", fix="pass at least one message")
        if continue_final_message and add_generation_prompt:
            raise InvalidArgumentError(
                "continue_final_message and add_generation_prompt were both set",
                fix="pass add_generation_prompt=false with continue_final_message=true",
            )
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        final = chat[-1].get("content") if continue_final_message else None
        if continue_final_message:
            if not isinstance(final, str):
                raise InvalidArgumentError(
                    "continue_final_message needs a last message with text content", fix="end with a text message"
                )
            chat[-1]["content"] = final + _CONTINUE_TAG
        extra = dict(variables or {})
        clash = _RESERVED & set(extra)
        if clash:
            raise InvalidArgumentError(
                f"template variables {sorted(clash)} are reserved", fix="do not pass messages/add_generation_prompt"
            )
        try:
            text = self._template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **{**self.variables, **extra}
            )
        except Exception as exc:  # noqa: BLE001 - raise_exception, undefined names, anything a template does
            message = str(exc).strip() or type(exc).__name__
            raise InvalidArgumentError(
                f"the chat template ({self.origin}) refused these messages: {message[:300]}",
                fix="send messages the template accepts (roles, order), or serve with another --chat-template",
            ) from None
        if final is not None:
            return _cut_at_tag(text, final)
        return text


def _cut_at_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise InvalidArgumentError(
            "continue_final_message: the template does not keep the final message's text",
            fix="use add_generation_prompt instead",
        )
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _package_variables(folder: Path, manifest: Manifest, tokenizer: Tokenizer) -> dict[str, str]:
    variables: dict[str, str] = {}
    for key, token_id in (
        ("bos_token", manifest.generation.bos_token_id),
        ("eos_token", manifest.generation.eos_token_id),
    ):
        token = tokenizer.backend.id_to_token(token_id)
        if token is not None:
            variables[key] = token
    if manifest.tokenizer_config is not None:
        path = folder / manifest.tokenizer_config
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise PackageError(f"{path} is not valid JSON ({exc})", fix="export the package again") from None
        variables.update(special_tokens(config if isinstance(config, dict) else {}))
    return variables


def load_chat_template(
    folder: str | Path, manifest: Manifest, tokenizer: Tokenizer, override: str | Path | None = None
) -> ChatTemplate | None:
    """The package's chat template, or ``override`` (a file or the template text); None if neither."""
    folder = Path(folder)
    variables = _package_variables(folder, manifest, tokenizer)
    if override is not None:
        return ChatTemplate(*chat_template_source(override), variables)
    if manifest.chat_template is None:
        return None
    path = folder / manifest.chat_template
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageError(f"cannot read {path} ({exc})", fix="export the package again") from None
    return ChatTemplate(source, repr(str(path)), variables)


def chat_prompt(
    folder: str | Path,
    generator: Generator,
    user: str,
    *,
    system: str | None = None,
    chat_template: str | Path | None = None,
) -> str:
    """The prompt of a one-turn chat (``stlm generate --chat``): an optional system message and ``user``."""
    template = load_chat_template(folder, generator.manifest, generator.tokenizer, chat_template)
    if template is None:
        raise missing_template(Path(folder).name)
    messages = [{"role": "system", "content": system}] if system is not None else []
    return template.render([*messages, {"role": "user", "content": user}])


def missing_template(package: str) -> NoChatTemplateError:
    """The error for a chat request to a package without a template (as vLLM's 400)."""
    return NoChatTemplateError(
        f"the model {package!r} has no chat template (StableLM-3B-4E1T is a base model; its chat-tuned "
        "siblings such as stablelm-zephyr-3b carry one), so chat messages cannot be turned into a prompt",
        fix="pass --chat-template FILE (a Jinja chat template, e.g. the chat model's) to `stlm serve` or "
        "`stlm generate --chat`, or export the package with --chat-template FILE; or send a plain prompt to "
        "/v1/completions",
    )
