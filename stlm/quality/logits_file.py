"""The base-logits file of ``stlm perplexity --save-logits`` / ``--kl-divergence``: a numpy ``.npz``.

No pickle: every member is a plain numeric array and the file is read with ``allow_pickle=False``.
Members (``n`` scored positions, ``k`` kept log-probabilities per position):

* ``meta``: UTF-8 JSON as uint8 — ``format`` (``stlm-logits``), ``version``, ``ctx``, ``vocab``,
  ``top_k`` (0: every log-probability is stored), ``chunks``, ``source`` (what produced the logits);
* ``tokens`` (chunks·ctx,) int32: the evaluated tokens, chunk after chunk;
* ``nll`` (n,) float64: the base's NLL of each scored token; ``top1`` (n,) int32: its top token;
  ``lse`` (n,) float64: the log-sum-exp of its logits;
* ``logprobs`` (n, k) float32: log-probabilities (logit − lse), largest first when ``top_k`` > 0,
  and ``ids`` (n, k) int32: their token ids (absent when ``top_k`` is 0: column = token id).

The file is written under a temporary name and renamed when complete; an existing file is replaced
only if it is itself an stlm logits file.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.quality.stats import BaseRows
from stlm.support.staging import staged_file

FORMAT: Final = "stlm-logits"
VERSION: Final = 1


@dataclass(frozen=True)
class BaseLogits:
    """A base model's scored positions (see the module docstring for the fields)."""

    ctx: int
    vocab: int
    top_k: int
    source: str
    tokens: np.ndarray
    nll: np.ndarray
    top1: np.ndarray
    lse: np.ndarray
    rows: BaseRows

    @property
    def chunks(self) -> int:
        """Chunks of ``ctx`` tokens evaluated."""
        return int(self.tokens.size // self.ctx)

    def rows_of(self, start: int, stop: int) -> BaseRows:
        """The kept log-probabilities of positions ``start:stop``."""
        ids = None if self.rows.ids is None else self.rows.ids[start:stop]
        return BaseRows(self.rows.logprobs[start:stop], ids)


def _meta(logits: BaseLogits) -> np.ndarray:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "ctx": logits.ctx,
        "vocab": logits.vocab,
        "top_k": logits.top_k,
        "chunks": logits.chunks,
        "source": logits.source,
    }
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def _is_logits_file(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            return bool(json.loads(bytes(data["meta"]).decode("utf-8")).get("format") == FORMAT)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, AttributeError, RecursionError):
        return False


def check_writable(path: Path) -> None:
    """Raise unless ``path`` can take a logits file: a new file in an existing folder, or an stlm logits file."""
    if path.is_dir():
        raise InvalidArgumentError(f"{path} is a folder", fix="pass a file name for --save-logits, e.g. base.npz")
    if not path.parent.is_dir():
        raise InvalidArgumentError(
            f"the folder of {path} does not exist", fix="create the folder first, or pass another --save-logits path"
        )
    if path.exists() and not _is_logits_file(path):
        raise InvalidArgumentError(
            f"{path} exists and is not an stlm logits file; it will not be replaced",
            fix="pass a new file name for --save-logits (or delete the file yourself)",
        )


def save_base_logits(path: Path, logits: BaseLogits) -> Path:
    """Write ``logits`` to ``path`` atomically (see :func:`check_writable`) and return ``path``."""
    path = Path(path)
    check_writable(path)
    arrays: dict[str, Any] = {
        "meta": _meta(logits),
        "tokens": logits.tokens.astype(np.int32),
        "nll": logits.nll.astype(np.float64),
        "top1": logits.top1.astype(np.int32),
        "lse": logits.lse.astype(np.float64),
        "logprobs": logits.rows.logprobs.astype(np.float32),
    }
    if logits.rows.ids is not None:
        arrays["ids"] = logits.rows.ids.astype(np.int32)
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def _bad(path: Path, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{path} is not a usable stlm logits file ({why})",
        fix="pass a file written by `stlm perplexity PACKAGE TEXT --save-logits FILE`",
    )


def load_base_logits(path: Path) -> BaseLogits:
    """Read a file written by :func:`save_base_logits`, checking its shapes."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(
            f"logits file {str(path)!r} does not exist",
            fix="save one first: `stlm perplexity FP32_PACKAGE TEXT --save-logits FILE`",
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, RecursionError) as exc:
        raise _bad(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, "no stlm-logits record")
    if int(meta.get("version", 0)) > VERSION:
        raise _bad(path, f"version {meta.get('version')} is newer than this stlm reads")
    try:
        logits = BaseLogits(
            ctx=int(meta["ctx"]),
            vocab=int(meta["vocab"]),
            top_k=int(meta["top_k"]),
            source=str(meta.get("source", "")),
            tokens=arrays["tokens"].astype(np.int64),
            nll=arrays["nll"].astype(np.float64),
            top1=arrays["top1"].astype(np.int64),
            lse=arrays["lse"].astype(np.float64),
            rows=BaseRows(arrays["logprobs"], arrays.get("ids")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise _bad(path, f"missing or malformed {exc}") from None
    _check_shapes(path, logits)
    return logits


def _check_shapes(path: Path, b: BaseLogits) -> None:
    n = b.chunks * (b.ctx - 1 - b.ctx // 2)
    width = b.vocab if b.top_k == 0 else b.top_k
    ok = (
        b.ctx >= 4
        and b.tokens.ndim == 1
        and b.tokens.size % b.ctx == 0
        and all(a.shape == (n,) for a in (b.nll, b.top1, b.lse))
        and b.rows.logprobs.shape == (n, width)
        and (b.rows.ids is None) == (b.top_k == 0)
        and (b.rows.ids is None or b.rows.ids.shape == (n, width))
    )
    if not ok:
        raise _bad(path, "its arrays do not match its ctx, top_k and chunks")
