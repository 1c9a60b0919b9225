"""TensorRT registration of ``stlm::partial_rotary`` with the ``tensorrt.plugin`` API (TensorRT 11).

:func:`register_plugin` imports TensorRT and defines, once per process:

* ``@trtp.register``: two outputs shaped and typed like q and k; attributes ``rotary_dim: int``
  and ``theta: float`` (from the ONNX node's INT / FLOAT attributes of the same names);
* ``@trtp.autotune``: q, k, q_out, k_out all FP32, all FP16 or all BF16; position_ids INT64;
  LINEAR (contiguous) layout; three tactics = three (heads per program, warps) tiles;
* ``@trtp.aot_impl``: the PTX of :func:`stlm.plugins.partial_rotary.aot.compile_ptx`, a symbolic
  grid ``(batch * seq, cdiv(heads_q, BLOCK_H) + cdiv(heads_k, BLOCK_H))`` and the int32 extra
  arguments ``(seq, heads_q, heads_k)``. TensorRT bakes it into the engine: no Python at runtime;
* ``@trtp.impl``: the same Triton kernel launched just in time on torch views of TensorRT's buffers.

The ONNX node's ``aot`` attribute (or the network flags ``PREFER_AOT_PYTHON_PLUGINS`` /
``PREFER_JIT_PYTHON_PLUGINS``) picks one of the two implementations.

The AOT PTX targets ``sm_80`` by default: PTX is JIT-compiled by the driver for the GPU that loads
the engine, so it runs on Ampere and every later GPU; set ``STLM_PARTIAL_ROTARY_SM`` (e.g. 90)
to target another architecture (the PTX then runs on that architecture and every later one, never
on an older one: :func:`check_hardware_compat` refuses ``--hardware-compat ampere_plus`` then).

This module deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin``
validates the decorated functions' annotations with ``issubclass`` and needs real classes.
"""

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Final

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.package.dtypes import DType
from stlm.plugins.partial_rotary.spec import PLUGIN_ID, validate_attributes

_log = logging.getLogger(__name__)

if TYPE_CHECKING:  # for mypy: the classes tensorrt.plugin hands the plugin functions (see _define)
    TensorDesc = Any
    Tensor = Any

TACTICS: Final[dict[int, tuple[int, int]]] = {1: (8, 2), 2: (4, 1), 3: (16, 4)}
"""Custom tactic id -> (heads per program, warps per program). Tactic 0 (TensorRT's default) = 1."""
ARCH_ENV: Final = "STLM_PARTIAL_ROTARY_SM"
DEFAULT_AOT_ARCH: Final = 80
IO_TYPES: Final = "FP32|FP16|BF16, FP32|FP16|BF16, INT64, FP32|FP16|BF16, FP32|FP16|BF16"

_lock = threading.Lock()
_registered = False


def tile_for_tactic(tactic: int | None) -> tuple[int, int]:
    """``(block_h, num_warps)`` of a tactic id (0 or None: the default tile)."""
    if not tactic:
        return TACTICS[1]
    if tactic not in TACTICS:
        raise InvalidArgumentError(f"unknown partial_rotary tactic {tactic}", fix=f"use one of {sorted(TACTICS)}")
    return TACTICS[tactic]


def aot_arch() -> int:
    """The SM arch the AOT PTX targets: ``$STLM_PARTIAL_ROTARY_SM`` or 80."""
    value = os.environ.get(ARCH_ENV, str(DEFAULT_AOT_ARCH))
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"{ARCH_ENV}={value!r} is not an SM number", fix=f"e.g. {ARCH_ENV}=90") from None


@functools.lru_cache(maxsize=64)
def _compiled(
    dtype: DType, arch: int, head_dim: int, rotary_dim: int, theta: float, block_h: int, num_warps: int
) -> Any:
    from stlm.plugins.partial_rotary.aot import compile_ptx

    return compile_ptx(
        dtype, arch=arch, head_dim=head_dim, rotary_dim=rotary_dim, theta=theta, block_h=block_h, num_warps=num_warps
    )


