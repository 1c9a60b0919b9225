"""How close a package must be to its reference, per accuracy class: the one tolerance table.

A package's accuracy class is its quantization when it has one (int8/int4), else its dtype.
``stlm verify``, the parity tests and the benchmarks all read :data:`TOLERANCES`; nothing else
defines a tolerance. Logits are compared relative to their scale: the largest allowed difference
is ``atol + rtol * max|reference logits|``, because logits of trained models are tens of units
while a random tiny model's are below one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from stlm.errors import InvalidArgumentError

# Tightest first: comparing two packages uses the looser of their classes.
ACCURACY_CLASSES: Final = ("fp32", "fp16", "bf16", "int8", "int4")


@dataclass(frozen=True)
class Tolerance:
    """Limits for one accuracy class (see the module docstring for the logits bound)."""

    logits_atol: float
    logits_rtol: float
    min_top1: float  # teacher-forced steps whose top-1 token agrees with the reference's, fraction
    min_greedy: float  # greedy tokens that agree before the first divergence, mean fraction over prompts
    basis: str

    def logits_limit(self, scale: float) -> float:
        """Largest allowed max-abs logits difference for reference logits of magnitude ``scale``."""
        return self.logits_atol + self.logits_rtol * scale

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class ToleranceTable:
    """One :class:`Tolerance` per accuracy class."""

    fp32: Tolerance
    fp16: Tolerance
    bf16: Tolerance
    int8: Tolerance
    int4: Tolerance

    def __getitem__(self, accuracy_class: str) -> Tolerance:
        if accuracy_class not in ACCURACY_CLASSES:
            raise InvalidArgumentError(
                f"unknown accuracy class {accuracy_class!r}; expected one of {', '.join(ACCURACY_CLASSES)}",
                fix="use a package exported by stlm",
            )
        return getattr(self, accuracy_class)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {f.name: getattr(self, f.name).to_dict() for f in fields(self)}


TOLERANCES: Final = ToleranceTable(
    fp32=Tolerance(1e-3, 1e-3, 1.0, 1.0, "same weights and math as transformers in fp32: only summation order differs"),
    fp16=Tolerance(
        1e-3,
        0.02,
        0.9,
        0.5,
        "fp16 weights (11-bit mantissa, relative rounding 5e-4) and KV cache; computed in fp32 on CPU",
    ),
    bf16=Tolerance(
        1e-3,
        0.06,
        0.75,
        0.25,
        "bf16 weights (8-bit mantissa, relative rounding 4e-3) and KV cache; computed in fp32 on CPU",
    ),
    int8=Tolerance(
        1e-3,
        0.06,
        0.75,
        0.25,
        "weight-only int8 with int8 activations (MatMulNBits accuracy level 4). Checked on the trained tiny "
        "StableLM (docs/quality.md): over 8 prompts every int8 option measured max|Δlogits| ≤ 0.018·scale, "
        "top-1 ≥ 0.98, greedy ≥ 0.87, within these limits (kept no tighter than bf16's, the class order)",
    ),
    int4=Tolerance(
        1e-3,
        0.3,
        0.75,
        0.25,
        "weight-only int4 (LM head at 8 bits unless head=4), set from the trained tiny StableLM "
        "(docs/quality.md): over 8 prompts the default int4 measured max|Δlogits| 0.023·scale, top-1 0.98, "
        "greedy 0.88, and the worst int4 option (head=4) 0.16·scale, 0.94, 0.56; limits ~2× / below the worst",
    ),
)


def looser(a: str, b: str) -> str:
    """The looser of two accuracy classes."""
    return max(a, b, key=ACCURACY_CLASSES.index)
