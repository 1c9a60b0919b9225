"""The OpenAI API as clients use it, driven with the `openai` SDK over loopback.

Checked against independent implementations: prompts rendered by transformers' apply_chat_template,
log-probabilities = a float64 log-softmax of transformers' logits on the checkpoint (teacher-forced),
token ids from the `tokenizers` library, lm-eval's own remote-tokenizer client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch

from stlm.errors import InvalidArgumentError
from stlm.runtime import Generator, SamplingParams
from stlm.runtime.chat import load_chat_template
from stlm.runtime.logprobs import LOGPROBS_MODES
from stlm.runtime.token_bytes import TokenTexts
from stlm.serve import BackgroundServer, ServeConfig, load_service
from stlm.serve.config import LOGPROBS_MODES as SERVE_LOGPROBS_MODES
from tests.serve.test_serve import http

KEY = "k"
MODEL = "hd16-chat"
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
ATOL = 2e-4  # ONNX Runtime vs torch fp32 logits (log-probabilities of a tiny random model)


@pytest.fixture(scope="module")
def server(chat_package: Path) -> Iterator[BackgroundServer]:
    config = ServeConfig(chat_package, port=0, api_key=KEY, max_batch=4, max_queue=16, max_context=256, prefill_chunk=8)
    with BackgroundServer(load_service(config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def generator(chat_package: Path) -> Generator:
    return Generator.load(chat_package)


@pytest.fixture(scope="module")
def hf(chat_checkpoint: Path) -> Any:
    from transformers import AutoTokenizer, StableLmForCausalLM

    model = StableLmForCausalLM.from_pretrained(str(chat_checkpoint), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(chat_checkpoint))


def hf_logprobs(hf: Any, ids: list[int]) -> np.ndarray:
    """log_softmax (float64) of transformers' logits after each of ``ids`` (teacher-forced)."""
    with torch.no_grad():
        logits = hf[0](torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


# -- chat --------------------------------------------------------------------------------------------
def test_chat_completion(client: openai.OpenAI, generator: Generator, hf: Any) -> None:
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    prompt = hf[1].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)  # transformers renders it
    expected = generator.complete([prompt], max_new_tokens=8, temperature=0)[0]
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == {"length": "length", "eos": "stop"}[expected.finish_reason]
    assert result.usage is not None and result.usage.prompt_tokens == len(hf[1](prompt)["input_ids"])
    assert result.usage.completion_tokens == len(expected.token_ids)
    # max_completion_tokens is the same limit; without either the completion may fill the slot
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert again.choices[0].message.content == expected.text


def test_chat_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0.8, seed=5)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0.8,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_logprobs_are_the_models(client: openai.OpenAI, hf: Any, generator: Generator) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=1.3,  # the reported values are the model's own, whatever the sampling
        seed=2,
        logprobs=True,
        top_logprobs=3,
    )
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    rendered = hf[1].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt = hf[1](rendered)["input_ids"]
    # each token's id, recovered from its bytes through the vocabulary; then transformers teacher-forced
    texts = TokenTexts(generator.tokenizer)
    by_bytes = {texts.bytes_of(i): i for i in range(generator.tokenizer.vocab_size)}
    tokens = [by_bytes[bytes(t.bytes)] for t in content]
    assert b"".join(bytes(t.bytes) for t in content).decode() == result.choices[0].message.content
    reference = hf_logprobs(hf, prompt + tokens)[len(prompt) - 1 :]
    for i, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        assert entry.logprob == pytest.approx(reference[i, token], abs=ATOL)
        best = np.argsort(-reference[i], kind="stable")[:3]
        assert [by_bytes[bytes(t.bytes)] for t in entry.top_logprobs] == best.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(reference[i, best].tolist(), abs=ATOL)
        assert entry.token == texts.text_of(token)


def test_chat_n_and_stop(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, n=3, seed=1, temperature=1.0)  # type: ignore[arg-type]
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len({c.message.content for c in result.choices}) > 1
    first = result.choices[0].message.content or ""
    if len(first) > 3:
        stopped = client.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=10,
            seed=1,
            temperature=1.0,
            stop=[first[2:4]],
        )
        assert stopped.choices[0].message.content == first[: first.index(first[2:4])]
        assert stopped.choices[0].finish_reason == "stop"


