"""Streaming safetensors reader: one tensor at a time, no torch, no pickle.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` checkpoint straight
from disk, so an export holds at most one source tensor (plus its converted copy) in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stlm.dtypes import SAFETENSORS_NAME, numpy_dtype
from stlm.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {code: numpy_dtype(name) for name, code in SAFETENSORS_NAME.items()}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError(f"header size {size} is implausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc})",
            fix="download the checkpoint again; stlm reads safetensors only",
        ) from None
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        entries[name] = _Entry(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
    return entries


class SafetensorsCheckpoint:
    """Lazy access to a checkpoint's tensors by name, with their source dtype and shape."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
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
