"""ONNX Runtime backend for both graph variants of the manifest.

``concat``: past KV arrays go in, presents come out and become the next past (left-padded rows,
attention mask and position ids). ``inplace``: one preallocated buffer per KV tensor, bound with
IOBinding as both past and present, which GroupQueryAttention updates in place: no per-step copy
of the cache, and a step's cost follows each row's real length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from stlm.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    QUERY_SEQLENS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)
from stlm.errors import BackendUnavailableError, InvalidArgumentError, PackageError
from stlm.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class ConcatCache:
    """Past arrays in contract order, the attention mask so far, and each row's next position."""

    arrays: list[np.ndarray]
    mask: np.ndarray
    lengths: np.ndarray

    @property
    def batch(self) -> int:
        """Rows."""
        return int(self.mask.shape[0])


@dataclass
class InplaceCache:
    """Preallocated (batch, kv_heads, capacity, head_dim) buffers and each row's length."""

    buffers: list[ort.OrtValue]
    lengths: np.ndarray
    capacity: int

    @property
    def batch(self) -> int:
        """Rows."""
        return int(self.lengths.shape[0])


def kv_numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a contract dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


_ONNX_BFLOAT16 = 16


def _ortvalue(array: np.ndarray) -> ort.OrtValue:
    """A CPU OrtValue of ``array``; bfloat16 (ml_dtypes) goes in by its bits, which numpy feeds cannot."""
    if array.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), _ONNX_BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(array)


def _bfloat16_numpy(value: ort.OrtValue) -> np.ndarray:
    """A copy of a CPU bfloat16 OrtValue as an ml_dtypes array (``OrtValue.numpy()`` refuses bfloat16)."""
    import ctypes

    import ml_dtypes

    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, ml_dtypes.bfloat16)
    bits = np.frombuffer((ctypes.c_uint16 * count).from_address(value.data_ptr()), dtype=np.uint16)
    return bits.copy().view(ml_dtypes.bfloat16).reshape(shape)


