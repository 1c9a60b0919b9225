"""The ONNX Runtime backend, on the CPU or on CUDA, for both KV variants, through IOBinding.

The cache stays on the session's device between steps; only ids, masks, positions and the
logits asked for cross to the host.

* ``inplace``: one (batch, kv_heads, capacity + 1, head_dim) buffer per KV tensor, allocated on
  the device once and bound (by address) as both past and present, which GroupQueryAttention
  updates in place: no per-step copy of the cache. A step is one or more calls planned by
  :func:`stlm.runtime.steps.plan_inplace_step`; a call over one row binds that row's slice.
* ``concat``: each step binds the previous step's ``present`` values (device ``OrtValue`` s) as
  ``past`` and lets ONNX Runtime allocate the new presents on the device. KV values never become
  numpy arrays, so bfloat16 caches need no conversion.

``device='cpu'`` runs exactly the code ``device='cuda'`` runs, on the CPU provider.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from stlm.errors import BackendUnavailableError
from stlm.package.contract import ATTENTION_MASK, LOGITS
from stlm.package.dtypes import ONNX_BFLOAT16, numpy_dtype
from stlm.package.manifest import Manifest
from stlm.runtime.backend import last_position_logits
from stlm.runtime.ort_session import CUDA_PROVIDER, device_for, open_session, providers_for
from stlm.runtime.steps import InplaceCall, check_capacity, check_feed, concat_step, plan_inplace_step
from stlm.support.gpu_env import GPU_INSTALL_FIX

log = logging.getLogger(__name__)

#: Spare slot per in-place buffer row: an idle row's dummy token lands at slot ``length``.
SLACK = 1


@dataclass
class ConcatCache:
    """Past values in contract order (device ``OrtValue`` s), the attention mask so far, each row's length."""

    values: list[ort.OrtValue]
    mask: np.ndarray
    lengths: np.ndarray

    @property
    def batch(self) -> int:
        """Rows."""
        return int(self.mask.shape[0])


@dataclass
class InplaceCache:
    """(batch, kv_heads, capacity + 1, head_dim) device buffers in contract order, each row's length."""

    buffers: list[ort.OrtValue]
    lengths: np.ndarray
    capacity: int

    @property
    def batch(self) -> int:
        """Rows."""
        return int(self.lengths.shape[0])


Cache = ConcatCache | InplaceCache


def _empty_value(shape: tuple[int, ...], dtype: np.dtype) -> ort.OrtValue:
    """A host OrtValue of ``shape`` (bfloat16 goes in by its bits: numpy bindings cannot carry it)."""
    array = np.zeros(shape, dtype)
    if dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