def test_chat_without_a_template_says_how_to_give_one(packages: dict[str, Path]) -> None:
    with BackgroundServer(load_service(ServeConfig(packages["hd16-inplace"], port=0))) as srv:
        plain = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            plain.chat.completions.create(model="hd16-inplace", messages=CHAT)  # type: ignore[arg-type]
        message = caught.value.body["message"]  # type: ignore[index]
        assert "has no chat template" in message and "--chat-template FILE" in message
        # a template given to the server works
    template = str(Path(__file__).parents[1] / "data" / "chat_templates" / "chatml.jinja")
    config = ServeConfig(packages["hd16-inplace"], port=0, chat_template=template)
    with BackgroundServer(load_service(config)) as srv:
        given = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        result = given.chat.completions.create(model="hd16-inplace", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        assert result.choices[0].message.role == "assistant"
        with pytest.raises(openai.BadRequestError, match="roles must alternate"):
            given.chat.completions.create(model="hd16-inplace", messages=[CHAT[1], CHAT[1]])  # type: ignore[arg-type]


# -- completions ---------------------------------------------------------------------------------------
def test_echo_logprobs_equal_a_log_softmax_of_the_models_logits(client: openai.OpenAI, hf: Any) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True)
    choice = result.choices[0]
    lp = choice.logprobs
    assert lp is not None and choice.text.startswith(PROMPT)
    prompt = hf[1](PROMPT)["input_ids"]
    n = len(lp.tokens)  # type: ignore[arg-type]
    ids = [*prompt, *hf[1](choice.text[len(PROMPT) :])["input_ids"]]
    reference = hf_logprobs(hf, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # type: ignore[index]
    assert n == len(prompt) + 4 == len(ids)
    for i in range(1, n):
        assert lp.token_logprobs[i] == pytest.approx(reference[i - 1, ids[i]], abs=ATOL)  # type: ignore[index]
        top = lp.top_logprobs[i]  # type: ignore[index]
        best = np.argsort(-reference[i - 1], kind="stable")[:3]
        for token in best:  # the 3 most likely, and the actual token (OpenAI adds it)
            assert top[hf[1].decode([int(token)])] == pytest.approx(reference[i - 1, token], abs=ATOL)
        assert len(top) in (3, 4)
    # greedy: each generated token is the first alternative
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(len(prompt), n))  # type: ignore[index, union-attr]
    assert [choice.text[o:] for o in lp.text_offset][-1] == lp.tokens[-1]  # type: ignore[index, union-attr]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)  # type: ignore[index, union-attr]
    assert "".join(lp.tokens) == choice.text  # type: ignore[arg-type]


def test_lm_evals_request_shape(client: openai.OpenAI, hf: Any) -> None:
    """What lm-eval's local-completions sends for each log-likelihood: token ids, echo, one token."""
    context, continuation = hf[1]("The quick brown")["input_ids"], hf[1](" fox jumps")["input_ids"]
    ids = context + continuation
    result = client.completions.create(
        model=MODEL, prompt=[ids, ids[:3]], temperature=0, max_tokens=1, logprobs=1, echo=True, seed=1234
    )
    reference = hf_logprobs(hf, ids)
    first = result.choices[0].logprobs
    assert first is not None and len(result.choices) == 2
    got = sum(first.token_logprobs[len(context) : -1])  # type: ignore[arg-type, index]
    want = sum(reference[i - 1, ids[i]] for i in range(len(context), len(ids)))
    assert got == pytest.approx(want, abs=ATOL)
    assert all(len(t) <= 2 for t in first.top_logprobs[1:])  # type: ignore[union-attr, index]


def test_token_prompts_equal_text_prompts(client: openai.OpenAI, generator: Generator) -> None:
    ids = generator.tokenizer.encode(PROMPT)
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0).choices[0].text == text
    both = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=6, temperature=0)
    assert both.choices[0].text == text and both.usage.prompt_tokens == len(ids) + 2  # type: ignore[union-attr]
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)


def test_n_and_seeds(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    single = client.completions.create(**kw).choices[0].text
    several = client.completions.create(**kw, n=3)
    again = client.completions.create(**kw, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].text == single  # choice 0 samples with the seed itself
    assert [c.text for c in several.choices] == [c.text for c in again.choices]  # reproducible
    assert len({c.text for c in several.choices}) == 3
    two_prompts = client.completions.create(**{**kw, "prompt": [PROMPT, "Hello"]}, n=2)
    assert [c.index for c in two_prompts.choices] == [0, 1, 2, 3] and two_prompts.choices[0].text == single


def test_best_of_returns_the_most_likely_candidates(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3)
    candidates = client.completions.create(**kw, n=4, logprobs=0).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]  # type: ignore[union-attr, arg-type]
    best = client.completions.create(**kw, n=2, best_of=4)
    order = sorted(range(4), key=lambda i: -means[i])
    assert [c.text for c in best.choices] == [candidates[i].text for i in order[:2]]
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in candidates)  # type: ignore[union-attr, arg-type]


