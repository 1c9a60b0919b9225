"""Triton kernel for the partial rotary embedding, and its launcher for torch tensors.

One program handles one token ``(b, s)`` and a block of ``BLOCK_H`` heads of q or of k: it loads
the token's position, computes the ``rotary_dim / 2`` angles and their cos/sin once in float32,
and applies them to every head of the block. The kernel is out-of-place: it writes all of
``q_out``/``k_out``, copying the pass-through dims ``[rotary_dim, head_dim)`` unchanged.

Numerics (see ``reference.py``): the inverse frequencies are computed on the host exactly as
PyTorch does and baked into the kernel as a ``constexpr`` tuple; angles and cos/sin are float32;
cos/sin, each product and the sum are rounded to the q/k dtype exactly where the PyTorch model
rounds them (no-ops for float32), so fp16/bf16 results match transformers bit for bit up to the
last-ulp differences of float32 cos/sin. FMA contraction is disabled for the same reason.

Argument order ``(q, k, position_ids, seq_len, n_q_heads, n_k_heads, q_out, k_out)`` is the one a
TensorRT AOT plugin launch uses: inputs, then int32 scalars, then outputs (see ``aot.py``).
Tensors must be contiguous (batch, heads, seq, head_dim); ``position_ids`` contiguous (batch, seq).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import triton
import triton.language as tl

from stlm.errors import InvalidArgumentError
from stlm.plugins.partial_rotary.reference import rotary_inv_freq
from stlm.plugins.partial_rotary.spec import validate_attributes

if TYPE_CHECKING:
    import torch

DEFAULT_BLOCK_H: Final = 8
DEFAULT_NUM_WARPS: Final = 2
KERNEL_ARG_NAMES: Final = ("q_ptr", "k_ptr", "pos_ptr", "seq_len", "n_q_heads", "n_k_heads", "q_out_ptr", "k_out_ptr")


@triton.jit
def _round_to(x, dtype: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton values
    """Round float32 ``x`` to ``dtype`` (nearest, ties to even) and widen it back; float32: no-op.

    bfloat16 rounding is done on the bits so that it is the same on GPUs and in the Triton
    interpreter (whose float32 -> bfloat16 cast truncates).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        result = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float16:
        result = x.to(tl.float16).to(tl.float32)
    else:
        result = x
    return result


@triton.jit
def _rotate_heads(  # type: ignore[no-untyped-def]  # Triton pointers and values
    x_ptr,
    out_ptr,
    batch,
    seq_pos,
    head_block,
    n_heads,
    seq_len,
    cos,
    sin,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS: tl.constexpr,
    PASS_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate ``BLOCK_H`` heads of one token of ``x`` (b, h, s, d) into ``out``; copy the rest."""
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < n_heads
    # Row start of x[batch, head, seq_pos, :], in int64 so that large tensors cannot overflow.
    rows = ((batch * n_heads + heads).to(tl.int64) * seq_len + seq_pos) * HEAD_DIM
    dims = tl.arange(0, HALF_P)
    mask = head_ok[:, None] & (dims < HALF)[None, :]
    first = rows[:, None] + dims[None, :]
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + first + HALF, mask=mask, other=0.0)
    c = _round_to(cos, x1.dtype)[None, :]
    s = _round_to(sin, x1.dtype)[None, :]
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # out[:half] = x1*cos + (-x2)*sin ; out[half:] = x2*cos + x1*sin  (rounded like the model)
    o1 = _round_to(_round_to(x1f * c, x1.dtype) - _round_to(x2f * s, x1.dtype), x1.dtype)
    o2 = _round_to(_round_to(x2f * c, x1.dtype) + _round_to(x1f * s, x1.dtype), x1.dtype)
    tl.store(out_ptr + first, o1.to(x1.dtype), mask=mask)
    tl.store(out_ptr + first + HALF, o2.to(x1.dtype), mask=mask)
    if PASS > 0:
        rest = tl.arange(0, PASS_P)
        rest_mask = head_ok[:, None] & (rest < PASS)[None, :]
        offsets = rows[:, None] + (2 * HALF) + rest[None, :]
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=rest_mask), mask=rest_mask)


@triton.jit
def partial_rotary_kernel(  # type: ignore[no-untyped-def]  # Triton pointers and values
    q_ptr,
    k_ptr,
    pos_ptr,
    seq_len,
    n_q_heads,
    n_k_heads,
    q_out_ptr,
    k_out_ptr,
    INV_FREQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_P: tl.constexpr,
    PASS_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Grid: (batch * seq_len, cdiv(n_q_heads, BLOCK_H) + cdiv(n_k_heads, BLOCK_H)).

    ``HALF_P``/``PASS_P``: powers of two >= ``ROTARY_DIM // 2`` and ``HEAD_DIM - ROTARY_DIM``.
    """
    HALF: tl.constexpr = ROTARY_DIM // 2
    PASS: tl.constexpr = HEAD_DIM - ROTARY_DIM
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    batch = token // seq_len
    seq_pos = token % seq_len
    position = tl.load(pos_ptr + token).to(tl.float32)
    lanes = tl.arange(0, HALF_P)
    inv_freq = tl.zeros([HALF_P], dtype=tl.float32)
    for i in tl.static_range(HALF):
        inv_freq = tl.where(lanes == i, INV_FREQ[i], inv_freq)
    angle = position * inv_freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if head_block < n_q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, batch, seq_pos, head_block, n_q_heads, seq_len, cos, sin,
                      HEAD_DIM, HALF, HALF_P, PASS, PASS_P, BLOCK_H)  # fmt: skip
    else:
        _rotate_heads(k_ptr, k_out_ptr, batch, seq_pos, head_block - n_q_blocks, n_k_heads, seq_len, cos, sin,
                      HEAD_DIM, HALF, HALF_P, PASS, PASS_P, BLOCK_H)  # fmt: skip