class OnnxRuntimeBackend:
    """Runs an ONNX package with ONNX Runtime on ``device`` ('cpu', 'cuda', or None: CUDA if available)."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        *,
        device: str | None = None,
        device_id: int = 0,
        threads: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.device, self.device_id = device_for(device), device_id
        self.session = open_session(folder, manifest, providers_for(self.device, device_id), threads)
        if self.device == "cuda" and CUDA_PROVIDER not in self.session.get_providers():
            if device is not None:
                raise _cuda_unavailable(self.session)
            log.info("ONNX Runtime could not start CUDA; running on the CPU")
            self.device = "cpu"
        self.name = "onnxruntime-cuda" if self.device == "cuda" else "onnxruntime"
        self._past, self._present = manifest.contract.past, manifest.contract.present
        self._kv_dtype = numpy_dtype(manifest.contract.kv_dtype)
        cfg = manifest.model
        self._heads, self._head_dim = cfg.num_kv_heads, cfg.head_dim

    # -- Backend protocol ---------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> Cache:
        """An empty cache; the in-place variant allocates its ``capacity`` (+ 1 spare slot) now, once."""
        lengths = np.zeros(batch, dtype=np.int64)
        if self.manifest.variant.inplace:
            shape = (batch, self._heads, capacity + SLACK, self._head_dim)
            zeros = np.zeros(shape, self._kv_dtype)  # zeroed: a padded slot must never hold NaN garbage
            # On the CPU an OrtValue wraps the numpy memory itself, so each tensor needs its own array.
            buffers = [
                ort.OrtValue.ortvalue_from_numpy(
                    zeros if self.device == "cuda" else np.zeros_like(zeros), self.device, self.device_id
                )
                for _ in self._past
            ]
            return InplaceCache(buffers, lengths, capacity)
        empty = _empty_value((batch, self._heads, 0, self._head_dim), self._kv_dtype)
        return ConcatCache([empty] * len(self._past), np.zeros((batch, 0), dtype=np.int64), lengths)

    def forward(self, cache: Cache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """One step over every row; logits after each row's last token (see :class:`~stlm.runtime.backend.Backend`)."""
        return last_position_logits(self._step(cache, tokens, every_position=False), self.manifest.model.vocab_size)

    def forward_all(self, cache: Cache, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One step over every row; every fed position's logits, (len(tokens[row]), vocab) per row."""
        return self._step(cache, tokens, every_position=True)

    def release(self, cache: Cache, row: int) -> None:
        """Empty ``row``: its old entries are masked out (concat) or overwritten (in place)."""
        cache.lengths[row] = 0
        if isinstance(cache, ConcatCache):
            cache.mask[row] = 0

    # -- steps ----------------------------------------------------------------------------------
    def _step(self, cache: Cache, tokens: Sequence[Sequence[int]], *, every_position: bool) -> list[np.ndarray]:
        feed = check_feed(tokens, cache.batch)
        counts = np.array([len(t) for t in feed], dtype=np.int64)
        vocab = self.manifest.model.vocab_size
        rows = [np.zeros((0, vocab), np.float32)] * cache.batch
        if isinstance(cache, InplaceCache):
            check_capacity(cache.lengths, counts, cache.capacity)
            for call in plan_inplace_step(feed, cache.lengths, every_position=every_position):
                logits = self._run_inplace(cache, call)
                for r in call.results:
                    rows[r] = logits[r - call.first_row, : counts[r] if every_position else 1]
        else:
            logits = self._run_concat(cache, feed, every_position)
            for r, count in enumerate(counts):
                if count:
                    rows[r] = logits[r, -count:] if every_position else logits[r, :1]
        cache.lengths = cache.lengths + counts
        return rows

    def _run_concat(self, cache: ConcatCache, feed: list[list[int]], every_position: bool) -> np.ndarray:
        host, _ = concat_step(feed, cache.lengths, cache.mask, every_position=every_position)
        binding = self.session.io_binding()
        for name, array in host.items():  # ``host`` keeps the arrays alive until the run ends
            binding.bind_cpu_input(name, array)
        binding.bind_output(LOGITS, "cpu")
        for past, present, value in zip(self._past, self._present, cache.values, strict=True):
            binding.bind_ortvalue_input(past, value)
            binding.bind_output(present, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.values, cache.mask = list(outputs[1:]), host[ATTENTION_MASK]
        return np.asarray(outputs[0].numpy())

    def _run_inplace(self, cache: InplaceCache, call: InplaceCall) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in call.feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(LOGITS, "cpu")
        whole = call.first_row == 0 and call.batch == cache.batch
        shape = [call.batch, self._heads, cache.capacity + SLACK, self._head_dim]
        offset = call.first_row * self._heads * (cache.capacity + SLACK) * self._head_dim * self._kv_dtype.itemsize
        for past, present, buffer in zip(self._past, self._present, cache.buffers, strict=True):
            if whole:  # the common case: the buffers themselves (binding an OrtValue is 15x cheaper)
                binding.bind_ortvalue_input(past, buffer)
                binding.bind_ortvalue_output(present, buffer)
                continue
            address = buffer.data_ptr() + offset  # one row's slice, by address
            binding.bind_input(past, self.device, self.device_id, self._kv_dtype.type, shape, address)
            binding.bind_output(present, self.device, self.device_id, self._kv_dtype.type, shape, address)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.get_outputs()[0].numpy())


def _cuda_unavailable(session: ort.InferenceSession) -> Exception:
    return BackendUnavailableError(
        f"ONNX Runtime could not start its CUDA execution provider (running on {session.get_providers()})",
        fix=GPU_INSTALL_FIX,
    )


if TYPE_CHECKING:  # mypy proves the class satisfies the Backend protocol for its cache type
    from stlm.runtime.backend import Backend

    _: type[Backend[Cache]] = OnnxRuntimeBackend