def test_penalties_and_logit_bias(client: openai.OpenAI, generator: Generator) -> None:
    forced = generator.tokenizer.encode(" Paris")[0]
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=0, logit_bias={str(forced): 100}
    )
    assert result.choices[0].text == " Paris" * 5
    # two tokens far above the rest: greedy picks only those two (as the library does with the same
    # bias), and a frequency penalty makes it use both
    other = generator.tokenizer.encode(" London")[0]
    bias = {str(forced): 100, str(other): 100}
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=bias)
    plain = client.completions.create(**kw).choices[0].text
    assert set(plain.split()) <= {"Paris", "London"} and len(plain.split()) == 6
    library = SamplingParams(max_new_tokens=6, temperature=0, logit_bias={forced: 100.0, other: 100.0})
    assert plain == generator.generate(PROMPT, library)
    penalised = client.completions.create(**kw, frequency_penalty=2.0).choices[0].text
    assert " Paris" in penalised and " London" in penalised
    present = client.completions.create(**kw, presence_penalty=2.0).choices[0].text
    assert " Paris" in present and " London" in present
    banned = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, frequency_penalty=2.0, logprobs=1
    )
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    assert banned.choices[0].logprobs is not None and free.choices[0].logprobs is not None
    assert len(set(banned.choices[0].logprobs.tokens)) >= len(set(free.choices[0].logprobs.tokens))  # type: ignore[arg-type]


def test_streaming_echo_and_continuous_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"continuous_usage_stats": True}))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens or [])]  # type: ignore[union-attr]
    offsets = [o for c in chunks for o in (c.choices[0].logprobs.text_offset or [])]  # type: ignore[union-attr]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset  # type: ignore[union-attr]
    usage = [c.usage for c in chunks]
    assert all(u is not None for u in usage)
    counts = [u.completion_tokens for u in usage]  # type: ignore[union-attr]
    assert counts == sorted(counts) and counts[-1] == 6 and usage[0].prompt_tokens > 0  # type: ignore[union-attr]


def test_errors_name_the_apis_fields(server: BackgroundServer) -> None:
    status, answer = http(f"{server.url}/v1/completions", body=b'{"prompt": "hi", "max_tokens": 0}', key=KEY)
    assert status == 400 and answer["error"]["param"] == "max_tokens"
    assert "max_new_tokens" not in answer["error"]["message"] and "max_tokens=0" in answer["error"]["message"]
    body = json.dumps({"messages": CHAT, "max_completion_tokens": 0}).encode()
    status, answer = http(f"{server.url}/v1/chat/completions", body=body, key=KEY)
    assert status == 400 and answer["error"]["param"] == "max_completion_tokens"
    assert "max_new_tokens" not in answer["error"]["message"]
    for body, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": CHAT, "max_tokens": 300}, "max_tokens"),
    ]:
        status, answer = http(f"{server.url}/v1/chat/completions", body=json.dumps(body).encode(), key=KEY)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)


# -- operations -----------------------------------------------------------------------------------------
def test_tokenizer_routes(server: BackgroundServer, generator: Generator, hf: Any) -> None:
    url = server.url
    status, answer = http(
        f"{url}/tokenize", body=json.dumps({"prompt": PROMPT, "return_token_strs": True}).encode(), key=KEY
    )
    assert status == 200 and answer["tokens"] == hf[1](PROMPT)["input_ids"] and answer["count"] == len(answer["tokens"])
    assert "".join(answer["token_strs"]) == PROMPT and answer["max_model_len"] == 256
    status, chat = http(f"{url}/tokenize", body=json.dumps({"messages": CHAT}).encode(), key=KEY)
    rendered = hf[1].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == hf[1](rendered)["input_ids"]
    status, answer = http(f"{url}/detokenize", body=json.dumps({"tokens": answer["tokens"]}).encode(), key=KEY)
    assert (status, answer) == (200, {"prompt": PROMPT})
    status, info = http(f"{url}/tokenizer_info", key=KEY)
    assert status == 200 and info["eos_token"] == "<|endoftext|>" and info["chat_template"].startswith("{% for")
    assert http(f"{url}/version", key=KEY)[1]["version"]
    assert http(f"{url}/ready", key=None) == (200, {"status": "ready", "model": MODEL})
    assert http(f"{url}/detokenize", body=b'{"tokens": [-1]}', key=KEY)[0] == 400


