"""OpenAI's sampling fields on hand-made logits: logit_bias, presence/frequency penalties,
log-probabilities with top-N alternatives (checked against torch's log_softmax), token bytes."""

from __future__ import annotations

import functools
import math
import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stlm.errors import InvalidArgumentError
from stlm.runtime.logprobs import mean_logprob, prompt_logprobs, token_logprob, top_alternatives
from stlm.runtime.processors import apply_logit_bias, apply_presence_frequency, check_logit_bias
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.sequence import SequenceState
from stlm.runtime.token_bytes import TokenTexts
from stlm.runtime.tokenizer import Tokenizer
from tests.conftest import neox_tokenizer

VOCAB = 50304


@functools.lru_cache(maxsize=1)
def neox() -> tuple[Tokenizer, TokenTexts]:
    tokenizer = Tokenizer.from_file(neox_tokenizer())
    return tokenizer, TokenTexts(tokenizer)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return neox()[0]


def torch_log_softmax(x: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(np.asarray(x, dtype=np.float64)), dim=-1).numpy()


# -- logit_bias ------------------------------------------------------------------------------------
def test_logit_bias_adds_to_the_named_ids_only() -> None:
    x = np.array([0.5, -1.0, 2.0, 3.0], dtype=np.float32)
    out = apply_logit_bias(x, check_logit_bias({"1": 100, 3: -2.5}))
    assert out.tolist() == [0.5, 99.0, 2.0, 0.5]
    assert x.tolist() == [0.5, -1.0, 2.0, 3.0]  # the input is never modified
    assert out.dtype == np.float32


def test_logit_bias_bans_and_forces_tokens(tokenizer: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=VOCAB).astype(np.float32)
    best = int(np.argmax(logits))
    # -100 bans the greedy token; +100 forces an unlikely one, also when sampling at temperature 1
    banned = SamplingParams(max_new_tokens=1, temperature=0, logit_bias={best: -100})
    state = SequenceState([1], banned, tokenizer, eos_token_id=0)
    state.step(logits)
    assert state.generated[0] != best
    forced = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, logit_bias={"123": 100})
    state = SequenceState([1], forced, tokenizer, eos_token_id=0)
    for _ in range(8):
        state.step(logits)
    assert state.generated == [123] * 8


@pytest.mark.parametrize(
    "bias",
    [{"-1": 1}, {"a": 1}, {"1": 101}, {"1": float("nan")}, {"1": True}, {"1.5": 1}, [1, 2], "x", {1: "2"}],
)
def test_bad_logit_bias_is_refused(bias: object) -> None:
    with pytest.raises(InvalidArgumentError, match="logit_bias"):
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]


def test_logit_bias_id_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"token id 7, expected ids in \[0, 4\)"):
        apply_logit_bias(np.zeros(4, np.float32), [(7, 1.0)])


# -- presence / frequency ----------------------------------------------------------------------------
def test_presence_and_frequency_follow_openais_formula() -> None:
    x = np.array([1.0, 2.0, 3.0, -4.0], dtype=np.float32)
    counts = np.array([0, 1, 3, 2])
    out = apply_presence_frequency(x, counts, presence=0.5, frequency=0.25)
    expected = x - (0.25 * counts + 0.5 * (counts > 0))
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert apply_presence_frequency(x, counts, -2, -2).tolist() == [1.0, 6.0, 11.0, 2.0]  # negative: encourage


def test_presence_penalty_makes_greedy_decoding_cycle(tokenizer: Tokenizer) -> None:
    # flat logits with a small preference for ids 10..13: greedy repeats id 10 without the penalty;
    # with presence 2 each used id drops below the next unused one (EOS is an unlikely id here)
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[10:14] = [1.0, 0.9, 0.8, 0.7]
    logits[-1] = -10.0
    plain = SequenceState([1], SamplingParams(max_new_tokens=5, temperature=0), tokenizer, eos_token_id=VOCAB - 1)
    penalised = SequenceState(
        [1], SamplingParams(max_new_tokens=5, temperature=0, presence_penalty=2.0), tokenizer, eos_token_id=VOCAB - 1
    )
    for _ in range(5):
        plain.step(logits)
        penalised.step(logits)
    assert plain.generated == [10] * 5
    assert penalised.generated == [10, 11, 12, 13, 0]  # then the lowest id of logit 0: 10-13 fell below it


def test_frequency_penalty_counts_generated_tokens_not_the_prompt(tokenizer: Tokenizer) -> None:
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[10], logits[11] = 1.0, 0.5
    # the prompt is full of id 10, yet the first token is 10: only generated tokens are counted
    params = SamplingParams(max_new_tokens=3, temperature=0, frequency_penalty=0.3)
    state = SequenceState([10] * 20, params, tokenizer, eos_token_id=0)
    for _ in range(3):
        state.step(logits)
    assert state.generated == [10, 10, 11]  # 1.0 → 0.7 (> 0.5) → 0.4 (< 0.5)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.01, -3, float("inf"), "1", None, True])
