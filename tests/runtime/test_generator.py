"""The embeddable generator end to end on a tiny model: controls, batching, threads, cancellation,
memory, bad input."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stlm.errors import InvalidArgumentError, StlmError
from stlm.runtime import Generator, SamplingParams
from stlm.runtime.backend import Backend

VARIANTS = ["hd16", "hd16-inplace"]


@pytest.fixture(scope="module", params=VARIANTS)
def gen(request: pytest.FixtureRequest, packages: dict[str, Path]) -> Generator:
    return Generator.load(packages[request.param])


PROMPTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    " ".join(["tokens"] * 40),
]


def test_prompt_lengths_span_1_to_40(gen: Generator) -> None:
    lengths = [len(gen.encode_prompt(p)) for p in PROMPTS]
    assert min(lengths) == 1 and max(lengths) == 40


def test_batched_greedy_equals_one_by_one(gen: Generator) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=0)
    alone = [gen.complete([p], params)[0] for p in PROMPTS]
    batched = gen.complete(PROMPTS, params)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_seed_reproduces_and_differs(gen: Generator) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    first, again = gen.complete([PROMPTS[1]], params)[0], gen.complete([PROMPTS[1]], params)[0]
    other = gen.complete([PROMPTS[1]], SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=124))[0]
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_top_k_1_is_greedy(gen: Generator) -> None:
    greedy = gen.complete([PROMPTS[2]], SamplingParams(max_new_tokens=12, temperature=0))[0]
    top1 = gen.complete([PROMPTS[2]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=5))[0]
    assert greedy.token_ids == top1.token_ids


def test_repetition_penalty_changes_greedy_choices(gen: Generator) -> None:
    plain = gen.complete([PROMPTS[3]], SamplingParams(max_new_tokens=16, temperature=0))[0]
    penalised = gen.complete([PROMPTS[3]], SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=50.0))[0]
    prompt_ids = set(gen.encode_prompt(PROMPTS[3]))
    # a huge penalty makes every already-seen id (prompt or generated) lose to any unseen one
    assert len(set(penalised.token_ids)) == len(penalised.token_ids)
    assert not prompt_ids & set(penalised.token_ids)
    assert plain.token_ids != penalised.token_ids


def test_stop_string_spanning_tokens_ends_generation(gen: Generator) -> None:
    full = gen.complete([PROMPTS[1]], SamplingParams(max_new_tokens=24, temperature=0))[0]
    assert len(full.text) > 6
    # a stop string made of the end of one generated token and the start of the next
    pieces = [gen.tokenizer.decode([t]) for t in full.token_ids]
    joined = "".join(pieces)
    assert joined == full.text
    cut = len(pieces[0]) + len(pieces[1])
    stop = joined[cut - 2 : cut + 2] if len(pieces[1]) >= 2 and len(pieces[2]) >= 2 else joined[3:7]
    start = joined.index(stop)
    result = gen.complete([PROMPTS[1]], SamplingParams(max_new_tokens=24, temperature=0, stop=(stop,)))[0]
    assert result.finish_reason == "stop"
    assert result.text == joined[:start]
    streamed = "".join(gen.stream(PROMPTS[1], SamplingParams(max_new_tokens=24, temperature=0, stop=(stop,))))
    assert streamed == result.text


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize(("temperature", "mode"), [(0.0, "raw"), (0.7, "raw"), (0.0, "processed"), (0.7, "processed")])
def test_logprobs_are_the_log_softmax_of_the_models_logits(gen: Generator, temperature: float, mode: str) -> None:
    """``raw`` (OpenAI's definition): log-softmax of the model's logits whatever the temperature;
    ``processed``: log-softmax of logits / T. The logits come from teacher-forcing the generated
    sequence (Generator.logits)."""
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=1, logprobs=True, logprobs_mode=mode)
    result = gen.complete([PROMPTS[1]], params)[0]
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) > 0
    prompt = gen.encode_prompt(PROMPTS[1])
    logits = gen.logits([prompt + list(result.token_ids)])[0]
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(result.token_ids)]
    scale = temperature if mode == "processed" and temperature else 1.0
    want = _log_softmax(steps / scale)[np.arange(len(result.token_ids)), list(result.token_ids)]
    np.testing.assert_allclose(result.logprobs, want, rtol=0, atol=1e-4)
    assert gen.complete([PROMPTS[0]], SamplingParams(max_new_tokens=4))[0].logprobs is None


def test_generate_batch_equals_generate_one_by_one(gen: Generator) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert gen.generate_batch(PROMPTS[:3], params) == [gen.generate(p, params) for p in PROMPTS[:3]]


def test_logits_of_every_position_equal_prefill_and_decode_logits(gen: Generator) -> None:
    """Generator.logits in chunks (here 5 tokens) against the last-token logits of generation's own path."""
    rows = [gen.encode_prompt(PROMPTS[2]), gen.encode_prompt(PROMPTS[1])]
    every = gen.logits(rows, chunk=5)
    assert [e.shape for e in every] == [(len(r), gen.manifest.model.vocab_size) for r in rows]
    assert all(e.dtype == np.float32 for e in every)
    for row, logits in zip(rows, every, strict=True):
        cache = gen.backend.new_cache(1, len(row))
        step = [gen.backend.forward(cache, [row[:3]])[0]]
        step += [gen.backend.forward(cache, [[t]])[0] for t in row[3:]]
        np.testing.assert_allclose(logits[2:], np.stack(step), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="context"):
        gen.logits([[1] * (gen.context_length + 1)])
    with pytest.raises(InvalidArgumentError, match="outside"):
        gen.logits([[gen.manifest.model.vocab_size]])


def test_stream_equals_generate(gen: Generator) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=9)
    assert "".join(gen.stream(PROMPTS[2], params)) == gen.generate(PROMPTS[2], params)


