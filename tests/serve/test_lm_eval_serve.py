"""lm-evaluation-harness's own HTTP clients against `stlm serve`, item by item.

- `local-completions` (log-likelihoods through token-id prompts + echo + logprobs, the server's
  /tokenize as its tokenizer; generation through the completions API) on the local tasks
  (tests/data/lm_eval_tasks: multiple choice, perplexity with rolling windows, generation) equals
  the in-process adapter (model `stlm`, :mod:`stlm.evaluation`) on the same package;
- `local-chat-completions` (generation through the package's chat template) equals lm-eval's `hf`
  model on the checkpoint with `apply_chat_template` (transformers renders the template there).

Offline: local tasks, checkpoint and tokenizer (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stlm.evaluation import ItemResult, evaluate_items
from stlm.serve import BackgroundServer, ServeConfig, load_service

pytestmark = pytest.mark.slow

TASK_DIR = Path(__file__).parents[1] / "data" / "lm_eval_tasks"
TASKS = ["stlm_shakespeare_mc", "stlm_shakespeare_gen", "stlm_shakespeare_ppl"]
MAX_LENGTH = 128  # small, so that the perplexity passages need several rolling windows
MODEL = "hd16-chat"
TOLERANCE = 1e-4

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def server(chat_package: Path) -> Iterator[BackgroundServer]:
    # no API key: loopback only (lm-eval's tokenizer probes send none)
    config = ServeConfig(chat_package, port=0, max_batch=8, max_queue=32, max_context=MAX_LENGTH + 64)
    with BackgroundServer(load_service(config)) as srv:
        yield srv


def worst_difference(ours: dict[str, list[ItemResult]], ref: dict[str, list[ItemResult]], tasks: list[str]) -> float:
    """Per item: same log-likelihoods (within TOLERANCE), greedy flags, generations and metrics."""
    worst = 0.0
    for task in tasks:
        assert ours[task] and len(ours[task]) == len(ref[task]), task
        for a, b in zip(ours[task], ref[task], strict=True):
            assert a.doc_id == b.doc_id and len(a.loglikelihoods) == len(b.loglikelihoods), (task, a.doc_id)
            if a.loglikelihoods:
                delta = float(np.max(np.abs(np.subtract(a.loglikelihoods, b.loglikelihoods))))
                assert delta <= TOLERANCE, (task, a.doc_id, a.loglikelihoods, b.loglikelihoods)
                worst = max(worst, delta)
            assert a.greedy == b.greedy and a.generations == b.generations, (task, a.doc_id)
            if task != "stlm_shakespeare_ppl":  # perplexity metrics hold the float log-likelihood
                assert a.metrics == b.metrics, (task, a.doc_id)
    return worst


def test_local_completions_equals_the_in_process_adapter(server: BackgroundServer, chat_package: Path) -> None:
    # tokenizer_backend auto: lm-eval finds /tokenizer_info and /tokenize and uses the server's
    # tokenizer (offline, the model name names no Hugging Face tokenizer it could load instead)
    args: dict[str, Any] = {
        "base_url": f"{server.url}/v1/completions",
        "model": MODEL,
        "max_length": MAX_LENGTH,
        "max_retries": 1,
    }
    served, served_items = evaluate_items("local-completions", args, TASKS, include_path=[TASK_DIR], batch_size=8)
    # lm-eval's API models keep one token of max_length for generation, and their rolling windows one
    # more for the context: the adapter gets the same inputs and windows with these lengths
    package = str(chat_package)
    adapter, adapter_items = evaluate_items(
        "stlm", {"package": package, "max_length": MAX_LENGTH - 1}, TASKS[:2], include_path=[TASK_DIR]
    )
    rolling, rolling_items = evaluate_items(
        "stlm", {"package": package, "max_length": MAX_LENGTH - 2}, TASKS[2:], include_path=[TASK_DIR]
    )
    adapter["results"].update(rolling["results"])
    adapter_items.update(rolling_items)
    worst = worst_difference(served_items, adapter_items, TASKS)
    for task in TASKS:
        for metric, value in adapter["results"][task].items():
            if "," in metric and "stderr" not in metric:
                assert served["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    assert sum(len(i.loglikelihoods) for t in TASKS for i in served_items[t]) > 100
    assert any(g.strip() for i in served_items["stlm_shakespeare_gen"] for g in i.generations)
    print(f"\nlocal-completions = in-process adapter; largest log-likelihood difference {worst:.2e}")


def test_local_chat_completions_equals_lm_evals_hf_model(server: BackgroundServer, chat_checkpoint: Path) -> None:
    tasks = ["stlm_shakespeare_gen"]
    served, served_items = evaluate_items(
        "local-chat-completions",
        {"base_url": f"{server.url}/v1/chat/completions", "model": MODEL, "max_retries": 1},
        tasks,
        include_path=[TASK_DIR],
        apply_chat_template=True,
        limit=16,
    )
    reference, reference_items = evaluate_items(
        "hf",
        {"pretrained": str(chat_checkpoint), "dtype": "float32", "device": "cpu"},
        tasks,
        include_path=[TASK_DIR],
        apply_chat_template=True,
        limit=16,
    )
    worst_difference(served_items, reference_items, tasks)  # the generated texts, item by item
    assert any(g.strip() for i in served_items[tasks[0]] for g in i.generations)
    metric = "exact_match,first_word"
    assert served["results"][tasks[0]][metric] == reference["results"][tasks[0]][metric]