def _import_tensorrt() -> tuple[Any, Any]:
    from stlm.tensorrt.gpu import import_tensorrt  # the one guarded import (and version floor)

    trt = import_tensorrt()
    try:
        import tensorrt.plugin as trtp
    except (ImportError, OSError, RuntimeError) as exc:  # OSError/RuntimeError: its native libraries do not load
        raise BackendUnavailableError(
            f"TensorRT's Python package with the tensorrt.plugin module is not installed or cannot load ({exc})",
            fix="on a machine with an NVIDIA GPU, pip install 'stlm[gpu]' (TensorRT 11), then call register_plugin()",
        ) from exc
    needed = ("register", "impl", "aot_impl", "autotune", "KernelLaunchParams", "SymIntExprs", "SymInt32")
    missing = [name for name in needed if not hasattr(trtp, name)]
    if missing:
        raise BackendUnavailableError(
            f"tensorrt {getattr(trt, '__version__', '?')} lacks tensorrt.plugin.{', '.join(missing)}",
            fix="upgrade to TensorRT 11 (AOT plugins need TensorRT >= 10.10)",
        )
    return trt, trtp


def _qdp_registry() -> dict[str, Any]:
    """TensorRT's table of registered ``tensorrt.plugin`` plugins (private; empty if it moved)."""
    try:
        from tensorrt.plugin._lib import QDP_REGISTRY
    except ImportError:
        return {}
    return QDP_REGISTRY if isinstance(QDP_REGISTRY, dict) else {}


