"""lm-evaluation-harness's own HTTP clients against `stlm serve`: `local-completions` (log-likelihoods
through echo + logprobs + token-id prompts, the server's /tokenize as tokenizer) and
`local-chat-completions` (generation through the chat template), compared item by item with
lm-eval's `hf` model on the checkpoint the package was exported from. Offline: local tasks
(tests/data/lm_eval_tasks/stlm_serve_*), local checkpoint and tokenizer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stlm.serve import BackgroundServer, ServeConfig, load_service

pytestmark = pytest.mark.slow

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
LOGLIKELIHOOD_TASKS = ["stlm_serve_mc", "stlm_serve_ppl"]
MODEL = "hd16-chat"


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def server(chat_package: Path) -> Iterator[BackgroundServer]:
    # no API key: loopback only (lm-eval's tokenizer probes send no key)
    config = ServeConfig(chat_package, port=0, max_batch=4, max_queue=16, max_context=512, prefill_chunk=64)
    with BackgroundServer(load_service(config)) as srv:
        yield srv


def evaluate(model: str, model_args: dict[str, Any], tasks: list[str], **kw: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **kw,
    )
    assert results is not None
    return dict(results)


def per_item(results: dict[str, Any], task: str) -> list[Any]:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_local_completions_equals_lm_evals_hf_model(server: BackgroundServer, chat_checkpoint: Path) -> None:
    # tokenizer_backend auto: lm-eval finds /tokenizer_info and /tokenize and uses the server's
    # tokenizer (offline, the model name "hd16-chat" names no Hugging Face tokenizer it could load)
    served = evaluate(
        "local-completions",
        {"base_url": f"{server.url}/v1/completions", "model": MODEL, "max_length": 512, "max_retries": 1},
        LOGLIKELIHOOD_TASKS,
        batch_size=4,  # several token-id prompts per request
    )
    reference = evaluate(
        "hf",
        {"pretrained": str(chat_checkpoint), "dtype": "float32", "device": "cpu", "max_length": 512},
        LOGLIKELIHOOD_TASKS,
        batch_size=4,
    )
    worst = 0.0
    for task in LOGLIKELIHOOD_TASKS:
        ours, theirs = per_item(served, task), per_item(reference, task)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            for (ll_a, *rest_a), (ll_b, *rest_b) in zip(_flat(a), _flat(b), strict=True):
                worst = max(worst, abs(ll_a - ll_b))
                assert ll_a == pytest.approx(ll_b, abs=1e-3, rel=1e-5)
                assert rest_a == rest_b  # is_greedy
    print(f"\nlocal-completions vs hf: largest log-likelihood difference {worst:.2e}")
    mc, ref_mc = served["results"]["stlm_serve_mc"], reference["results"]["stlm_serve_mc"]
    assert (mc["acc,none"], mc["acc_norm,none"]) == (ref_mc["acc,none"], ref_mc["acc_norm,none"])
    ppl, ref_ppl = served["results"]["stlm_serve_ppl"], reference["results"]["stlm_serve_ppl"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(ppl[metric]) and ppl[metric] == pytest.approx(ref_ppl[metric], rel=1e-5)
    print(
        f"acc {mc['acc,none']:.4f} = {ref_mc['acc,none']:.4f}; word perplexity {ppl['word_perplexity,none']:.6g} "
        f"vs {ref_ppl['word_perplexity,none']:.6g}"
    )


def _flat(resps: Any) -> list[tuple[float, ...]]:
    """lm-eval's per-request responses ([[(loglikelihood, is_greedy)], ...] or [[loglikelihood]]) as tuples."""
    out = []
    for r in resps:
        item = r[0] if isinstance(r, list | tuple) and len(r) == 1 and isinstance(r[0], list | tuple) else r
        out.append(tuple(item) if isinstance(item, list | tuple) else (item,))
    return out


def test_local_chat_completions_equals_lm_evals_hf_model(server: BackgroundServer, chat_checkpoint: Path) -> None:
    served = evaluate(
        "local-chat-completions",
        {"base_url": f"{server.url}/v1/chat/completions", "model": MODEL, "max_retries": 1},
        ["stlm_serve_gen"],
        apply_chat_template=True,
    )
    reference = evaluate(
        "hf",
        {"pretrained": str(chat_checkpoint), "dtype": "float32", "device": "cpu"},
        ["stlm_serve_gen"],
        apply_chat_template=True,
    )
    ours, theirs = per_item(served, "stlm_serve_gen"), per_item(reference, "stlm_serve_gen")
    assert len(ours) == len(theirs) > 0 and ours == theirs  # the generated texts, item by item
    assert any(r[0][0].strip() for r in ours)  # not all empty
    score = served["results"]["stlm_serve_gen"]["exact_match,first_word"]
    assert score == reference["results"]["stlm_serve_gen"]["exact_match,first_word"]
    print(f"\nlocal-chat-completions = hf on {len(ours)} generations; exact_match {score}")
