"""One numeric validator for every user-given number (CLI flags, API fields, Python arguments).

:func:`check_int` and :func:`check_real` refuse bools, non-numbers, NaN/inf and values outside
their range with an :class:`~stlm.errors.InvalidArgumentError` naming the value, what was
expected and the fix. An int is compared as an int, never converted to float first, so a
401-digit integer (JSON and the CLI allow them) is refused rather than raising ``OverflowError``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from stlm.errors import InvalidArgumentError

__all__ = ["INT64_MAX", "UINT64_MAX", "check_int", "check_real", "is_int", "is_real"]

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
_FLOAT_MAX = int(1.7976931348623157e308)
_SHOWN = 40  # characters of a refused value shown in a message


def is_int(value: object) -> bool:
    """True for an int (numpy's included), False for bools."""
    return isinstance(value, Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_real(value: object) -> bool:
    """True for an int or float (numpy's included), False for bools."""
    return is_int(value) or (
        isinstance(value, Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    )


def _shown(value: object) -> str:
    if is_int(value):
        digits = str(int(value))  # type: ignore[call-overload]
        return digits if len(digits) <= _SHOWN else f"{digits[:12]}…({len(digits)} digits)"
    return f"{value!r:.{_SHOWN}}"


def check_int(name: str, value: object, low: int, high: int, *, expected: str, fix: str) -> int:
    """``value`` as an int in ``[low, high]``, else an InvalidArgumentError ``name=value is invalid``."""
    if is_int(value):
        x = int(value)  # type: ignore[call-overload]
        if low <= x <= high:
            return x
    raise InvalidArgumentError(f"{name}={_shown(value)} is invalid: expected {expected}", fix=fix)


def check_real(
    name: str, value: object, low: float, high: float, *, expected: str, fix: str, low_open: bool = False
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``low`` excluded when ``low_open``), else an
    InvalidArgumentError; ints of any size are compared exactly before conversion."""
    if is_real(value):
        if is_int(value):
            n = int(value)  # type: ignore[call-overload]
            if low <= n <= high and not (low_open and n == low) and abs(n) <= _FLOAT_MAX:
                return float(n)
        else:
            x = float(value)  # type: ignore[arg-type]
            if math.isfinite(x) and low <= x <= high and not (low_open and x == low):
                return x
    raise InvalidArgumentError(f"{name}={_shown(value)} is invalid: expected {expected}", fix=fix)