def _ragged(tokens: Sequence[Sequence[int]], batch: int, *, right: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pad per-row token lists into (batch, longest) ids and a 0/1 validity mask."""
    if len(tokens) != batch:
        raise InvalidArgumentError(
            f"{len(tokens)} token lists for a cache of {batch} rows",
            fix="pass one (possibly empty) token list per cache row",
        )
    counts = np.array([len(t) for t in tokens], dtype=np.int64)
    width = max(int(counts.max()), 1)
    ids = np.zeros((batch, width), dtype=np.int64)
    valid = np.zeros((batch, width), dtype=np.int64)
    for b, row in enumerate(tokens):
        if len(row):
            cols = slice(0, len(row)) if right else slice(width - len(row), width)
            ids[b, cols] = row
            valid[b, cols] = 1
    return ids, valid


def step_inputs(
    tokens: Sequence[Sequence[int]],
    lengths: np.ndarray,
    *,
    inplace: bool,
    mask: np.ndarray | None = None,
    capacity: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The host inputs of one step (pure), and each row's new-token count.

    In place: right-padded ids, ``seqlens_k`` (an idle row keeps its length; an empty idle row
    reads one ignored slot, since GroupQueryAttention needs T ≥ 1), ``query_seqlens``, and the
    total bound. Concat: left-padded ids, the mask extended by this step, and positions.
    """
    ids, valid = _ragged(tokens, len(lengths), right=inplace)
    counts = valid.sum(axis=1)
    if not inplace:
        assert mask is not None
        positions = np.maximum(lengths[:, None] + np.cumsum(valid, axis=1) - 1, 0)
        return {INPUT_IDS: ids, ATTENTION_MASK: np.concatenate([mask, valid], axis=1), POSITION_IDS: positions}, counts
    after = lengths + counts
    assert capacity is not None
    if int(after.max()) > capacity:
        raise InvalidArgumentError(
            f"a row would hold {int(after.max())} tokens; this cache holds {capacity}",
            fix="create the cache with a larger capacity",
        )
    seqlens_k = np.maximum(after - 1, 0).astype(np.int32)
    total = np.array(max(int(seqlens_k.max()) + 1, ids.shape[1]), dtype=np.int32)
    return {
        INPUT_IDS: ids,
        SEQLENS_K: seqlens_k,
        QUERY_SEQLENS: counts.astype(np.int32),
        TOTAL_SEQUENCE_LENGTH: total,
    }, counts


@dataclass(frozen=True)
class DecoderSession:
    """An ONNX Runtime session over a package's graph, checked against its contract."""

    session: ort.InferenceSession
    past: list[str]
    present: list[str]
    kv_dtype: np.dtype
    inplace: bool


def open_decoder_session(
    folder: Path, manifest: Manifest, providers: list[Any], threads: int | None = None
) -> DecoderSession:
    """Load ``folder``'s graph with ``providers``; package and kernel problems become StlmErrors."""
    if manifest.variant.get("rotary") == "plugin":
        raise PackageError(
            f"{folder} is a TensorRT-target package: its rotary runs in the stlm::partial_rotary "
            "TensorRT plugin, which ONNX Runtime does not have",
            fix=f"build an engine from it (`stlm build-engine {folder} -o ENGINE_DIR`) and generate with "
            "that, or export for ONNX Runtime (without --target tensorrt)",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    path = Path(folder) / manifest.graph
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for bad files
        if "NOT_IMPLEMENTED" in str(exc):
            raise BackendUnavailableError(
                f"ONNX Runtime ({', '.join(map(str, providers))}) has no kernel for a node of "
                f"{path} in the package's {manifest.dtype} ({str(exc).strip()[:300]})",
                fix=(
                    "a --target tensorrt graph computes in its dtype for TensorRT: build an engine from it "
                    "(stlm build-engine), or "
                    if manifest.variant.get("target") == "tensorrt"
                    else ""
                )
                + "export the package again with this stlm (--target onnxruntime), which stores fp16/bf16 "
                "weights and computes in fp32 on CPU",
            ) from None
        raise PackageError(
            f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {str(exc).strip()[:300]})",
            fix="the graph or its weights are corrupt or truncated: export the package again",
        ) from None
    missing = {s.name for s in manifest.contract.inputs} - {i.name for i in session.get_inputs()}
    if missing:
        raise PackageError(
            f"{path} lacks the inputs {sorted(missing)[:4]} its manifest declares", fix="export the package again"
        )
    return DecoderSession(
        session=session,
        past=[s.name for s in manifest.contract.inputs if s.name.startswith("past_key_values.")],
        present=[s.name for s in manifest.contract.outputs if s.name.startswith("present.")],
        kv_dtype=kv_numpy_dtype(manifest.contract.kv_dtype),
        inplace=manifest.variant.get("kv_cache", "concat") == "inplace",
    )


class OnnxRuntimeBackend:
    """Runs an ONNX package with ONNX Runtime (CPU by default)."""

    name = "onnxruntime"

    def __init__(
        self, folder: Path, manifest: Manifest, *, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        self.manifest = manifest
        opened = open_decoder_session(folder, manifest, providers or ["CPUExecutionProvider"], threads)
        self.session, self._past, self._present = opened.session, opened.past, opened.present
        self._kv_dtype, self.inplace = opened.kv_dtype, opened.inplace

    def _kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        cfg = self.manifest.model
        return (batch, cfg.num_kv_heads, length, cfg.head_dim)

    def new_cache(self, batch: int, capacity: int) -> ConcatCache | InplaceCache:
        """An empty cache; the in-place variant allocates its ``capacity`` now, once."""
        lengths = np.zeros(batch, dtype=np.int64)
        if self.inplace:
            shape = self._kv_shape(batch, capacity)
            buffers = [_ortvalue(np.zeros(shape, self._kv_dtype)) for _ in self._past]
            return InplaceCache(buffers, lengths, capacity)
        empty = np.zeros(self._kv_shape(batch, 0), self._kv_dtype)
        return ConcatCache([empty] * len(self._past), np.zeros((batch, 0), dtype=np.int64), lengths)

    def forward(self, cache: ConcatCache | InplaceCache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """One step over every row; see :meth:`stlm.runtime.backend.Backend.forward`."""
        if isinstance(cache, InplaceCache):
            return self._forward_inplace(cache, tokens)
        return self._forward_concat(cache, tokens)

    def release(self, cache: ConcatCache | InplaceCache, row: int) -> None:
        """Empty ``row``: its old entries are masked out (concat) or overwritten (in place)."""
        cache.lengths[row] = 0
        if isinstance(cache, ConcatCache):
            cache.mask[row] = 0

    def _forward_concat(self, cache: ConcatCache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        feeds, counts = step_inputs(tokens, cache.lengths, inplace=False, mask=cache.mask)
        mask = feeds[ATTENTION_MASK]
        feeds.update(zip(self._past, cache.arrays, strict=True))
        if self._kv_dtype.name == "bfloat16":  # numpy feeds/fetches cannot carry bfloat16: go through OrtValues
            values = self.session.run_with_ort_values(
                [LOGITS, *self._present], {k: _ortvalue(v) for k, v in feeds.items()}
            )
            logits, presents = values[0].numpy(), [_bfloat16_numpy(v) for v in values[1:]]
        else:
            logits, *presents = self.session.run([LOGITS, *self._present], feeds)
        cache.arrays, cache.mask = presents, mask
        cache.lengths += counts
        return logits[:, -1, :]

    def _forward_inplace(self, cache: InplaceCache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        feeds, counts = step_inputs(tokens, cache.lengths, inplace=True, capacity=cache.capacity)
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(LOGITS)
        for past, present, buffer in zip(self._past, self._present, cache.buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        self.session.run_with_iobinding(binding)
        cache.lengths = cache.lengths + counts
        return binding.get_outputs()[0].numpy()[:, 0, :]
