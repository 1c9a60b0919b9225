"""Polygraphy's RunResults JSON, written and read with plain json + base64 npy (no polygraphy).

The format is polygraphy's own (``polygraphy run --save-outputs``, ``RunResults.save``), so
``polygraphy inspect data FILE`` and ``polygraphy run ... --load-outputs FILE`` read these files::

    {"lst": [[runner_name, [iteration, ...]], ...], "polygraphy_class": "RunResults"}
    iteration = {"outputs": {name: lazy_array, ...}, "runtime": float | null,
                 "runner_name": runner_name, "polygraphy_class": "IterationResult"}
    lazy_array = {"values": array, "polygraphy_class": "LazyNumpyArray"}
    array = {"array": base64(numpy .npy bytes, allow_pickle=False), "polygraphy_class": "ndarray"}

``LazyNumpyArray`` is the marker of polygraphy ≤ 0.47; newer versions renamed the class
``LazyArray`` and still decode the old name, so writing it suits both (both are read here).
Polygraphy ignores keys it does not know next to ``lst``: stlm keeps its own metadata there.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from stlm.errors import InvalidArgumentError

TYPE_MARKER: Final = "polygraphy_class"
LAZY_ARRAY_MARKERS: Final = ("LazyNumpyArray", "LazyArray")

Iteration = Mapping[str, np.ndarray]


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """One numpy array in polygraphy's ``ndarray`` JSON form."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode("ascii"), TYPE_MARKER: "ndarray"}


def decode_array(data: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    raw = base64.b64decode(str(data["array"]).encode("ascii"), validate=True)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def run_results(
    runners: Sequence[tuple[str, Sequence[Iteration]]], *, runtimes: Sequence[float | None] | None = None
) -> dict[str, Any]:
    """The RunResults JSON object of ``runners``: (runner name, one output dict per iteration)."""
    lst = []
    for name, iterations in runners:
        encoded = []
        for k, outputs in enumerate(iterations):
            encoded.append(
                {
                    "outputs": {
                        key: {"values": encode_array(value), TYPE_MARKER: LAZY_ARRAY_MARKERS[0]}
                        for key, value in outputs.items()
                    },
                    "runtime": None if runtimes is None else runtimes[k],
                    "runner_name": name,
                    TYPE_MARKER: "IterationResult",
                }
            )
        lst.append([name, encoded])
    return {"lst": lst, TYPE_MARKER: "RunResults"}


def write_run_results(
    path: Path, runners: Sequence[tuple[str, Sequence[Iteration]]], *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write RunResults JSON to ``path`` (with stlm's ``extra`` keys beside ``lst``); return ``path``."""
    data = run_results(runners)
    data.update(extra or {})
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def read_run_results(path: Path) -> tuple[list[tuple[str, list[dict[str, np.ndarray]]]], dict[str, Any]]:
    """Read RunResults JSON: the runners' per-iteration outputs, and the other top-level keys."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get(TYPE_MARKER) != "RunResults":
            raise ValueError(f"{TYPE_MARKER} is {data.get(TYPE_MARKER)!r}, expected 'RunResults'")
        runners = []
        for name, iterations in data["lst"]:
            runners.append(
                (str(name), [{key: _decode_output(value) for key, value in it["outputs"].items()} for it in iterations])
            )
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise InvalidArgumentError(
            f"{path} is not a polygraphy RunResults JSON file ({type(exc).__name__}: {str(exc)[:200]})",
            fix="pass the file written by `stlm verify CHECKPOINT PACKAGE --save-reference FILE`",
        ) from None
    return runners, {k: v for k, v in data.items() if k not in ("lst", TYPE_MARKER)}


def _decode_output(value: Mapping[str, Any]) -> np.ndarray:
    if value.get(TYPE_MARKER) in LAZY_ARRAY_MARKERS:
        value = value["values"]
    if value.get(TYPE_MARKER) != "ndarray":
        raise ValueError(f"an output is encoded as {value.get(TYPE_MARKER)!r}, expected an ndarray")
    return decode_array(value)
