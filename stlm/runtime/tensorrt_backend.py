"""TensorRT backend: runs an engine package with its KV cache resident on the GPU.

The engine has the ``concat`` contract: past (batch, kv_heads, T, head_dim) in, present
(batch, kv_heads, T + new, head_dim) out, an attention mask over the T + new columns and
position ids. Per cache, two device slabs hold every KV tensor at the cache's column capacity:
the engine reads ``past`` from one slab and writes ``present`` into the other, and the two swap
roles after each step, so the cache never leaves the device. Only ids, mask, positions and
``logits_index`` go up, and only the logits asked for come down (each row's last token for
``forward``, every fed position for ``forward_all``).

Rows share the column axis: a step gives every row the same number of new columns (left-padded
with masked holes; an idle row gets only holes), as the ONNX Runtime concat backend does. When
the columns would outgrow the slabs, or a prompt chunk needs a shorter past, the cache is
compacted on the device: each row's valid columns are right-aligned into the spare slab
(``cudaMemcpy2DAsync``), which drops the holes. Positions come from each row's length, and the
keys are stored already rotated, so moving columns changes nothing in the attention.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stlm.errors import BackendUnavailableError, InvalidArgumentError, PackageError
from stlm.package.contract import (
    ATTENTION_MASK,
    BATCH,
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    PAST,
    POSITION_IDS,
    SEQUENCE,
    TOTAL,
)
from stlm.package.dtypes import TENSORRT_NAME, numpy_dtype
from stlm.package.manifest import Manifest
from stlm.runtime.backend import last_position_logits
from stlm.runtime.steps import check_capacity, check_feed, concat_step
from stlm.tensorrt.common import make_logger, register_rotary_plugin
from stlm.tensorrt.engine_manifest import (
    check_engine_compat,
    plugin_kernel_is_inside,
    rebuild_command,
    recorded_profiles,
)
from stlm.tensorrt.gpu import DeviceBuffer, Stream, aligned, gpu_info, import_tensorrt
from stlm.tensorrt.profiles import PREFILL, profile_shapes, select_profile

log = logging.getLogger(__name__)


@dataclass
class TrtCache:
    """A batch's KV cache on the GPU. ``mask`` (batch, T) marks the columns each row uses;
    slab ``current`` holds the past, the other one receives the next present."""

    capacity: int
    columns: int
    stride: int
    slabs: list[DeviceBuffer]
    mask: np.ndarray
    lengths: np.ndarray
    current: int = 0

    @property
    def batch(self) -> int:
        """Rows."""
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        """Columns in use (T)."""
        return int(self.mask.shape[1])

    def base(self, slab: int, tensor: int) -> int:
        """Device address of KV tensor ``tensor`` (contract order) in slab ``slab``."""
        return self.slabs[slab].ptr + tensor * self.stride


class TensorRTBackend:
    """Runs a TensorRT engine package (``kind='tensorrt'``) on CUDA device 0."""

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.manifest = manifest
        folder = Path(folder)
        trt = import_tensorrt()
        gpu = gpu_info(0)
        check_engine_compat(
            manifest.extra,
            trt_version=trt.__version__,
            compute_capability=gpu.compute_capability,
            gpu_name=gpu.name,
            engine_dir=str(folder),
        )
        aot = plugin_kernel_is_inside(manifest.extra)
        if aot is not None:  # an AOT plugin's PTX is in the engine; a JIT one needs its Python impl
            register_rotary_plugin(required=not aot)
        self._profiles = recorded_profiles(manifest.extra)
        self._rebuild = rebuild_command(manifest.extra, str(folder))
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((folder / manifest.graph).read_bytes())
        if self.engine is None:
            raise PackageError(
                f"TensorRT cannot load the engine {folder / manifest.graph}: {self._logger.recent_errors()}",
                fix=f"the file is corrupt or from another build: {self._rebuild} --overwrite",
            )
        self._check_io(folder)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailableError(
                f"TensorRT could not create an execution context: {self._logger.recent_errors()}",
                fix="free GPU memory, or rebuild with smaller --max-batch / --max-seq-len",
            )
        cfg = manifest.model
        self._past, self._present = manifest.contract.past, manifest.contract.present
        self._col_bytes = cfg.head_dim * numpy_dtype(manifest.contract.kv_dtype).itemsize  # one position of one head
        self.max_batch = max(p.axes[BATCH][2] for p in self._profiles)
        self.max_seq_len = max(p.axes[TOTAL][2] for p in self._profiles)
        prefill = next(p for p in self._profiles if p.name == PREFILL)
        self._chunk, self._chunk_past = prefill.axes[SEQUENCE][2], prefill.axes[PAST][2]
        self._stream = Stream()
        id_bytes = aligned(self.max_batch * self._chunk * 8)
        self._inputs = {
            INPUT_IDS: DeviceBuffer(id_bytes, INPUT_IDS),
            POSITION_IDS: DeviceBuffer(id_bytes, POSITION_IDS),
            LOGITS_INDEX: DeviceBuffer(id_bytes, LOGITS_INDEX),
            ATTENTION_MASK: DeviceBuffer(aligned(self.max_batch * self.max_seq_len * 8), ATTENTION_MASK),
        }
        self._logits = DeviceBuffer(self.max_batch * self._chunk * cfg.vocab_size * 4, "the logits")
        self._active: int | None = None
        self._lock = threading.Lock()
        log.info(
            "loaded TensorRT engine %s on %s (max batch %d, max length %d, prefill chunk %d)",
            folder,
            gpu.name,
            self.max_batch,
            self.max_seq_len,
            self._chunk,
        )

    def _check_io(self, folder: Path) -> None:
        """The engine's own tensors, dtypes and profiles must be the ones its manifest records."""
        engine, contract = self.engine, self.manifest.contract
        specs = {s.name: s for s in (*contract.inputs, *contract.outputs)}
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        problems = []
        if names != set(specs):
            problems.append(
                f"tensors differ: missing {sorted(set(specs) - names)[:3]}, extra {sorted(names - set(specs))[:3]}"
            )
        elif len(self._profiles) != 2 or engine.num_optimization_profiles != len(self._profiles):
            problems.append(
                f"{engine.num_optimization_profiles} optimization profiles, the manifest records {len(self._profiles)}"
            )
        else:
            for name, spec in specs.items():
                got = getattr(engine.get_tensor_dtype(name), "name", "?")
                if TENSORRT_NAME.get(got) != spec.dtype:
                    problems.append(
                        f"{name} is {TENSORRT_NAME.get(got, got)} in the engine, {spec.dtype} in the manifest"
                    )
            for i, profile in enumerate(self._profiles):
                for name, shapes in profile_shapes(contract, profile).items():
                    got_shapes = [tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, i)]
                    if got_shapes != list(shapes):
                        problems.append(
                            f"optimization profile {i} of {name} is {got_shapes}, the manifest records {list(shapes)}"
                        )
        if problems:
            raise PackageError(
                f"the engine in {folder} does not match its manifest: {'; '.join(problems[:3])}",
                fix=f"rebuild it: {self._rebuild} --overwrite",
            )

    # -- Backend protocol ---------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> TrtCache:
        """Two device slabs for ``batch`` rows of ``capacity`` tokens (twice that in columns for a
        batch, so that holes are compacted rarely)."""
        if not 1 <= batch <= self.max_batch:
            raise InvalidArgumentError(
                f"a batch of {batch} sequences exceeds this engine's maximum of {self.max_batch}",
                fix=f"send at most {self.max_batch} prompts at once, or rebuild with a larger "
                f"--max-batch: {self._rebuild} --max-batch N --overwrite",
            )
        if not 1 <= capacity <= self.max_seq_len:
            raise InvalidArgumentError(
                f"a row of {capacity} tokens exceeds this engine's maximum of {self.max_seq_len}",
                fix="lower max_new_tokens or shorten the prompt, or rebuild with a larger "
                f"--max-seq-len: {self._rebuild} --max-seq-len N --overwrite",
            )
        cfg = self.manifest.model
        columns = capacity if batch == 1 else min(2 * capacity, self.max_seq_len)
        stride = aligned(batch * cfg.num_kv_heads * columns * self._col_bytes)
        slabs = [DeviceBuffer(stride * len(self._past), "the KV cache") for _ in range(2)]
        return TrtCache(capacity, columns, stride, slabs, np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64))

    def forward(self, cache: TrtCache, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Append ``tokens[row]`` to each row; return the logits after each row's last token (batch, vocab)."""
        return last_position_logits(self._run(cache, tokens, every_position=False), self.manifest.model.vocab_size)

    def forward_all(self, cache: TrtCache, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Append ``tokens[row]`` to each row; every fed position's logits, (len(tokens[row]), vocab) per row."""
        return self._run(cache, tokens, every_position=True)

    def release(self, cache: TrtCache, row: int) -> None:
        """Empty ``row``: its columns become holes (dropped at the next compaction)."""
        cache.lengths[row] = 0
        cache.mask[row] = 0

    # -- internals ----------------------------------------------------------------------------
    def _run(self, cache: TrtCache, tokens: Sequence[Sequence[int]], *, every_position: bool) -> list[np.ndarray]:
        """Feed every row its tokens in chunks the profiles take; the logits asked for, per row."""
        pending = check_feed(tokens, cache.batch)
        check_capacity(cache.lengths, np.array([len(p) for p in pending], dtype=np.int64), cache.capacity)
        outputs: list[list[np.ndarray]] = [[] for _ in range(cache.batch)]
        with self._lock:
            while any(pending):
                width, profile = self._fit(cache, max(len(p) for p in pending), every_position)
                piece, pending = [p[:width] for p in pending], [p[width:] for p in pending]
                logits = self._step(cache, piece, profile, every_position)
                for r, row in enumerate(piece):
                    if row:
                        outputs[r].append(logits[r, -len(row) :] if every_position else logits[r])
        vocab = self.manifest.model.vocab_size
        return [np.concatenate(o) if o else np.zeros((0, vocab), np.float32) for o in outputs]

    def _fit(self, cache: TrtCache, wanted: int, every_position: bool) -> tuple[int, int]:
        """The width of the next step (≤ ``wanted``) and its profile; compacts the cache if that helps."""
        width = min(wanted, self._chunk)
        if cache.width + width > cache.columns or (width > 1 and cache.width > self._chunk_past):
            self._compact(cache)
        if width > 1 and cache.width > self._chunk_past:
            width = 1  # a long past: the rest of the prompt runs token by token on the decode profile
        width = min(width, cache.columns - cache.width)
        step = max(width, 1)
        profile = select_profile(
            self._profiles, batch=cache.batch, sequence=step, past=cache.width, num_logits=step if every_position else 1
        )
        if width < 1 or profile is None:
            raise InvalidArgumentError(
                f"the KV cache is full: {cache.width} of {cache.columns} columns hold tokens",
                fix="release finished rows, or create the cache with a larger capacity",
            )
        return width, profile

    def _compact(self, cache: TrtCache) -> None:
        """Right-align every row's valid columns into the spare slab, dropping the holes."""
        counts = cache.mask.sum(axis=1)
        new_width, old_width = int(counts.max(initial=0)), cache.width
        if new_width == old_width:
            return
        heads = self.manifest.model.num_kv_heads
        src_pitch, dst_pitch = old_width * self._col_bytes, new_width * self._col_bytes
        copies: list[tuple[int, int, int, int]] = []  # (row, source column, target column, columns)
        for r in range(cache.batch):
            cols = np.flatnonzero(cache.mask[r])
            if cols.size == 0:
                continue
            breaks = np.flatnonzero(np.diff(cols) != 1) + 1
            target = new_width - cols.size
            for run in np.split(cols, breaks):
                copies.append((r, int(run[0]), target, int(run.size)))
                target += int(run.size)
        stream = self._stream
        # The columns left of each row's tokens stay holes: zero them, since a masked column still
        # multiplies its value by a 0 probability, and 0 × garbage (NaN/Inf) would poison the row.
        spare = cache.slabs[1 - cache.current]
        stream.memset(spare.ptr, 0, spare.nbytes)
        for i in range(len(self._past)):
            src, dst = cache.base(cache.current, i), cache.base(1 - cache.current, i)
            for r, col, target, n in copies:
                stream.dtod_2d(
                    dst + r * heads * dst_pitch + target * self._col_bytes,
                    dst_pitch,
                    src + r * heads * src_pitch + col * self._col_bytes,
                    src_pitch,
                    n * self._col_bytes,
                    heads,
                )
        stream.synchronize()
        mask = np.zeros((cache.batch, new_width), dtype=np.int64)
        for r in range(cache.batch):
            mask[r, new_width - int(counts[r]) :] = 1
        cache.mask, cache.current = mask, 1 - cache.current
        log.debug("compacted a KV cache from %d to %d columns", old_width, new_width)

    def _step(self, cache: TrtCache, piece: list[list[int]], profile: int, every_position: bool) -> np.ndarray:
        """One engine run; the logits asked for, (batch, num_logits, vocab)."""
        ctx, stream, cfg = self.context, self._stream, self.manifest.model
        batch, past = cache.batch, cache.width
        host, counts = concat_step(piece, cache.lengths, cache.mask, every_position=every_position)
        self._set_profile(profile)
        for name, array in host.items():
            array = np.ascontiguousarray(array)
            host[name] = array  # kept alive until the stream is synchronized
            stream.htod(self._inputs[name].ptr, array)
            self._bind_input(name, array.shape, self._inputs[name].ptr)
        kv_shape = (batch, cfg.num_kv_heads, past, cfg.head_dim)
        for i, (past_name, present_name) in enumerate(zip(self._past, self._present, strict=True)):
            self._bind_input(past_name, kv_shape, cache.base(cache.current, i))
            ctx.set_tensor_address(present_name, cache.base(1 - cache.current, i))
        ctx.set_tensor_address(LOGITS, self._logits.ptr)
        if not ctx.execute_async_v3(stream.handle):
            raise BackendUnavailableError(
                f"TensorRT failed to run the engine: {self._logger.recent_errors()}",
                fix="rerun with -v for TensorRT's log",
            )
        logits = np.empty((batch, host[LOGITS_INDEX].shape[1], cfg.vocab_size), dtype=np.float32)
        stream.dtoh(logits, self._logits.ptr)
        stream.synchronize()
        cache.mask, cache.lengths, cache.current = host[ATTENTION_MASK], cache.lengths + counts, 1 - cache.current
        return logits

    def _set_profile(self, profile: int) -> None:
        if self._active == profile:
            return
        if not self.context.set_optimization_profile_async(profile, self._stream.handle):
            raise PackageError(
                f"TensorRT refused optimization profile {profile}: {self._logger.recent_errors()}",
                fix=f"{self._rebuild} --overwrite",
            )
        self._active = profile

    def _bind_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not self.context.set_input_shape(name, shape):
            raise InvalidArgumentError(
                f"TensorRT refused the shape {shape} for {name}: {self._logger.recent_errors()}",
                fix=f"stay within the engine's profiles, or {self._rebuild} --overwrite",
            )
        self.context.set_tensor_address(name, ptr)


if TYPE_CHECKING:  # mypy proves the class satisfies the Backend protocol for its cache type
    from stlm.runtime.backend import Backend

    _: type[Backend[TrtCache]] = TensorRTBackend
