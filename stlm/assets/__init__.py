"""Data files shipped with stlm (see ``README.md`` in this folder for sources and licenses)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

ASSETS: Final = Path(__file__).resolve().parent

#: The GPT-NeoX-20B ``tokenizer.json`` that StableLM-3B-4E1T uses (Apache-2.0).
NEOX_TOKENIZER: Final = ASSETS / "gpt-neox-20b" / "tokenizer.json"

__all__ = ["NEOX_TOKENIZER"]