def test_threads_share_one_generator(gen: Generator) -> None:
    jobs = [(PROMPTS[i % 4], SamplingParams(max_new_tokens=10, temperature=0.9, seed=i)) for i in range(32)]
    serial = [gen.generate(p, sp) for p, sp in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda job: gen.generate(*job), jobs))
    assert threaded == serial


def test_empty_prompt_starts_from_bos(gen: Generator) -> None:
    assert gen.encode_prompt("") == [gen.manifest.generation.bos_token_id]
    assert gen.complete([""], SamplingParams(max_new_tokens=4, temperature=0))[0].prompt_tokens == 1


class _Watched:
    """The real backend, with weak references kept to the caches it creates (to see them freed)."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.caches = inner, []  # type: ignore[var-annotated]
        self.manifest, self.name = inner.manifest, inner.name

    def new_cache(self, batch: int, capacity: int) -> Any:
        cache = self.inner.new_cache(batch, capacity)
        self.caches.append(weakref.ref(cache))
        return cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_cancel_mid_stream_and_memory_is_freed(gen: Generator) -> None:
    watched = Generator(_Watched(gen.backend), gen.tokenizer, gen.manifest)  # type: ignore[arg-type]
    cancel = threading.Event()
    pieces = []
    for piece in watched.stream(PROMPTS[1], SamplingParams(max_new_tokens=200, temperature=0), cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    result = watched.complete([PROMPTS[1]], SamplingParams(max_new_tokens=200, temperature=0), cancel=cancel)[0]
    assert result.finish_reason == "cancelled" and result.token_ids == ()
    gen_iter = watched.stream(PROMPTS[1], SamplingParams(max_new_tokens=200, temperature=0))
    next(gen_iter)
    gen_iter.close()  # a consumer that stops early
    watched.generate(PROMPTS[0], max_new_tokens=4)
    gc.collect()
    assert len(watched.backend.caches) == 4  # type: ignore[attr-defined]
    assert all(ref() is None for ref in watched.backend.caches)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(stop=("ok", "")), "stop"),
        (dict(max_new_tokens=4096), "context"),
        (dict(temperature=-1.0), "temperature"),
        (dict(nonsense=1), "nonsense"),
    ],
)
def test_bad_input_is_a_clear_error(gen: Generator, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(StlmError, match=needle):
        gen.generate("hello", **kwargs)


@pytest.mark.parametrize("prompt", [42, None, b"bytes", ["a list"]])
def test_non_string_prompt(gen: Generator, prompt: object) -> None:
    with pytest.raises(InvalidArgumentError, match="string"):
        gen.generate(prompt)  # type: ignore[arg-type]


def test_logits_of_padded_vocab_do_not_break_decoding(gen: Generator) -> None:
    ids = np.arange(gen.manifest.model.vocab_size - 3, gen.manifest.model.vocab_size)
    assert gen.tokenizer.decode(ids.tolist()) == ""
