"""Streaming safetensors reader: one tensor at a time, no torch, no pickle.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` checkpoint straight
from disk, so an export holds at most one source tensor (plus its converted copy) in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import numpy as np

from stlm.errors import CheckpointError
from stlm.package.config import read_json
from stlm.package.dtypes import SAFETENSORS_NAME, numpy_dtype

_DTYPES: dict[str, np.dtype] = {code: numpy_dtype(name) for name, code in SAFETENSORS_NAME.items()}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


_MAX_HEADER: Final = 100_000_000
_FIX_CORRUPT: Final = "the file is corrupt or truncated: download it again"


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file: {problem}", fix=_FIX_CORRUPT)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, info: Any, base: int, data_bytes: int) -> _Entry:
    """One header record, checked: dtype, shape and offsets inside the file, size = shape × itemsize."""
    if not isinstance(info, dict):
        raise _bad(path, f"the record of {name!r} is {type(info).__name__}, expected an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise _bad(path, f"tensor {name!r} has dtype {dtype!r}, expected a string such as 'BF16'")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape) or len(shape) > 8:
        raise _bad(path, f"tensor {name!r} has shape {str(shape)[:80]}, expected a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has data_offsets {str(offsets)[:80]}, expected [start, end]")
    start, end = offsets
    if not 0 <= start <= end <= data_bytes:
        raise _bad(path, f"tensor {name!r} spans bytes {start}..{end} of a {data_bytes}-byte data section")
    if dtype in _DTYPES and math.prod(shape) * _DTYPES[dtype].itemsize != end - start:
        raise _bad(path, f"tensor {name!r} of shape {shape} ({dtype}) does not fill its {end - start} bytes")
    return _Entry(path, dtype, tuple(shape), base + start, base + end)


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > min(_MAX_HEADER, file_size - 8):
                raise ValueError(f"header size {size} is implausible for a {file_size}-byte file")
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, ValueError, RecursionError, struct.error) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]})",
            fix="download the checkpoint again; stlm reads safetensors only",
        ) from None
    if not isinstance(header, dict):
        raise _bad(path, f"its header is {type(header).__name__}, expected an object")
    base = 8 + size
    return {
        str(name): _entry(path, str(name), info, base, file_size - base)
        for name, info in header.items()
        if name != "__metadata__"
    }


def _shard_files(folder: Path, index: Path) -> list[Path]:
    """The shard files ``model.safetensors.index.json`` names, each a plain name inside ``folder``."""
    try:
        data = read_json(index)
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index} is not readable JSON ({str(exc)[:200]})", fix=_FIX_CORRUPT) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map object of tensor name → shard file name", fix=_FIX_CORRUPT)
    for name in set(weight_map.values()):
        inner = PurePosixPath(name)
        if inner.is_absolute() or len(inner.parts) != 1 or name in ("", ".", "..") or "\\" in name:
            raise CheckpointError(
                f"{index} names the shard {name!r}, which is not a file name inside {folder}",
                fix="a checkpoint's index may name only files in its own folder: restore the index",
            )
    return sorted({folder / f for f in weight_map.values()})


class SafetensorsCheckpoint:
    """Lazy access to a checkpoint's tensors by name, with their source dtype and shape."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        files = _shard_files(folder, index) if index.is_file() else sorted(folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            found = f" (found {', '.join(pickled)}: pickled weights, which stlm never loads)" if pickled else ""
            raise CheckpointError(
                f"no *.safetensors weights in {folder}{found}",
                fix="download the checkpoint's safetensors files, or convert it with "
                "transformers' save_pretrained(safe_serialization=True)",
            )
        self.entries: dict[str, _Entry] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{file.name}, named in model.safetensors.index.json, is missing from {folder}",
                    fix="download every shard of the checkpoint",
                )
            self.entries.update(_read_header(file))

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name``."""
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of tensor ``name`` (e.g. 'BF16')."""
        return self._entry(name).dtype

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(
                f"the checkpoint has no tensor {name!r}",
                fix="check that the checkpoint is a complete StableLM checkpoint (all shards present)",
            ) from None

    def read(self, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
        """Read tensor ``name`` from disk, converted to ``dtype`` (float32 by default)."""
        e = self._entry(name)
        if e.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {e.dtype}", fix="use a float checkpoint")
        src = _DTYPES[e.dtype]
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.end - e.start != count * src.itemsize:
            raise CheckpointError(
                f"tensor {name!r} in {e.file.name} has {e.end - e.start} bytes, expected {count * src.itemsize}",
                fix="the file is corrupt or truncated: download it again",
            )
        buf = np.empty(count, dtype=src)
        with e.file.open("rb") as f:
            f.seek(e.start)
            got = f.readinto(buf.view(np.uint8).data)
        if got != e.end - e.start:
            raise CheckpointError(
                f"{e.file.name} ends early while reading {name!r}",
                fix="the file is truncated: download it again",
            )
        arr = buf.reshape(e.shape)
        target = np.dtype(dtype or np.float32)
        return arr if arr.dtype == target else arr.astype(target)

    def names(self) -> Iterator[str]:
        """All tensor names."""
        return iter(self.entries)