def inv_freq_constexpr(rotary_dim: int, theta: float) -> tuple[float, ...]:
    """The ``INV_FREQ`` constexpr: float32 inverse frequencies as Python floats (exact)."""
    return tuple(float(v) for v in rotary_inv_freq(rotary_dim, theta))


def kernel_constexprs(*, head_dim: int, rotary_dim: int, theta: float, block_h: int) -> dict[str, Any]:
    """The constexpr arguments of :func:`partial_rotary_kernel` (validated)."""
    validate_attributes(rotary_dim, theta, head_dim)
    if block_h < 1 or block_h & (block_h - 1):
        raise InvalidArgumentError(f"block_h must be a power of two, got {block_h}")
    return {
        "INV_FREQ": inv_freq_constexpr(rotary_dim, theta),
        "HEAD_DIM": head_dim,
        "ROTARY_DIM": rotary_dim,
        "HALF_P": triton.next_power_of_2(rotary_dim // 2),
        "PASS_P": triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
        "BLOCK_H": block_h,
    }


def launch_grid(batch: int, seq_len: int, n_q_heads: int, n_k_heads: int, block_h: int) -> tuple[int, int, int]:
    """The launch grid for the given shapes (pure)."""
    return batch * seq_len, triton.cdiv(n_q_heads, block_h) + triton.cdiv(n_k_heads, block_h), 1


def _check_tensors(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> None:
    import torch

    if q.dim() != 4 or k.dim() != 4:
        raise InvalidArgumentError(
            f"q and k must be 4-D (batch, heads, seq, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidArgumentError(
            f"q and k must share one dtype among float32/float16/bfloat16, got {q.dtype}, {k.dtype}"
        )
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise InvalidArgumentError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim")
    if tuple(position_ids.shape) != (batch, seq) or position_ids.dtype not in (torch.int64, torch.int32):
        raise InvalidArgumentError(
            f"position_ids must be int64 (or int32) of shape {(batch, seq)}, "
            f"got {position_ids.dtype} {tuple(position_ids.shape)}"
        )
    if not (q.device == k.device == position_ids.device):
        raise InvalidArgumentError(
            f"q, k and position_ids must be on one device, got {q.device}, {k.device}, {position_ids.device}"
        )


def partial_rotary_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    rotary_dim: int,
    theta: float,
    block_h: int = DEFAULT_BLOCK_H,
    num_warps: int = DEFAULT_NUM_WARPS,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(q_out, k_out)`` computed by the Triton kernel (new tensors unless ``out`` is given).

    Inputs that are not contiguous are copied first. ``out`` (contiguous, same shapes/dtypes) is
    used by the TensorRT JIT implementation to write into TensorRT's buffers. Runs on CUDA, or on
    CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    import torch

    _check_tensors(q, k, position_ids)
    batch, n_q_heads, seq_len, head_dim = q.shape
    constexprs = kernel_constexprs(head_dim=head_dim, rotary_dim=rotary_dim, theta=theta, block_h=block_h)
    q, k, position_ids = q.contiguous(), k.contiguous(), position_ids.contiguous()
    if out is None:
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    else:
        q_out, k_out = out
        if q_out.shape != q.shape or k_out.shape != k.shape or q_out.dtype != q.dtype or k_out.dtype != k.dtype:
            raise InvalidArgumentError("out tensors must have the shapes and dtype of q and k")
        if not (q_out.is_contiguous() and k_out.is_contiguous()):
            raise InvalidArgumentError("out tensors must be contiguous")
    grid = launch_grid(batch, seq_len, n_q_heads, k.shape[1], block_h)
    if grid[0] == 0 or grid[1] == 0 or head_dim == 0:
        return q_out, k_out
    partial_rotary_kernel[grid](
        q, k, position_ids, seq_len, n_q_heads, k.shape[1], q_out, k_out,
        **constexprs, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out
