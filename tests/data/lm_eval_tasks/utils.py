"""Data loaders of the local lm-eval tasks: the JSON-lines files next to this file, no hub.

Referenced from the task YAMLs as ``custom_dataset: !function utils.load_...``, so the tasks work
from any working directory and offline (``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    import datasets

    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])})


def load_mc(**_: Any) -> Any:
    """stlm_shakespeare_mc: which line of a sonnet comes next (4 choices)."""
    return _load("stlm_shakespeare_mc.jsonl")


def load_gen(**_: Any) -> Any:
    """stlm_shakespeare_gen: the next word of a line (generated until the newline)."""
    return _load("stlm_shakespeare_gen.jsonl")


def load_ppl(**_: Any) -> Any:
    """stlm_shakespeare_ppl: whole passages scored with loglikelihood_rolling."""
    return _load("stlm_shakespeare_ppl.jsonl")
