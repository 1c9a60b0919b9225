"""TensorRT backend: runs an engine package with its KV cache resident on the GPU.

The engine has the ``concat`` contract: past (batch, kv_heads, T, head_dim) in, present
(batch, kv_heads, T + new, head_dim) out, an attention mask over the T + new columns and
position ids. Per cache, two device slabs hold every KV tensor at the cache's column capacity:
the engine reads ``past`` from one slab and writes ``present`` into the other, and the two swap
roles after each step, so the cache never leaves the device. Only ids, mask and positions go up,
and only each row's last-token logits come down.

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
from typing import Any

import numpy as np

from stlm.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from stlm.errors import BackendUnavailableError, InvalidArgumentError, PackageError
from stlm.export.engine_manifest import check_engine_compat, rebuild_command
from stlm.export.profiles import PREFILL, Profile, profile_shapes, select_profile
from stlm.manifest import Manifest
from stlm.runtime.gpu import DeviceBuffer, Stream, aligned, gpu_info
from stlm.runtime.trt_common import import_tensorrt, make_logger, register_rotary_plugin

log = logging.getLogger(__name__)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
}


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
        plugin = manifest.extra.get("plugin") or None
        if plugin is not None:  # an AOT plugin's PTX is in the engine; a JIT one needs its Python impl
            register_rotary_plugin(required=plugin.get("aot") is not True)
        self._profiles = [Profile.from_dict(p) for p in manifest.extra.get("profiles", [])]
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
        self._past = [s.name for s in manifest.contract.inputs if s.name.startswith("past_key_values.")]
        self._present = [s.name for s in manifest.contract.outputs if s.name.startswith("present.")]
        self._itemsize = _ITEMSIZE[manifest.contract.kv_dtype]
        self._col_bytes = cfg.head_dim * self._itemsize  # one position of one head
        self.max_batch = max(p.axes["batch"][2] for p in self._profiles)
        self.max_seq_len = max(p.axes["total_sequence"][2] for p in self._profiles)
        prefill = next(p for p in self._profiles if p.name == PREFILL)
        self._chunk, self._chunk_past = prefill.axes["sequence"][2], prefill.axes["past_sequence"][2]
        self._stream = Stream()
        id_bytes = aligned(self.max_batch * self._chunk * 8)
        self._inputs = {
            INPUT_IDS: DeviceBuffer(id_bytes, INPUT_IDS),
            POSITION_IDS: DeviceBuffer(id_bytes, POSITION_IDS),
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
                if _TRT_DTYPES.get(got) != spec.dtype:
                    problems.append(
                        f"{name} is {_TRT_DTYPES.get(got, got)} in the engine, {spec.dtype} in the manifest"
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
        if len(tokens) != cache.batch:
            raise InvalidArgumentError(
                f"{len(tokens)} token lists for a cache of {cache.batch} rows",
                fix="pass one (possibly empty) token list per cache row",
            )
        pending = [[int(t) for t in row] for row in tokens]
        counts = np.array([len(p) for p in pending], dtype=np.int64)
        if int((cache.lengths + counts).max()) > cache.capacity:
            raise InvalidArgumentError(
                f"a row would hold {int((cache.lengths + counts).max())} tokens; this cache holds {cache.capacity}",
                fix="create the cache with a larger capacity",
            )
        logits = np.zeros((cache.batch, self.manifest.model.vocab_size), dtype=np.float32)
        with self._lock:
            while any(pending):
                width, profile = self._fit(cache, max(len(p) for p in pending))
                piece, pending = [p[:width] for p in pending], [p[width:] for p in pending]
                step = self._step(cache, piece, profile)
                done = [r for r in range(cache.batch) if piece[r] and not pending[r]]
                logits[done] = step[done]
        return logits

    def release(self, cache: TrtCache, row: int) -> None:
        """Empty ``row``: its columns become holes (dropped at the next compaction)."""
        cache.lengths[row] = 0
        cache.mask[row] = 0

    # -- internals ----------------------------------------------------------------------------
    def _fit(self, cache: TrtCache, wanted: int) -> tuple[int, int]:
        """The width of the next step (≤ ``wanted``) and its profile; compacts the cache if that helps."""
        width = min(wanted, self._chunk)
        if cache.width + width > cache.columns or (width > 1 and cache.width > self._chunk_past):
            self._compact(cache)
        if width > 1 and cache.width > self._chunk_past:
            width = 1  # a long past: the rest of the prompt runs token by token on the decode profile
        width = min(width, cache.columns - cache.width)
        profile = select_profile(self._profiles, batch=cache.batch, sequence=max(width, 1), past=cache.width)
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

    def _step(self, cache: TrtCache, piece: list[list[int]], profile: int) -> np.ndarray:
        ctx, stream, cfg = self.context, self._stream, self.manifest.model
        batch, width, past = cache.batch, max(len(p) for p in piece), cache.width
        ids = np.zeros((batch, width), dtype=np.int64)
        valid = np.zeros((batch, width), dtype=np.int64)
        for r, row in enumerate(piece):
            if row:
                ids[r, width - len(row) :] = row
                valid[r, width - len(row) :] = 1
        positions = np.maximum(cache.lengths[:, None] + np.cumsum(valid, axis=1) - 1, 0)
        mask = np.ascontiguousarray(np.concatenate([cache.mask, valid], axis=1))
        if self._active != profile:
            if not ctx.set_optimization_profile_async(profile, stream.handle):
                raise PackageError(
                    f"TensorRT refused optimization profile {profile}: {self._logger.recent_errors()}",
                    fix=f"{self._rebuild} --overwrite",
                )
            self._active = profile
        for name, array in ((INPUT_IDS, ids), (ATTENTION_MASK, mask), (POSITION_IDS, positions)):
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
        last = np.empty((batch, cfg.vocab_size), dtype=np.float32)  # only each row's last column comes down
        stream.dtoh_2d(last, self._logits.ptr + (width - 1) * cfg.vocab_size * 4, width * cfg.vocab_size * 4)
        stream.synchronize()  # also keeps the host inputs alive until their copies are done
        cache.mask, cache.lengths, cache.current = mask, cache.lengths + valid.sum(axis=1), 1 - cache.current
        return last

    def _bind_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not self.context.set_input_shape(name, shape):
            raise InvalidArgumentError(
                f"TensorRT refused the shape {shape} for {name}: {self._logger.recent_errors()}",
                fix=f"stay within the engine's profiles, or {self._rebuild} --overwrite",
            )
        self.context.set_tensor_address(name, ptr)

    def describe(self) -> dict[str, Any]:
        """What this engine accepts (for logs and services)."""
        return {
            "max_batch": self.max_batch,
            "max_seq_len": self.max_seq_len,
            "prefill_chunk": self._chunk,
            "profiles": [p.to_dict() for p in self._profiles],
        }
