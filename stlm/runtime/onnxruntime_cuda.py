"""ONNX Runtime on the GPU with the KV cache kept on the device (CUDA execution provider + IOBinding).

Both graph variants keep their cache in device ``OrtValue`` s between steps:

* ``inplace``: one (batch, kv_heads, capacity, head_dim) buffer per KV tensor is allocated on
  the device once and bound as both past and present; GroupQueryAttention writes the new
  entries into it.
* ``concat``: each step binds the previous step's ``present`` values (on the device) as ``past``
  and lets ONNX Runtime allocate the new presents on the device
  (``bind_output(name, device_type='cuda')``).

Only ids, masks and positions go up and the logits come down. :func:`load_onnx_backend` picks
this backend when the ``gpu`` extra (onnxruntime-gpu) is installed and a GPU answers, else the
CPU backend. ``device='cpu'`` runs the same IOBinding code on the CPU provider (tests, parity).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from stlm.contract import ATTENTION_MASK, LOGITS
from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.manifest import Manifest
from stlm.runtime.backend import Backend
from stlm.runtime.gpu import GPU_FIX
from stlm.runtime.onnxruntime_backend import open_decoder_session, step_inputs

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass
class DeviceCache:
    """KV values in contract order (host arrays before the first concat step, ``OrtValue`` s after),
    each row's length, and the concat variant's attention mask so far."""

    values: list[Any]
    lengths: np.ndarray
    mask: np.ndarray | None = None
    capacity: int = 0

    @property
    def batch(self) -> int:
        """Rows."""
        return int(self.lengths.shape[0])


def cuda_provider_available() -> bool:
    """Whether this ONNX Runtime build has the CUDA execution provider (onnxruntime-gpu)."""
    return CUDA_PROVIDER in ort.get_available_providers()


class OnnxRuntimeCudaBackend:
    """ONNX Runtime over IOBinding with the KV cache on ``device`` ('cuda' or 'cpu')."""

    def __init__(
        self, folder: Path, manifest: Manifest, *, device: str = "cuda", device_id: int = 0, threads: int | None = None
    ) -> None:
        if device not in ("cuda", "cpu"):
            raise InvalidArgumentError(f"device {device!r} is not 'cuda' or 'cpu'", fix="pass device='cuda'")
        if device == "cuda" and not cuda_provider_available():
            raise BackendUnavailableError(
                f"this ONNX Runtime ({ort.__version__}) has no CUDA execution provider "
                f"(available: {', '.join(ort.get_available_providers())})",
                fix=GPU_FIX,
            )
        self.manifest, self.device, self.device_id = manifest, device, device_id
        self.name = "onnxruntime-cuda" if device == "cuda" else "onnxruntime-iobinding"
        providers: list[Any] = [(CUDA_PROVIDER, {"device_id": device_id})] if device == "cuda" else []
        opened = open_decoder_session(folder, manifest, [*providers, "CPUExecutionProvider"], threads)
        self.session, self._past, self._present = opened.session, opened.past, opened.present
        self._kv_dtype, self.inplace = opened.kv_dtype, opened.inplace
        if device == "cuda" and self.session.get_providers()[0] != CUDA_PROVIDER:
            raise BackendUnavailableError(
                f"ONNX Runtime could not start its CUDA provider (session providers: {self.session.get_providers()})",
                fix="check the GPU, driver and CUDA libraries with nvidia-smi; in Docker pass --gpus all",
            )

    def new_cache(self, batch: int, capacity: int) -> DeviceCache:
        """An empty cache; the in-place variant allocates its device buffers now, once."""
        cfg = self.manifest.model
        lengths = np.zeros(batch, dtype=np.int64)
        if self.inplace:
            shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
            zeros = np.zeros(shape, self._kv_dtype)  # copied to the device for each tensor
            # On the CPU an OrtValue wraps the numpy memory itself, so each tensor needs its own array.
            buffers = [
                ort.OrtValue.ortvalue_from_numpy(
                    zeros if self.device == "cuda" else np.zeros(shape, zeros.dtype), self.device, self.device_id
                )
                for _ in self._past
            ]
            return DeviceCache(buffers, lengths, capacity=capacity)
        empty = np.zeros((batch, cfg.num_kv_heads, 0, cfg.head_dim), self._kv_dtype)
        return DeviceCache([empty] * len(self._past), lengths, mask=np.zeros((batch, 0), dtype=np.int64))

    def forward(self, cache: DeviceCache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Append ``tokens[row]`` to each row; logits after each row's last token, (batch, vocab)."""
        binding = self.session.io_binding()
        host, counts = step_inputs(
            tokens, cache.lengths, inplace=self.inplace, mask=cache.mask, capacity=cache.capacity
        )
        for name, array in host.items():  # `host` keeps the arrays alive until the run ends
            binding.bind_cpu_input(name, array)
        binding.bind_output(LOGITS, "cpu")
        for past, present, value in zip(self._past, self._present, cache.values, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(past, value)
            else:
                binding.bind_ortvalue_input(past, value)
            if self.inplace:
                binding.bind_ortvalue_output(present, value)
            else:
                binding.bind_output(present, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if not self.inplace:
            cache.values, cache.mask = list(outputs[1:]), host[ATTENTION_MASK]
        cache.lengths = cache.lengths + counts
        return outputs[0].numpy()[:, -1, :]

    def release(self, cache: DeviceCache, row: int) -> None:
        """Empty ``row``: its entries are masked out (concat) or overwritten (in place)."""
        cache.lengths[row] = 0
        if cache.mask is not None:
            cache.mask[row] = 0


def load_onnx_backend(
    folder: Path, manifest: Manifest, *, providers: list[str] | None = None, threads: int | None = None
) -> Backend:
    """The ONNX Runtime backend for this machine: the CUDA one when onnxruntime-gpu is installed
    and a GPU answers (unless ``providers`` asks for something else), otherwise the CPU one."""
    from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend

    wants_cuda = providers[0] == CUDA_PROVIDER if providers else cuda_provider_available()
    if wants_cuda and manifest.variant.get("rotary") != "plugin":
        try:
            return OnnxRuntimeCudaBackend(folder, manifest, device="cuda", threads=threads)
        except BackendUnavailableError as exc:
            if providers:
                raise
            log.info("ONNX Runtime on CUDA is unavailable, using the CPU: %s", exc.problem)
    return OnnxRuntimeBackend(folder, manifest, providers=providers, threads=threads)
