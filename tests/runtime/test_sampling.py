"""stlm.runtime.sampling: parameters, logits processors and sampling on hand-made logits.

Expected values come from the definition (float64, full sorts: stlm.runtime.sampling.reference),
never from the fast path under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from stlm.errors import InvalidArgumentError
from stlm.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    log_softmax,
    make_rng,
    min_p_mask,
    sample_token,
    top_k_mask,
    top_p_mask,
)
from stlm.runtime.sampling.reference import reference_distribution


def ids_of(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(mask).tolist())


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def reference_dist(logits: np.ndarray, **params: float) -> np.ndarray:
    """The final sampling distribution by its definition (the sort-based oracle beside the fast path)."""
    return reference_distribution(logits, SamplingParams(**params))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parameters


def test_defaults_and_conversions() -> None:
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (64, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.seed, p.stop, p.logprobs) == (1.0, None, (), False)
    q = SamplingParams(stop=["\n\n", "User:"], temperature=1, top_k=np.int64(5), seed=np.int32(3))
    assert q.stop == ("\n\n", "User:") and isinstance(q.stop, tuple)
    assert isinstance(q.temperature, float) and type(q.top_k) is int and type(q.seed) is int
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(temperature=0).greedy and not q.greedy
    with pytest.raises(AttributeError):
        p.top_k = 3  # type: ignore[misc]


BAD_PARAMS = [
    ("max_new_tokens", 0),
    ("max_new_tokens", -5),
    ("max_new_tokens", 2.0),
    ("max_new_tokens", True),
    ("max_new_tokens", "64"),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.7"),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", 50.0),
    ("top_k", True),
    ("top_k", None),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", "0.9"),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.1),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", True),
    ("stop", ("",)),
    ("stop", ["ok", ""]),
    ("stop", (1,)),
    ("stop", None),
    ("stop", 5),
    ("logprobs", "yes"),
    ("logprobs", 1),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_invalid_parameter_is_named(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert field in message and repr(value) in message and "expected" in message
    assert info.value.fix


def test_make_rng_is_reproducible_and_validated() -> None:
    assert make_rng(7).random() == make_rng(7).random()
    assert make_rng(7).random() != make_rng(8).random()
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(InvalidArgumentError, match="seed"):
            make_rng(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- processors


def test_top_k_mask_exact() -> None:
    x = np.array([1.0, 5.0, 3.0, 5.0, 2.0], dtype=np.float32)
    assert ids_of(top_k_mask(x, 2)) == {1, 3}
    assert ids_of(top_k_mask(x, 3)) == {1, 2, 3}
    assert ids_of(top_k_mask(x, 1)) == {1}  # tie between 1 and 3: lowest id
    assert ids_of(top_k_mask(x, 0)) == ids_of(top_k_mask(x, 99)) == set(range(5))
    ties = np.array([3.0, 1.0, 3.0, 3.0, 0.0, 3.0], dtype=np.float32)
    assert ids_of(top_k_mask(ties, 2)) == {0, 2}
    assert ids_of(top_k_mask(ties, 5)) == {0, 1, 2, 3, 5}
    big = np.zeros(50304, dtype=np.float32)
    big[[40000, 123, 7000]] = 1.0  # ties at the top, plus 50301 ties at the boundary
    assert ids_of(top_k_mask(big, 2)) == {123, 7000}
    assert ids_of(top_k_mask(big, 5)) == {123, 7000, 40000, 0, 1}


def test_top_p_mask_exact() -> None:
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    assert ids_of(top_p_mask(x, 0.4)) == {0}
    assert ids_of(top_p_mask(x, 0.7)) == {0, 1}
    assert ids_of(top_p_mask(x, 0.85)) == {0, 1, 2}
    assert ids_of(top_p_mask(x, 0.99)) == {0, 1, 2, 3}
    assert ids_of(top_p_mask(x, 1e-9)) == {0}  # tiny top_p: the argmax only
    assert ids_of(top_p_mask(x, 1.0)) == {0, 1, 2, 3}
    shuffled = logits_of([0.05, 0.3, 0.5, 0.15])
    assert ids_of(top_p_mask(shuffled, 0.7)) == {1, 2}
    ties = logits_of([0.3, 0.2, 0.3, 0.2])
    assert ids_of(top_p_mask(ties, 0.25)) == {0}  # equal probabilities: lowest id first
    assert ids_of(top_p_mask(ties, 0.5)) == {0, 2}
    assert ids_of(top_p_mask(ties, 0.7)) == {0, 1, 2}
    uniform = np.zeros(10, dtype=np.float32)  # mass exactly on the boundary: no rounding luck
    assert ids_of(top_p_mask(uniform, 0.3)) == {0, 1, 2}
    assert ids_of(top_p_mask(uniform, 0.7)) == set(range(7))
    assert ids_of(top_p_mask(uniform, 0.75)) == set(range(8))
    masked = np.array([0.0, -np.inf, 0.0, -np.inf], dtype=np.float32)
    assert ids_of(top_p_mask(masked, 0.9)) == {0, 2}
    assert ids_of(top_p_mask(masked, 1.0)) == {0, 1, 2, 3}  # top_p=1 keeps everything


@pytest.mark.parametrize(("scale", "top_p"), [(4.0, 0.9), (0.3, 0.5), (0.05, 0.95), (8.0, 0.3)])
def test_top_p_mask_large_vocab_matches_full_sort(scale: float, top_p: float) -> None:
    # small scale: flat distribution, nucleus of thousands of tokens (full-sort fallback)
    x = (np.random.default_rng(3).standard_normal(50304) * scale).astype(np.float32)
    x[[10, 20, 30]] = x.max()  # ties at the top
    expected = reference_dist(x, top_p=top_p) > 0
    assert ids_of(top_p_mask(x, top_p)) == ids_of(expected)


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_mask_matches_definition(min_p: float) -> None:
    x = (np.random.default_rng(5).standard_normal(1000) * 3).astype(np.float32)
    x[[3, 700]] = x.max()
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    assert ids_of(min_p_mask(x, min_p)) == ids_of(p >= min_p * p.max())
    assert ids_of(min_p_mask(logits_of([0.5, 0.3, 0.04, 0.16]), 0.25)) == {0, 1, 3}


def test_repetition_penalty_matches_definition_and_transformers() -> None:
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(500) * 3).astype(np.float32)
    x[[4, 5]] = [0.0, -0.0]
    previous = np.array([4, 5, 17, 17, 300, 2, 17, 499, 0], dtype=np.int64)
    for penalty in (1.3, 0.7, 1.0):
        got = apply_repetition_penalty(x, previous, penalty)
        expected = x.astype(np.float64).copy()
        for i in set(previous.tolist()):  # each distinct id once, however often it occurred
            expected[i] = x[i] / penalty if x[i] > 0 else x[i] * penalty
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.from_numpy(previous)[None], torch.from_numpy(x.copy())[None]
        )[0].numpy()
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(apply_repetition_penalty(x, None, 1.3), x)
    np.testing.assert_array_equal(apply_repetition_penalty(x, [], 1.3), x)
    with pytest.raises(InvalidArgumentError, match="500"):
        apply_repetition_penalty(x, [1, 500], 1.3)
    with pytest.raises(InvalidArgumentError, match="-2"):
        apply_repetition_penalty(x, [-2], 1.3)
    with pytest.raises(InvalidArgumentError, match="repetition_penalty=0"):
        apply_repetition_penalty(x, [1], 0)


def test_temperature_and_log_softmax() -> None:
    x = np.array([1.0, 2.0, -3.0, 0.5], dtype=np.float32)
    np.testing.assert_allclose(apply_temperature(x, 0.5), x / 0.5)
    with pytest.raises(InvalidArgumentError, match="temperature=0"):
        apply_temperature(x, 0)
    z = x.astype(np.float64)
    expected = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    got = log_softmax(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


# --------------------------------------------------------------------------- sampling


def test_greedy_is_argmax_lowest_id_on_ties() -> None:
    x = np.array([0.1, 3.0, -1.0, 3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0)
    token, logprob = sample_token(x, params, make_rng(0))
    assert token == 1
    assert logprob == pytest.approx(float(log_softmax(x)[1]), abs=1e-6)


def test_top_k_one_equals_greedy() -> None:
    rng = np.random.default_rng(11)
    for trial in range(50):
        x = (rng.standard_normal(2000) * 2).astype(np.float32)
        if trial % 2:
            x[[1500, 40, 900]] = x.max() + 1  # ties at the top
        greedy, _ = sample_token(x, SamplingParams(temperature=0), make_rng(trial))
        for t in (0.3, 1.0, 5.0):
            token, logprob = sample_token(x, SamplingParams(temperature=t, top_k=1), make_rng(trial))
            assert token == greedy and logprob == 0.0


def test_fixed_seed_reproduces() -> None:
    x = (np.random.default_rng(2).standard_normal(50304) * 2).astype(np.float32)
    for params in (
        SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
        SamplingParams(temperature=1.0),
        SamplingParams(top_p=0.9, min_p=0.02),
    ):
        runs = []
        for _ in range(2):
            rng = make_rng(1234)
            runs.append([sample_token(x, params, rng) for _ in range(20)])
        assert runs[0] == runs[1]
        assert len({t for t, _ in runs[0]}) > 1  # it does sample


def test_sample_token_is_pure() -> None:
    x = (np.random.default_rng(4).standard_normal(1000)).astype(np.float32)
    before = x.copy()
    prev = np.array([1, 2, 3])
    for params in (
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.1, repetition_penalty=1.5),
        SamplingParams(temperature=0.7),
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.2),
    ):
        sample_token(x, params, make_rng(0), prev)
        np.testing.assert_array_equal(x, before)


CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
    dict(temperature=2.0, top_k=40, top_p=0.6),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("vocab", [12, 1500])
def test_empirical_distribution_matches(config: dict[str, float], vocab: int) -> None:
    data = np.random.default_rng(vocab)
    x = (data.standard_normal(vocab) * (1.5 if vocab == 12 else 3.0)).astype(np.float32)
    x[vocab // 3] = x[vocab // 2] = x.max()  # a tie at the top, in different 512-blocks
    expected = reference_dist(x, **config)
    params = SamplingParams(**config)  # type: ignore[arg-type]
    rng = make_rng(99)
    draws = 6000
    counts = np.zeros(vocab)
    for _ in range(draws):
        token, logprob = sample_token(x, params, rng)
        assert expected[token] > 0, f"sampled token {token} outside the kept set"
        counts[token] += 1
        assert logprob == pytest.approx(math.log(expected[token]), abs=1e-5)
    # chi-square on bins expected to hold >= 5 draws, the rest lumped into one bin
    big = expected * draws >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big] * draws, expected[~big].sum() * draws)
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = max(1, obs.shape[0] - 1)
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_masked_tokens_are_never_sampled() -> None:
    x = np.full(50304, -np.inf, dtype=np.float32)
    allowed = [5, 700, 50303]
    x[allowed] = [0.0, 1.0, 0.5]
    rng = make_rng(0)
    for params in (
        SamplingParams(),
        SamplingParams(top_p=0.99),
        SamplingParams(min_p=0.01),
        SamplingParams(top_k=10),
        SamplingParams(temperature=0),
    ):
        for _ in range(200):
            assert sample_token(x, params, rng)[0] in allowed


def test_repetition_penalty_in_sample_token() -> None:
    x = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sample_token(x, params, make_rng(0), np.array([0]))[0] == 1
    assert sample_token(x, params, make_rng(0), None)[0] == 0
    token, logprob = sample_token(x, params, make_rng(0), np.array([0, 0, 2]))
    penalised = np.array([2.0 / 1.2, 1.9, -1.2])
    assert token == 1
    assert logprob == pytest.approx(penalised[1] - np.log(np.exp(penalised).sum()), abs=1e-6)


def test_bad_logits_and_ids_are_rejected() -> None:
    params = SamplingParams()
    with pytest.raises(InvalidArgumentError, match="nan"):
        sample_token(np.array([0.0, np.nan], dtype=np.float32), params, make_rng(0))
    with pytest.raises(InvalidArgumentError, match="-inf"):
        sample_token(np.full(4, -np.inf, dtype=np.float32), params, make_rng(0))
    with pytest.raises(InvalidArgumentError, match=r"\(2, 3\)"):
        sample_token(np.zeros((2, 3), dtype=np.float32), params, make_rng(0))
    with pytest.raises(InvalidArgumentError, match="7"):
        sample_token(np.zeros(4, dtype=np.float32), SamplingParams(repetition_penalty=1.1), make_rng(0), np.array([7]))


def test_other_float_dtypes_are_accepted() -> None:
    x = np.array([0.0, 2.0, 1.0])
    assert sample_token(x, SamplingParams(temperature=0), make_rng(0))[0] == 1
    assert sample_token(x.astype(np.float16), SamplingParams(temperature=0), make_rng(0))[0] == 1
