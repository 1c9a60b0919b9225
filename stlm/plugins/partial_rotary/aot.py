"""Ahead-of-time compilation of the partial-rotary kernel to PTX (no GPU needed).

This is what the plugin's ``@trtp.aot_impl`` returns to TensorRT, which bakes the PTX into the
engine and launches it itself with ``(inputs..., int32 extra args..., outputs...)`` = ``(q, k,
position_ids, seq_len, n_q_heads, n_k_heads, q_out, k_out)``: exactly the kernel's parameters.

Two rewrites make Triton's PTX fit that launch:

* Triton (>= 3.3) appends hidden pointer parameters (global / profile scratch) to every kernel.
  TensorRT passes only the 8 arguments above, so the unused trailing ``.param`` declarations are
  removed (an error is raised if the body referenced them, i.e. if the kernel needed scratch).
* The entry is renamed to a name unique to the dtype / shapes / tile / theta, because Triton
  names every specialisation after the Python function and TensorRT identifies kernels by name.
* Triton targets ``sm_90a`` (``sm_100a``, ...) for compute capability 9.0 and later: PTX for an
  architecture-specific target loads only on exactly that architecture. The target is rewritten
  to the portable ``sm_90`` (which the driver JIT-compiles for sm_90 and every later GPU), and the
  PTX is assembled for it with ``ptxas`` (Triton's own, or one on PATH) to prove that the kernel
  uses no architecture-specific instruction.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Final

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.package.dtypes import DType
from stlm.plugins.partial_rotary.kernel import (
    DEFAULT_BLOCK_H,
    DEFAULT_NUM_WARPS,
    KERNEL_ARG_NAMES,
    kernel_constexprs,
    launch_grid,
    partial_rotary_kernel,
)
from stlm.plugins.partial_rotary.spec import validate_dtype

TRITON_POINTER_TYPE: Final[dict[DType, str]] = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
NUM_KERNEL_PARAMS: Final = len(KERNEL_ARG_NAMES)
MIN_PTX_VERSION: Final[dict[int, int]] = {
    75: 80,
    80: 80,
    86: 80,
    87: 80,
    89: 80,
    90: 80,
    100: 86,
    103: 88,
    110: 90,
    120: 87,
    121: 88,
}
"""Default PTX ISA per SM arch: the oldest Triton can target that knows the arch (8.0 = CUDA 12.0),
so that any driver able to drive the GPU can JIT the PTX TensorRT stores in the engine."""
SUPPORTED_ARCHS: Final = tuple(MIN_PTX_VERSION)


@dataclass(frozen=True)
class CompiledPartialRotary:
    """A compiled kernel: PTX plus what is needed to launch it."""

    kernel_name: str
    ptx: str
    dtype: DType
    arch: int
    head_dim: int
    rotary_dim: int
    theta: float
    block_h: int
    num_warps: int
    shared_mem: int
    ptx_target: str
    """The PTX ``.target``: ``sm_{arch}`` (never an architecture-specific ``sm_90a``)."""

    @property
    def block(self) -> tuple[int, int, int]:
        """CUDA block dims: ``num_warps * 32`` threads."""
        return self.num_warps * 32, 1, 1

    def grid(self, batch: int, seq_len: int, n_q_heads: int, n_k_heads: int) -> tuple[int, int, int]:
        """CUDA grid dims for concrete shapes (the plugin builds the same expression symbolically)."""
        return launch_grid(batch, seq_len, n_q_heads, n_k_heads, self.block_h)

    @staticmethod
    def extra_args(seq_len: int, n_q_heads: int, n_k_heads: int) -> tuple[int, int, int]:
        """The int32 scalar arguments, in kernel order."""
        return seq_len, n_q_heads, n_k_heads


def kernel_signature(dtype: DType) -> dict[str, str]:
    """Triton signature of the kernel's runtime arguments for ``dtype`` (pure)."""
    pointer = TRITON_POINTER_TYPE[validate_dtype(dtype)]
    types = (pointer, pointer, "*i64", "i32", "i32", "i32", pointer, pointer)
    return dict(zip(KERNEL_ARG_NAMES, types, strict=True))


