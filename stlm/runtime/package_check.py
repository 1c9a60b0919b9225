"""A package checked against itself when it is opened: the graph's inputs and outputs (names, dtypes,
ranks, fixed sizes: vocabulary, layers, KV heads, head dim) against the manifest's I/O contract, and
the tokenizer's ids against the vocabulary. A package carrying another model's ``model.onnx`` or
``tokenizer.json`` is a :class:`~stlm.errors.PackageError` at load, not a traceback at the first step.

Cheap: the graph side reads the metadata ONNX Runtime already has (``session.get_inputs()``), the
tokenizer side one pass over its vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from stlm.contract import TensorSpec
from stlm.errors import PackageError
from stlm.manifest import EXPORT_AGAIN, Manifest
from stlm.runtime.tokenizer import Tokenizer

#: ONNX Runtime's type strings of the contract's numpy dtype names.
ORT_TYPES: Final = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
}
_FIX: Final = "the package's files do not belong together (a graph or tokenizer of another model?): " + EXPORT_AGAIN


def _mismatch(spec: TensorSpec, shape: Sequence[Any], kind: str) -> str | None:
    """What is wrong with the graph's ``shape`` of ``spec`` (None: it matches)."""
    if len(shape) != len(spec.axes):
        return (
            f"{kind} {spec.name!r} has {len(shape)} axes {list(shape)}, the manifest {len(spec.axes)} {list(spec.axes)}"
        )
    for i, (want, got) in enumerate(zip(spec.axes, shape, strict=True)):
        fixed_got = isinstance(got, int) and got >= 0
        if isinstance(want, int) and fixed_got and got != want:
            return f"{kind} {spec.name!r} has size {got} on axis {i}, the manifest {want} ({list(spec.axes)})"
        if isinstance(want, str) and fixed_got:
            return f"{kind} {spec.name!r} has a fixed size {got} on axis {i}, where the manifest has {want!r}"
    return None


def check_graph_io(path: Path, manifest: Manifest, inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
    """:class:`PackageError` unless the graph's ``inputs``/``outputs`` (ONNX Runtime ``NodeArg`` s:
    ``name``, ``type``, ``shape``) are exactly the manifest's contract."""
    for kind, specs, args in (
        ("input", manifest.contract.inputs, inputs),
        ("output", manifest.contract.outputs, outputs),
    ):
        found = {a.name: a for a in args}
        extra = sorted(set(found) - {s.name for s in specs})
        if extra:
            raise PackageError(f"{path} has {kind}s its manifest does not declare: {extra[:4]}", fix=_FIX)
        for spec in specs:
            arg = found.get(spec.name)
            if arg is None:
                raise PackageError(f"{path} lacks the {kind} {spec.name!r} its manifest declares", fix=_FIX)
            want = ORT_TYPES.get(spec.dtype, spec.dtype)
            if arg.type != want:
                raise PackageError(
                    f"{path}: {kind} {spec.name!r} is {arg.type}, the manifest says {spec.dtype}", fix=_FIX
                )
            problem = _mismatch(spec, list(arg.shape or []), kind)
            if problem is not None:
                raise PackageError(f"{path}: {problem}", fix=_FIX)


def check_tokenizer(path: Path, tokenizer: Tokenizer, vocab_size: int) -> None:
    """:class:`PackageError` when the tokenizer at ``path`` has an id the model's ``vocab_size`` lacks."""
    largest = max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= vocab_size:
        raise PackageError(
            f"{path} has token id {largest}, beyond the model's vocabulary of {vocab_size} tokens "
            f"(ids 0..{vocab_size - 1})",
            fix=_FIX,
        )
