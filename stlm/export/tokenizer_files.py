"""The tokenizer files a package carries besides ``tokenizer.json``: the chat template and the
special tokens it reads.

Where the template comes from, first found: ``--chat-template`` (a file, or the template text),
the checkpoint's ``chat_template.jinja`` (transformers ≥ 4.43 saves it there), the
``chat_template`` entry of its ``tokenizer_config.json`` (a string, or a list of named templates:
the one named ``default``). The template is compiled before anything is written (a syntax error
stops the export). The special tokens (``bos_token``, ``eos_token``, ...) come from
``tokenizer_config.json``, else ``special_tokens_map.json``, and are written as a small
``tokenizer_config.json`` (strings only) next to the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stlm.errors import CheckpointError
from stlm.package.chat_template import (
    CHAT_TEMPLATE_NAME,
    TOKENIZER_CONFIG_NAME,
    chat_template_source,
    compile_template,
    special_tokens,
)

__all__ = ["TokenizerFiles", "copy_tokenizer_files", "write_tokenizer_files"]

# tokenizer_config.json entries kept besides the special tokens (for /tokenizer_info and templates)
_KEPT = ("tokenizer_class", "add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")


@dataclass(frozen=True)
class TokenizerFiles:
    """Package-relative names of the files written (None: not written)."""

    chat_template: str | None
    tokenizer_config: str | None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})", fix="restore the checkpoint's file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {type(data).__name__}, expected an object", fix="restore the file")
    return data


def _checkpoint_template(checkpoint: Path, config: dict[str, Any] | None) -> tuple[str, str] | None:
    jinja = checkpoint / CHAT_TEMPLATE_NAME
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), repr(str(jinja))
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {jinja} ({exc})", fix="restore the checkpoint's file") from None
    template = (config or {}).get("chat_template")
    where = repr(str(checkpoint / TOKENIZER_CONFIG_NAME))
    if isinstance(template, str):
        return template, where
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return str(named["default"]), f"'default' of {where}"
    return None


def write_tokenizer_files(checkpoint: Path, folder: Path, chat_template: str | Path | None = None) -> TokenizerFiles:
    """Write the chat template and special tokens of ``checkpoint`` (or ``chat_template``) into ``folder``."""
    config = _read_json(checkpoint / TOKENIZER_CONFIG_NAME)
    found = chat_template_source(chat_template) if chat_template is not None else None
    found = found or _checkpoint_template(checkpoint, config)
    if found is not None:
        compile_template(*found)
    tokens = special_tokens(config or {}) or special_tokens(_read_json(checkpoint / "special_tokens_map.json") or {})
    kept = {key: config[key] for key in _KEPT if config is not None and key in config}
    written_config = None
    if tokens or kept:
        record = {**kept, **tokens}
        (folder / TOKENIZER_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        written_config = TOKENIZER_CONFIG_NAME
    if found is None:
        return TokenizerFiles(None, written_config)
    (folder / CHAT_TEMPLATE_NAME).write_text(found[0], encoding="utf-8")
    return TokenizerFiles(CHAT_TEMPLATE_NAME, written_config)


def copy_tokenizer_files(source: Path, folder: Path, files: TokenizerFiles) -> None:
    """Copy a package's chat files (as its manifest names them) into another package's folder."""
    for name in (files.chat_template, files.tokenizer_config):
        if name is not None:
            (folder / name).write_bytes((source / name).read_bytes())