def unique_kernel_name(
    dtype: DType, *, head_dim: int, rotary_dim: int, theta: float, block_h: int, num_warps: int
) -> str:
    """A PTX entry name unique to everything baked into the kernel (pure)."""
    digest = hashlib.sha1(repr(float(theta)).encode()).hexdigest()[:8]
    return f"stlm_partial_rotary_{dtype}_d{head_dim}_r{rotary_dim}_h{block_h}_w{num_warps}_{digest}"


_ENTRY_RE = re.compile(r"\.entry\s+(?P<name>[A-Za-z_$][\w$]*)\s*\((?P<params>[^)]*)\)", re.S)


def entry_params(ptx: str) -> tuple[str, list[str]]:
    """Return the entry name and its parameter names (pure). Raises ``ValueError`` without one entry."""
    entries = list(_ENTRY_RE.finditer(ptx))
    if len(entries) != 1:
        raise ValueError(f"expected exactly one .entry in the PTX, found {len(entries)}")
    match = entries[0]
    names = [p.strip().split()[-1] for p in match.group("params").split(",") if p.strip()]
    return match.group("name"), names


def strip_trailing_params(ptx: str, keep: int) -> str:
    """Drop the entry's parameters after the first ``keep`` ones; they must be unused (pure)."""
    match = _ENTRY_RE.search(ptx)
    if match is None:
        raise ValueError("no .entry in the PTX")
    params = [p for p in match.group("params").split(",") if p.strip()]
    if len(params) < keep:
        raise ValueError(f"the entry has {len(params)} parameters, fewer than the {keep} expected")
    dropped = [p.strip().split()[-1] for p in params[keep:]]
    body = ptx[match.end() :]
    used = [name for name in dropped if re.search(rf"\b{re.escape(name)}\b", body)]
    if used:
        raise ValueError(f"hidden kernel parameters {used} are used by the kernel body (it needs scratch memory)")
    new_params = ",".join(params[:keep]).rstrip() + "\n"
    return ptx[: match.start("params")] + new_params + ptx[match.end("params") :]


def rename_entry(ptx: str, old: str, new: str) -> str:
    """Rename the PTX entry ``old`` (and its ``old_param_N`` names) to ``new`` (pure)."""
    return re.sub(rf"(?<![\w$]){re.escape(old)}(?=_param_\d|[^\w$]|$)", new, ptx)


_TARGET_RE = re.compile(r"^(\.target\s+)sm_(\d+)[af]?\b", re.M)


def portable_target(ptx: str) -> tuple[str, str]:
    """Rewrite an architecture-specific ``.target sm_NNa``/``sm_NNf`` to ``sm_NN`` (pure).

    Returns the PTX and its target. ``sm_NNa`` PTX loads only on compute capability N.N; ``sm_NN``
    PTX is JIT-compiled by the driver for N.N and every later architecture.
    """
    match = _TARGET_RE.search(ptx)
    if match is None:
        raise ValueError("no .target directive in the PTX")
    return _TARGET_RE.sub(lambda m: f"{m.group(1)}sm_{m.group(2)}", ptx, count=1), f"sm_{match.group(2)}"


