"""TensorRT optimization profiles for the decoder, derived from the I/O contract as data.

Design: **two profiles**, one tuned for each phase of generation (S = max_seq_len, C = the
prefill chunk, ``min(S, 1024)`` by default):

* ``decode`` (profile 0): ``sequence`` exactly 1; ``past_sequence`` 0..S-1; ``total_sequence``
  1..S; ``num_logits`` 1. Tuned at (opt_batch, 1 token, opt_seq_len-1 cached).
* ``prefill`` (profile 1): ``sequence`` 1..C; ``past_sequence`` 0..S-C; ``total_sequence`` 1..S;
  ``num_logits`` 1..C (1 for generation, every position for perplexity and prompt log-probabilities).
  Tuned at (opt_batch, min(opt_seq_len, C) tokens, empty cache, 1 logit row). Prompts longer than C
  run in chunks of C (chunked prefill), which also bounds the activations and the
  (batch, C, vocab) logits buffer.

Why two and not one profile covering both phases:

1. TensorRT checks each of the profile's kMIN, kOPT and kMAX shape sets against the graph's
   shape constraints, and the graph ties ``total_sequence`` (the attention mask) to
   ``past_sequence + sequence`` (the concatenated KV cache): every set must satisfy
   ``total = past + sequence``. A single profile "sequence 1..S, past 0..S-1, total 1..S" fails
   that check at kMAX (S + S-1 != S); a valid single profile must allow ``total`` up to 2S-1,
   which sizes the attention activations for S x (2S-1) scores.
2. TensorRT picks kernels at the kOPT shape. Decode steps (one token, long past) are the
   hot loop and want different GEMM/attention tactics than a long prefill; one kOPT point
   serves one of them badly.

The runtime (:func:`select_profile`) uses ``decode`` for one-token steps and ``prefill`` for
multi-token steps whose cache fits its ``past`` range (longer caches run token by token on
``decode``). One execution context serves both profiles; it switches only when the phase changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from stlm.errors import InvalidArgumentError, PackageError
from stlm.package.contract import BATCH, NUM_LOGITS, PAST, SEQUENCE, TOTAL, Contract

AxisRange = tuple[int, int, int]
Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]

DECODE: Final = "decode"
PREFILL: Final = "prefill"
DEFAULT_MAX_BATCH: Final = 4
DEFAULT_OPT_SEQ_LEN: Final = 512
DEFAULT_PREFILL_CHUNK: Final = 1024
AXES: Final = (BATCH, SEQUENCE, PAST, TOTAL, NUM_LOGITS)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a (min, opt, max) range for each symbolic axis of the contract."""

    name: str
    axes: Mapping[str, AxisRange]

    def contains(self, *, batch: int, sequence: int, past: int, num_logits: int = 1) -> bool:
        """Whether a step of these sizes fits this profile (``total`` = ``past + sequence``)."""
        sizes = {BATCH: batch, SEQUENCE: sequence, PAST: past, TOTAL: past + sequence, NUM_LOGITS: num_logits}
        return all(lo <= sizes[axis] <= hi for axis, (lo, _, hi) in self.axes.items())

    def to_dict(self) -> dict[str, Any]:
        """JSON form (recorded in the engine manifest's ``extra``)."""
        return {"name": self.name, "axes": {axis: list(r) for axis, r in self.axes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Inverse of :meth:`to_dict`."""
        try:
            axes = {str(axis): (int(r[0]), int(r[1]), int(r[2])) for axis, r in data["axes"].items()}
            return cls(str(data["name"]), axes)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PackageError(
                f"invalid optimization profile record {dict(data)!r} ({exc})",
                fix="rebuild the engine with `stlm build-engine`",
            ) from None


def _positive_int(value: object, flag: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{flag} must be an integer, got {value!r}", fix=f"pass {flag} N with N ≥ {minimum}")
    if value < minimum:
        raise InvalidArgumentError(
            f"{flag} {value} is too small; expected at least {minimum}", fix=f"pass {flag} N with N ≥ {minimum}"
        )
    return value


@dataclass(frozen=True)
class BuildSizes:
    """The sizes an engine is built for (validated, defaults filled in)."""

    max_batch: int
    max_seq_len: int
    opt_batch: int
    opt_seq_len: int
    prefill_chunk: int


def resolve_sizes(
    *,
    max_batch: int,
    max_seq_len: int | None,
    context_length: int,
    opt_batch: int | None = None,
    opt_seq_len: int | None = None,
    prefill_chunk: int | None = None,
) -> BuildSizes:
    """Validate the build sizes and fill defaults. ``max_seq_len``
    (prompt + generated tokens) defaults to ``context_length`` and may not exceed it;
    ``opt_batch`` defaults to 1, ``opt_seq_len`` to ``min(512, max_seq_len)`` and
    ``prefill_chunk`` to ``min(1024, max_seq_len)``. Raises :class:`InvalidArgumentError`
    naming the bad value.
    """
    max_batch = _positive_int(max_batch, "--max-batch")
    context_length = _positive_int(context_length, "context length", minimum=2)
    max_seq_len = context_length if max_seq_len is None else _positive_int(max_seq_len, "--max-seq-len", minimum=2)
    if max_seq_len > context_length:
        raise InvalidArgumentError(
            f"--max-seq-len {max_seq_len} exceeds the model's context length of {context_length} tokens",
            fix=f"pass --max-seq-len ≤ {context_length}",
        )
    opt_batch = 1 if opt_batch is None else _positive_int(opt_batch, "--opt-batch")
    if opt_batch > max_batch:
        raise InvalidArgumentError(
            f"--opt-batch {opt_batch} is larger than --max-batch {max_batch}",
            fix=f"pass --opt-batch between 1 and {max_batch}",
        )
    opt_seq_len = (
        min(DEFAULT_OPT_SEQ_LEN, max_seq_len) if opt_seq_len is None else _positive_int(opt_seq_len, "--opt-seq-len")
    )
    if opt_seq_len > max_seq_len:
        raise InvalidArgumentError(
            f"--opt-seq-len {opt_seq_len} is larger than --max-seq-len {max_seq_len}",
            fix=f"pass --opt-seq-len between 1 and {max_seq_len}",
        )
    chunk = (
        min(DEFAULT_PREFILL_CHUNK, max_seq_len)
        if prefill_chunk is None
        else _positive_int(prefill_chunk, "--prefill-chunk", minimum=2)
    )
    if chunk > max_seq_len:
        raise InvalidArgumentError(
            f"--prefill-chunk {chunk} is larger than --max-seq-len {max_seq_len}",
            fix=f"pass --prefill-chunk between 2 and {max_seq_len}",
        )
    return BuildSizes(max_batch, max_seq_len, opt_batch, opt_seq_len, chunk)


def engine_profiles(
    *,
    max_batch: int,
    max_seq_len: int | None,
    context_length: int,
    opt_batch: int | None = None,
    opt_seq_len: int | None = None,
    prefill_chunk: int | None = None,
) -> tuple[Profile, Profile]:
    """The ``(decode, prefill)`` profiles for these sizes (see the module docstring)."""
    sizes = resolve_sizes(
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        context_length=context_length,
        opt_batch=opt_batch,
        opt_seq_len=opt_seq_len,
        prefill_chunk=prefill_chunk,
    )
    longest, tuned, chunk = sizes.max_seq_len, sizes.opt_seq_len, sizes.prefill_chunk
    batch = (1, sizes.opt_batch, sizes.max_batch)
    tuned_chunk = min(tuned, chunk)
    decode = Profile(
        DECODE,
        {
            BATCH: batch,
            SEQUENCE: (1, 1, 1),
            PAST: (0, tuned - 1, longest - 1),
            TOTAL: (1, tuned, longest),
            NUM_LOGITS: (1, 1, 1),
        },
    )
    prefill = Profile(
        PREFILL,
        {
            BATCH: batch,
            SEQUENCE: (1, tuned_chunk, chunk),
            PAST: (0, 0, longest - chunk),
            TOTAL: (1, tuned_chunk, longest),
            NUM_LOGITS: (1, 1, chunk),
        },
    )
    for p in (decode, prefill):
        for k in range(3):
            assert p.axes[TOTAL][k] == p.axes[PAST][k] + p.axes[SEQUENCE][k], p
    return decode, prefill


def profile_shapes(contract: Contract, profile: Profile) -> dict[str, ShapeRange]:
    """``{input name: (min shape, opt shape, max shape)}`` for every input of ``contract``."""
    shapes: dict[str, ShapeRange] = {}
    for spec in contract.inputs:
        dims: list[AxisRange] = []
        for axis in spec.axes:
            if isinstance(axis, int):
                dims.append((axis, axis, axis))
            elif axis in profile.axes:
                dims.append(profile.axes[axis])
            else:
                raise PackageError(
                    f"input {spec.name!r} has the symbolic axis {axis!r}, which no profile covers "
                    f"(known: {', '.join(AXES)})",
                    fix="export the package again with this version of stlm",
                )
        shapes[spec.name] = tuple(tuple(d[k] for d in dims) for k in range(3))  # type: ignore[assignment]
    return shapes


def select_profile(
    profiles: Sequence[Profile], *, batch: int, sequence: int, past: int, num_logits: int = 1
) -> int | None:
    """Index of the profile to run a step on (decode for one token, prefill for a prompt), or None."""
    order = sorted(range(len(profiles)), key=lambda i: profiles[i].name != (DECODE if sequence == 1 else PREFILL))
    fits = (i for i in order if profiles[i].contains(batch=batch, sequence=sequence, past=past, num_logits=num_logits))
    return next(fits, None)
