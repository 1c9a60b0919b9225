"""stlm.support.numbers: the one numeric validator (issue #27 item 3, issue #20)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stlm.errors import InvalidArgumentError
from stlm.support.numbers import check_int, check_real


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, "1", None, 10**400, -(10**400), -1, 11])
def test_check_int_refuses(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^n=.* is invalid: expected 0\.\.10"):
        check_int("n", value, 0, 10, expected="0..10", fix="pass 5")


@pytest.mark.parametrize("value", [True, math.nan, math.inf, -math.inf, 10**400, "0.5", 0, np.float32("nan")])
def test_check_real_refuses(value: object) -> None:
    with pytest.raises(InvalidArgumentError):
        check_real("p", value, 0, 1, expected="(0, 1]", fix="pass 0.5", low_open=True)


def test_numpy_and_exact_values_pass() -> None:
    assert check_int("n", np.int64(7), 0, 10, expected="", fix="") == 7
    assert check_real("p", np.float32(0.5), 0, 1, expected="", fix="") == 0.5
    assert check_real("t", 10**300, 0, math.inf, expected="", fix="") == 1e300


@given(st.integers(min_value=-(10**500), max_value=10**500))
def test_any_int_is_an_answer_or_our_error(value: int) -> None:
    try:
        assert 0 <= check_real("t", value, 0, math.inf, expected="", fix="") < math.inf
    except InvalidArgumentError:
        assert value < 0 or value > 1e308