def find_ptxas() -> str | None:
    """A ``ptxas`` executable: ``$TRITON_PTXAS_PATH``, one on PATH, or the one in Triton's wheel."""
    for candidate in (os.environ.get("TRITON_PTXAS_PATH"), shutil.which("ptxas")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    try:
        from triton import knobs

        path = str(knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001 - any triton without a bundled ptxas (or another layout)
        return None
    return path if os.access(path, os.X_OK) else None


def assemble_ptx(ptx: str, target: str, *, timeout: float = 120.0) -> str | None:
    """Assemble ``ptx`` for ``target`` with :func:`find_ptxas`; the error text, or None if it assembles.

    Raises :class:`BackendUnavailableError` when no ptxas can be found.
    """
    ptxas = find_ptxas()
    if ptxas is None:
        raise BackendUnavailableError(
            "no ptxas found to check the partial_rotary PTX (not on PATH, not in the triton wheel)",
            fix="pip install 'triton>=3.2' (its wheel bundles ptxas), or set TRITON_PTXAS_PATH",
        )
    with tempfile.TemporaryDirectory(prefix="stlm-ptxas-") as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w", encoding="utf-8") as f:
            f.write(ptx)
        cmd = [ptxas, "--gpu-name", target, source, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout or f"exit status {proc.returncode}").strip()


def _make_portable(ptx: str, arch: int, triton_version: str) -> tuple[str, str]:
    """:func:`portable_target`, proven by assembling the PTX for the portable target (arch >= 90 only)."""
    rewritten, target = portable_target(ptx)
    if rewritten == ptx:
        return ptx, target
    error = assemble_ptx(rewritten, target)
    if error is not None:
        raise BackendUnavailableError(
            f"triton {triton_version} emitted sm_{arch}-specific PTX for the partial_rotary kernel, which does not "
            f"assemble for the portable {target} ({error[:300]})",
            fix="leave STLM_PARTIAL_ROTARY_SM unset: the default sm_80 PTX runs on every GPU from Ampere on",
        )
    return rewritten, target


def _triton_compile(dt: DType, arch: int, constexprs: dict[str, Any], num_warps: int, ptx_version: int | None) -> Any:
    """The Triton compilation of the kernel for SM ``arch`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = kernel_signature(dt) | {name: "constexpr" for name in constexprs}
    source = triton.compiler.ASTSource(fn=partial_rotary_kernel, signature=signature, constexprs=constexprs)
    options: dict[str, object] = {
        "num_warps": num_warps,
        "enable_fp_fusion": False,
        "ptx_version": MIN_PTX_VERSION[arch] if ptx_version is None else ptx_version,
    }
    try:
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # triton raises many types (CompilationError, RuntimeError, ...)
        raise BackendUnavailableError(
            f"triton {triton.__version__} failed to compile the partial_rotary kernel for sm_{arch}: {exc}",
            fix="install a triton release with CUDA support for this architecture (pip install 'triton>=3.2')",
        ) from exc


def _tensorrt_ptx(ptx: str, triton_name: str, name: str, arch: int, triton_version: str) -> tuple[str, str]:
    """Triton's PTX as TensorRT takes it: trailing scratch parameters dropped, the entry renamed to
    ``name``, the target made portable. Returns (ptx, target)."""
    try:
        ptx = rename_entry(strip_trailing_params(ptx, NUM_KERNEL_PARAMS), triton_name, name)
        entry, params = entry_params(ptx)
    except ValueError as exc:
        raise BackendUnavailableError(
            f"triton {triton_version} produced PTX this plugin cannot hand to TensorRT: {exc}",
            fix="use a triton release whose kernels need no scratch memory (3.2 to 3.9 are known to work)",
        ) from exc
    if entry != name or len(params) != NUM_KERNEL_PARAMS:
        raise BackendUnavailableError(f"unexpected PTX entry {entry!r} with {len(params)} parameters after rewriting")
    try:
        return _make_portable(ptx, arch, triton_version)
    except ValueError as exc:
        raise BackendUnavailableError(f"triton {triton_version} produced PTX without a target: {exc}") from exc


def compile_ptx(
    dtype: str,
    *,
    arch: int = 80,
    head_dim: int = 80,
    rotary_dim: int = 20,
    theta: float = 10000.0,
    block_h: int = DEFAULT_BLOCK_H,
    num_warps: int = DEFAULT_NUM_WARPS,
    ptx_version: int | None = None,
) -> CompiledPartialRotary:
    """Compile the kernel for ``dtype`` (fp32/fp16/bf16) and SM ``arch`` (80 = A100, 90 = H100) to PTX.

    ``ptx_version`` (e.g. 80 for PTX ISA 8.0) is the PTX ISA version written; by default the
    oldest that supports ``arch`` (:data:`MIN_PTX_VERSION`), which any recent driver can JIT.
    Works without a GPU.
    """
    import triton

    dt = validate_dtype(dtype)
    if arch not in SUPPORTED_ARCHS:
        raise InvalidArgumentError(
            f"unsupported SM arch {arch}", fix=f"use one of {', '.join(map(str, SUPPORTED_ARCHS))}"
        )
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise InvalidArgumentError(f"num_warps must be a power of two, got {num_warps}")
    constexprs = kernel_constexprs(head_dim=head_dim, rotary_dim=rotary_dim, theta=theta, block_h=block_h)
    compiled = _triton_compile(dt, arch, constexprs, num_warps, ptx_version)
    metadata, ptx = compiled.metadata, compiled.asm["ptx"]
    name = unique_kernel_name(
        dt, head_dim=head_dim, rotary_dim=rotary_dim, theta=theta, block_h=block_h, num_warps=num_warps
    )
    ptx, target = _tensorrt_ptx(
        ptx.decode() if isinstance(ptx, bytes) else ptx, metadata.name, name, arch, triton.__version__
    )
    return CompiledPartialRotary(
        kernel_name=name,
        ptx=ptx,
        dtype=dt,
        arch=arch,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        theta=float(theta),
        block_h=block_h,
        num_warps=int(metadata.num_warps),
        shared_mem=int(metadata.shared),
        ptx_target=target,
    )


def launch_with_cuda_driver(
    compiled: CompiledPartialRotary, q: Any, k: Any, position_ids: Any, q_out: Any, k_out: Any
) -> None:
    """Launch the PTX through the CUDA driver API with exactly TensorRT's 8 arguments (GPU check).

    ``q``/``k``/``position_ids``/``q_out``/``k_out`` are contiguous CUDA torch tensors; the launch
    goes on torch's current stream. This is how TensorRT runs the AOT kernel, minus TensorRT.
    """
    import ctypes

    import torch

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise BackendUnavailableError(
            "the CUDA driver (libcuda.so.1) is not available", fix="run on a GPU machine"
        ) from exc

    def check(status: int, what: str) -> None:
        if status != 0:
            raise BackendUnavailableError(f"{what} failed with CUDA driver error {status}")

    tensors = (q, k, position_ids, q_out, k_out)
    if not all(t.is_cuda and t.is_contiguous() for t in tensors):
        raise InvalidArgumentError("launch_with_cuda_driver needs contiguous CUDA tensors")
    torch.cuda.current_stream().synchronize()  # torch's primary context is current on this thread
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    check(libcuda.cuModuleLoadData(ctypes.byref(module), compiled.ptx.encode() + b"\0"), "cuModuleLoadData")
    try:
        name = compiled.kernel_name.encode()
        check(libcuda.cuModuleGetFunction(ctypes.byref(function), module, name), "cuModuleGetFunction")
        batch, n_q_heads, seq_len, _ = q.shape
        values = [
            ctypes.c_uint64(q.data_ptr()), ctypes.c_uint64(k.data_ptr()), ctypes.c_uint64(position_ids.data_ptr()),
            ctypes.c_int32(seq_len), ctypes.c_int32(n_q_heads), ctypes.c_int32(k.shape[1]),
            ctypes.c_uint64(q_out.data_ptr()), ctypes.c_uint64(k_out.data_ptr()),
        ]  # fmt: skip
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        grid, block = compiled.grid(batch, seq_len, n_q_heads, k.shape[1]), compiled.block
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(
            libcuda.cuLaunchKernel(function, *grid, *block, compiled.shared_mem, stream, params, None), "cuLaunchKernel"
        )
        torch.cuda.current_stream().synchronize()
    finally:
        libcuda.cuModuleUnload(module)