def test_lm_evals_remote_tokenizer_accepts_the_server(server: BackgroundServer, hf: Any) -> None:
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    base = f"{server.url}/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=KEY)
    remote = RemoteTokenizer(base, auth_token=KEY)
    text = "Ünïcode 😀 and text"
    assert remote.encode(text) == hf[1](text)["input_ids"] and remote.decode(remote.encode(text)) == text
    assert remote.eos_token_id == 0
    # lm-eval renders /tokenizer_info's template itself (its own Jinja settings; special tokens passed here)
    assert "<|user|>\nWhat is the capital" in remote.apply_chat_template(CHAT, eos_token="<|endoftext|>")


def test_library_template_equals_served_template(chat_package: Path, generator: Generator) -> None:
    template = load_chat_template(chat_package, generator.manifest, generator.tokenizer)
    assert template is not None and math.isfinite(len(template.render(CHAT)))


def test_scoring_long_prompts_while_others_decode(client: openai.OpenAI, hf: Any) -> None:
    """Prompts longer than the prefill chunk (8 here) are scored chunk by chunk, batched with
    sequences that decode at the same time: the same values as alone, and as transformers'."""
    long = " ".join(["The old sailor told the children a long story about the sea"] * 3)
    echo: dict[str, Any] = dict(model=MODEL, max_tokens=1, temperature=0, logprobs=2, echo=True)
    alone = client.completions.create(prompt=long, **echo).choices[0].logprobs
    with ThreadPoolExecutor(4) as pool:
        decoding = [
            pool.submit(client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
            for _ in range(2)
        ]
        scored = [pool.submit(client.completions.create, prompt=long, **echo) for _ in range(2)]
        results = [f.result().choices[0].logprobs for f in scored]
        assert all(f.result().choices[0].finish_reason == "length" for f in decoding)
    assert alone is not None and all(r is not None and r.token_logprobs == alone.token_logprobs for r in results)
    ids = hf[1](long)["input_ids"]
    assert len(ids) > 24
    reference = hf_logprobs(hf, ids)
    got = np.array(alone.token_logprobs[1 : len(ids)], dtype=np.float64)  # type: ignore[index]
    want = np.array([reference[i - 1, ids[i]] for i in range(1, len(ids))])
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_readiness_turns_503_when_the_shutdown_begins(packages: dict[str, Path]) -> None:
    srv = BackgroundServer(load_service(ServeConfig(packages["hd16-inplace"], port=0))).start()
    try:
        assert http(f"{srv.url}/ready", key=None) == (200, {"status": "ready", "model": "hd16-inplace"})
        srv.service.start_draining()  # what the server's shutdown does first (its listener closes too)
        assert http(f"{srv.url}/ready", key=None) == (503, {"status": "draining"})
        status, answer = http(f"{srv.url}/health", key=None)
        assert status == 200 and answer["status"] == "draining"  # alive: finishing its requests
    finally:
        srv.stop()
    fresh = BackgroundServer(load_service(ServeConfig(packages["hd16-inplace"], port=0))).start()
    fresh.stop()
    assert fresh.service.draining  # the shutdown told the service


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("log_level", "loud", "--log-level"),
        ("logprobs_mode", "sampled", "--logprobs-mode"),
        ("access_log", "no", "access_log"),
    ],
)
def test_config_refuses_bad_options(chat_package: Path, field: str, value: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        ServeConfig(chat_package, **{field: value})  # type: ignore[arg-type]
    assert LOGPROBS_MODES == SERVE_LOGPROBS_MODES  # the CLI's choices are the library's


def test_logprobs_mode_processed(chat_package: Path, client: openai.OpenAI, hf: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.5, seed=9, logprobs=1)
    raw = client.completions.create(**kw).choices[0]
    config = ServeConfig(chat_package, port=0, max_context=256, logprobs_mode="processed")
    with BackgroundServer(load_service(config)) as srv:
        other = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        processed = other.completions.create(**kw).choices[0]
    assert processed.text == raw.text  # the mode changes what is reported, not what is sampled
    prompt = hf[1](PROMPT)["input_ids"]
    ids = prompt + hf[1](raw.text)["input_ids"]
    with torch.no_grad():
        logits = hf[0](torch.tensor([ids])).logits[0].double()
    tempered = torch.log_softmax(logits / 0.5, dim=-1).numpy()
    plain = torch.log_softmax(logits, dim=-1).numpy()
    for i, token in enumerate(ids[len(prompt) :]):
        at = len(prompt) - 1 + i
        assert processed.logprobs.token_logprobs[i] == pytest.approx(tempered[at, token], abs=2 * ATOL)  # type: ignore[union-attr, index]
        assert raw.logprobs.token_logprobs[i] == pytest.approx(plain[at, token], abs=ATOL)  # type: ignore[union-attr, index]