def register_plugin(*, required: bool = True) -> bool:
    """Register ``stlm::partial_rotary`` with TensorRT (idempotent; call before parsing/building/loading).

    Returns whether the plugin is registered. Without TensorRT's ``tensorrt.plugin`` layer (not
    installed, its native libraries do not load, or a TensorRT too old for AOT plugins) this raises
    :class:`BackendUnavailableError` when ``required``, else logs why and returns False (an engine
    whose plugin kernel is AOT PTX runs without the registration). A definition TensorRT's own
    validator rejects is a bug in this module and always raises.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            trt, trtp = _import_tensorrt()
        except BackendUnavailableError as exc:
            if required:
                raise
            _log.info("%s not registered (not needed for AOT engines): %s", PLUGIN_ID, exc.problem)
            return False
        if PLUGIN_ID not in _qdp_registry():  # e.g. defined by another copy of this module
            _define(trt, trtp)
        _registered = True
        _log.info("registered TensorRT plugin %s (version 1)", PLUGIN_ID)
        return True


def check_hardware_compat(level: str) -> None:
    """Refuse a hardware-compatibility level the AOT PTX cannot honour.

    ``ampere_plus`` promises an engine for every GPU of compute capability >= 8.0, but PTX compiled
    for ``sm_90`` (``STLM_PARTIAL_ROTARY_SM=90``) or later does not load on Ampere GPUs.
    """
    arch = aot_arch()
    if level == "ampere_plus" and arch > DEFAULT_AOT_ARCH:
        raise InvalidArgumentError(
            f"--hardware-compat ampere_plus with {ARCH_ENV}={arch}: the {PLUGIN_ID} kernel would be PTX for "
            f"sm_{arch}, which Ampere GPUs (compute capability 8.x) cannot load",
            fix=f"unset {ARCH_ENV} (the default sm_80 PTX runs on every GPU from Ampere on), "
            "or build with --hardware-compat none",
        )


def _trt_dtype_name(trt: Any, dtype: Any) -> DType:
    names = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16"}
    if dtype not in names:
        raise InvalidArgumentError(f"partial_rotary supports FP32/FP16/BF16 q and k, got {dtype}")
    return names[dtype]  # type: ignore[return-value]


def _torch_view(trt: Any, tensor: Any) -> Any:
    """A torch view of a ``trtp.Tensor`` buffer (bfloat16 included, which its own interface refuses)."""
    import torch

    layouts = {
        trt.DataType.FLOAT: ("<f4", 4, torch.float32),
        trt.DataType.HALF: ("<f2", 2, torch.float16),
        trt.DataType.BF16: ("<i2", 2, torch.bfloat16),
        trt.DataType.INT64: ("<i8", 8, torch.int64),
    }
    typestr, itemsize, torch_dtype = layouts[tensor.dtype]

    class _CudaArray:
        __cuda_array_interface__: ClassVar[dict[str, Any]] = {
            "shape": tuple(int(d) for d in tensor.shape),
            "typestr": typestr,
            "data": (int(tensor.data_ptr), False),
            "strides": tuple(int(s) * itemsize for s in tensor.strides),
            "version": 3,
            "stream": None,
        }

    return torch.as_tensor(_CudaArray(), device="cuda").view(torch_dtype)


def _static_head_dim(q: Any, k: Any) -> int:
    dims = (q.shape_expr[3], k.shape_expr[3])
    if any(d.is_fake or not d.is_constant for d in dims):
        raise InvalidArgumentError(
            "the AOT partial_rotary plugin needs a static head_dim (last dim of q and k)",
            fix="export q/k with a fixed head_dim, or set the node attribute aot=0 for the JIT implementation",
        )
    q_dim, k_dim = (int(d.constant_value()) for d in dims)
    if q_dim != k_dim:
        raise InvalidArgumentError(f"q and k head dims differ: {q_dim} vs {k_dim}")
    return q_dim


def _launch(trtp: Any, q: Any, k: Any, compiled: Any, block_h: int) -> tuple[Any, Any]:
    """The symbolic launch parameters of the AOT kernel and its extra int32 arguments (seq, heads_q, heads_k)."""
    batch, n_q_heads, seq_len = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    n_k_heads = k.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = batch * seq_len
    launch.grid_y = trtp.cdiv(n_q_heads, block_h) + trtp.cdiv(n_k_heads, block_h)
    launch.grid_z = 1
    launch.block_x = compiled.block[0]
    launch.block_y = 1
    launch.block_z = 1
    launch.shared_mem = compiled.shared_mem
    return launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (seq_len, n_q_heads, n_k_heads)])


def _define(trt: Any, trtp: Any) -> None:
    """Define the plugin's register / autotune / aot_impl / impl functions with TensorRT."""
    if not TYPE_CHECKING:  # tensorrt.plugin reads these annotations: they must be its real classes
        TensorDesc, Tensor = trtp.TensorDesc, trtp.Tensor

    @trtp.register(PLUGIN_ID)
    def partial_rotary_desc(
        q: TensorDesc, k: TensorDesc, position_ids: TensorDesc, rotary_dim: int, theta: float
    ) -> tuple[TensorDesc, TensorDesc]:
        return q.like(), k.like()

    @trtp.autotune(PLUGIN_ID)
    def partial_rotary_autotune(
        q: TensorDesc, k: TensorDesc, position_ids: TensorDesc, outputs: tuple[TensorDesc, TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(IO_TYPES, "LINEAR", sorted(TACTICS))]

    @trtp.aot_impl(PLUGIN_ID)
    def partial_rotary_aot_impl(
        q: TensorDesc,
        k: TensorDesc,
        position_ids: TensorDesc,
        rotary_dim: int,
        theta: float,
        outputs: tuple[TensorDesc, TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        head_dim = _static_head_dim(q, k)
        validate_attributes(int(rotary_dim), float(theta), head_dim)
        block_h, num_warps = tile_for_tactic(tactic)
        compiled = _compiled(
            _trt_dtype_name(trt, q.dtype), aot_arch(), head_dim, int(rotary_dim), float(theta), block_h, num_warps
        )
        launch, extra_args = _launch(trtp, q, k, compiled, block_h)
        return compiled.kernel_name.encode(), compiled.ptx.encode(), launch, extra_args

    @trtp.impl(PLUGIN_ID)
    def partial_rotary_impl(
        q: Tensor,
        k: Tensor,
        position_ids: Tensor,
        rotary_dim: int,
        theta: float,
        outputs: tuple[Tensor, Tensor],
        stream: int,
        tactic: int,
    ) -> None:
        import torch

        from stlm.plugins.partial_rotary.kernel import partial_rotary_triton

        block_h, num_warps = tile_for_tactic(tactic)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            partial_rotary_triton(
                _torch_view(trt, q), _torch_view(trt, k), _torch_view(trt, position_ids),
                rotary_dim=int(rotary_dim), theta=float(theta), block_h=block_h, num_warps=num_warps,
                out=(_torch_view(trt, outputs[0]), _torch_view(trt, outputs[1])),
            )  # fmt: skip