def test_bad_penalties_are_refused(name: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=name):
        SamplingParams(**{name: value})  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=2, max_size=40),
    st.floats(-2, 2),
    st.floats(-2, 2),
    st.floats(-100, 100),
)
def test_processors_keep_logits_finite(values: list[float], presence: float, frequency: float, bias: float) -> None:
    x = np.array(values, dtype=np.float32)
    counts = np.arange(len(values)) % 3 * 1000
    out = apply_presence_frequency(apply_logit_bias(x, [(0, bias), (1, -bias)]), counts, presence, frequency)
    assert np.all(np.isfinite(out)) and out.dtype == np.float32


# -- log-probabilities ------------------------------------------------------------------------------
def test_token_logprob_equals_torch_log_softmax() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=VOCAB) * 4).astype(np.float32)
    reference = torch_log_softmax(x)
    entry = token_logprob(x, 77, top_n=5)
    assert entry.token_id == 77 and entry.logprob == pytest.approx(reference[77], abs=1e-9)
    order = np.argsort(-reference, kind="stable")[:5]
    assert [i for i, _ in entry.top] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in entry.top], reference[order], atol=1e-9)


def test_top_alternatives_rank_ties_by_lowest_id() -> None:
    row = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.0], dtype=np.float32)
    assert top_alternatives(row, 2).tolist() == [1, 2]
    assert top_alternatives(row, 4).tolist() == [1, 2, 4, 3]
    assert top_alternatives(row, 10).tolist() == [1, 2, 4, 3, 0, 5]
    assert top_alternatives(row, 0).tolist() == []


def test_prompt_logprobs_score_each_next_token() -> None:
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(6, 300)).astype(np.float32)
    targets = [5, 0, 299, 17, 17, 100]
    entries = prompt_logprobs(rows, targets, top_n=3)
    for row, target, entry in zip(rows, targets, entries, strict=True):
        reference = torch_log_softmax(row)
        assert entry.token_id == target and entry.logprob == pytest.approx(reference[target], abs=1e-9)
        assert entry.top[0][0] == int(np.argmax(row)) and len(entry.top) == 3
    with pytest.raises(InvalidArgumentError, match="6 rows of logits for 2 tokens"):
        prompt_logprobs(rows, [1, 2])
    with pytest.raises(InvalidArgumentError, match="finite"):
        prompt_logprobs(np.full((1, 4), np.nan, np.float32), [1])


def test_mean_logprob() -> None:
    assert mean_logprob([-1.0, -2.0, -3.0]) == -2.0 and mean_logprob([]) == -math.inf


def test_reported_logprobs_are_the_models_own_whatever_the_sampling(tokenizer: Tokenizer) -> None:
    rng = np.random.default_rng(4)
    steps = [(rng.normal(size=VOCAB) * 3).astype(np.float32) for _ in range(6)]
    params = dict(max_new_tokens=6, temperature=0.5, top_k=40, top_p=0.9, seed=11, logprobs=True, top_logprobs=4)
    raw = SequenceState([1], SamplingParams(**params), tokenizer, eos_token_id=0)  # type: ignore[arg-type]
    processed = SequenceState(
        [1],
        SamplingParams(**params, logprobs_mode="processed"),  # type: ignore[arg-type]
        tokenizer,
        eos_token_id=0,
    )
    for logits in steps:
        raw.step(logits)
        processed.step(logits)
    assert raw.generated == processed.generated  # the mode changes what is reported, not what is sampled
    for i, (token, logits) in enumerate(zip(raw.generated, steps, strict=True)):
        assert raw.logprobs[i] == pytest.approx(torch_log_softmax(logits)[token], abs=1e-9)
        assert processed.logprobs[i] == pytest.approx(torch_log_softmax(logits / 0.5)[token], abs=1e-6)
        assert [t for t, _ in raw.top_logprobs[i]] == np.argsort(-logits, kind="stable")[:4].tolist()
    completion = raw.completion()
    assert completion.logprobs == tuple(raw.logprobs) and completion.top_logprobs == tuple(raw.top_logprobs)


def test_top_logprobs_needs_logprobs_and_a_bounded_count() -> None:
    with pytest.raises(InvalidArgumentError, match="needs logprobs=True"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(InvalidArgumentError, match="from 0 to 20"):
        SamplingParams(logprobs=True, top_logprobs=21)
    with pytest.raises(InvalidArgumentError, match="logprobs_mode"):
        SamplingParams(logprobs_mode="sampled")


# -- token bytes ------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_token_bytes_concatenate_to_the_texts_utf8(text: str) -> None:
    tokenizer, texts = neox()
    ids = tokenizer.encode(text)
    # the GPT-NeoX tokenizer normalizes to NFC first (U+FA10 becomes U+585A)
    assert b"".join(texts.bytes_of(i) for i in ids) == unicodedata.normalize("NFC", text).encode(
        "utf-8", "surrogatepass"
    )


def test_token_text_shows_partial_characters_as_bytes(tokenizer: Tokenizer) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("😀")  # one character, several byte-level tokens
    shown = [texts.text_of(i) for i in ids]
    assert len(ids) > 1 and all(s.startswith("bytes:\\x") for s in shown)
    assert texts.text_of(tokenizer.encode(" hello")[0]) == " hello"
    assert texts.text_of(0) == "<|endoftext|>" and texts.bytes_of(0) == b"<|endoftext|>"
    assert texts.bytes_of(50300) == b""  # a padding row of the embedding: no token
