"""Sampling is NaN/inf-proof for every parameter value validation accepts (fuzzed with hypothesis).

The server answers whatever `SamplingParams` accepts, so extreme but valid values (temperature
1e-310, repetition_penalty 1e-300 or 1e300, min_p 1e-300) must still give a token of the
vocabulary and a finite log-probability, never NaN, an exception or an endless loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stlm.runtime.sampling import SamplingParams, make_rng, sample_token

F32_MAX = float(np.finfo(np.float32).max)
EXTREME_TEMPERATURES = [0.0, 5e-324, 1e-310, 1e-45, 1e-38, 1e-30, 1e-8, 0.7, 1.0, 1e8, 1e30, 1e300, 1.7e308]
EXTREME_PENALTIES = [5e-324, 1e-300, 1e-40, 1e-10, 0.5, 1.0, 1.3, 1e10, 1e40, 1e300, 1.7e308]
LOGIT_VALUES = [0.0, -0.0, 1e-45, -1e-45, 1e-38, 1.0, -1.0, 30.0, -30.0, 1e30, -1e30, F32_MAX, -F32_MAX]


def logits() -> st.SearchStrategy[np.ndarray]:
    def build(values: list[float], seed: int, n: int, scale: float) -> np.ndarray:
        x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
        positions = np.random.default_rng(seed + 1).integers(0, n, len(values))
        x[positions] = np.array(values, dtype=np.float32)
        return x

    return st.builds(
        build,
        st.lists(st.sampled_from(LOGIT_VALUES), max_size=6),
        st.integers(0, 2**16),
        st.sampled_from([1, 2, 7, 100, 3000]),
        st.sampled_from([0.0, 1e-30, 1.0, 10.0, 1e30]),
    )


def params() -> st.SearchStrategy[SamplingParams]:
    return st.builds(
        SamplingParams,
        max_new_tokens=st.just(4),
        temperature=st.sampled_from(EXTREME_TEMPERATURES) | st.floats(0, 1e308),
        top_k=st.sampled_from([0, 1, 2, 50, 10**30]),
        top_p=st.sampled_from([5e-324, 1e-300, 0.1, 0.9, 1.0]) | st.floats(1e-300, 1.0, exclude_min=False),
        min_p=st.sampled_from([0.0, 5e-324, 1e-300, 0.05, 0.5, 1.0]),
        repetition_penalty=st.sampled_from(EXTREME_PENALTIES),
        seed=st.integers(0, 2**70),
        logprobs=st.booleans(),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=logits(), p=params(), previous=st.lists(st.integers(0, 10**6), max_size=20), with_previous=st.booleans())
def test_every_valid_parameter_samples_a_token_with_a_finite_logprob(
    x: np.ndarray, p: SamplingParams, previous: list[int], with_previous: bool
) -> None:
    ids = np.array([i % x.shape[0] for i in previous], dtype=np.int64) if with_previous else None
    token, logprob = sample_token(x, p, make_rng(p.seed), ids)
    assert 0 <= token < x.shape[0]
    assert math.isfinite(logprob) and logprob <= 1e-9, (token, logprob)


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-45, 1e-39])
@pytest.mark.parametrize("extra", [{"min_p": 0.1}, {"top_p": 0.9}, {"top_k": 5}, {}, {"min_p": 1.0, "top_k": 3}])
def test_tiny_temperatures_pick_the_top_logit(temperature: float, extra: dict[str, float]) -> None:
    x = (np.random.default_rng(1).standard_normal(50304) * 3).astype(np.float32)
    p = SamplingParams(temperature=temperature, logprobs=True, **extra)  # type: ignore[arg-type]
    token, logprob = sample_token(x, p, make_rng(0))
    assert token == int(np.argmax(x)) and logprob == 0.0


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e300, 1.7e308])
def test_extreme_repetition_penalties(penalty: float) -> None:
    x = np.array([2.0, -1.0, 0.0, 1.5, -3.0], dtype=np.float32)
    for temperature in (0.0, 1.0, 1e-310):
        token, logprob = sample_token(
            x, SamplingParams(temperature=temperature, repetition_penalty=penalty), make_rng(0), np.arange(5)
        )
        assert 0 <= token < 5 and math.isfinite(logprob)
        if penalty < 1:  # dividing the positive logits by a tiny penalty makes them (equally) huge
            assert token in (0, 3)
