"""Weight-only block quantization for ONNX Runtime's ``MatMulNBits`` (numpy in, MatMulNBits arrays out).

A Linear weight (N out, K in) is split into blocks of ``block_size`` along K; each block gets a
float scale and a zero point, and its values become ``bits``-bit unsigned integers, packed low bits
first in MatMulNBits' layout: B (N, k_blocks, block_size·bits/8) uint8, scales (N·k_blocks,).
A weight is ``(q - zero_point) · scale``. Zero points are packed uint8 (N, ceil(k_blocks·bits/8)),
float (N·k_blocks,) like the scales, or absent (symmetric: the grid's middle, 2^(bits-1)).

Methods (:data:`METHODS`):

* ``rtn`` — round to nearest, by ONNX Runtime's own block quantizer (``quantize_matmul_4bits`` /
  ``quantize_matmul_8bits``, MLAS, the code behind ``MatMulNBitsQuantizer``): asymmetric on each
  block's [min(w, 0), max(w, 0)], or symmetric on its largest magnitude.
* ``hqq`` — Half-Quadratic Quantization (Badri & Shaji, 2023) as ONNX Runtime's
  ``HQQWeightOnlyQuantizer`` does it, in numpy (ONNX Runtime's needs torch, the exporter must not):
  a min/max grid whose zero points are then optimized against an lp-norm (p = 0.7) of the
  weight error. Its zero points are floats, which MatMulNBits runs on a slower CPU path, and not
  at all with 8-bit weights: the 8-bit parts of an hqq quantization (its LM head) use rtn, since
  HQQ with integer zero points is round to nearest again. HQQ is a 4-bit method here.
* ``mse`` — a grid search per block over shrunk [min, max] ranges (integer zero points), keeping
  the range with the least squared weight error: MatMulNBits' fast path with clipped outliers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.package.variant import QUANTIZE_PRESETS, Quantization

METHODS: Final = ("rtn", "hqq", "mse")
BLOCK_SIZE: Final = 32
# HQQ's defaults (ONNX Runtime's HQQWeightOnlyQuantizer.optimize_weights).
HQQ_LP_NORM: Final = 0.7
HQQ_BETA: Final = 10.0
HQQ_KAPPA: Final = 1.01
HQQ_ITERATIONS: Final = 20
# The range shrink factors ``mse`` tries: 1.0 (plain min/max) down to 0.5.
MSE_SHRINKS: Final = tuple(1.0 - 0.025 * i for i in range(21))
_SLAB: Final = 8192  # blocks per slab of the numpy methods (cache-sized temporaries)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in MatMulNBits form (see the module docstring)."""

    packed: np.ndarray  # (N, k_blocks, blob) uint8
    scales: np.ndarray  # (N * k_blocks,) float32
    zero_points: np.ndarray | None  # packed uint8 (N, ceil(k_blocks * bits / 8)), float32 (N * k_blocks,), or None
    n: int
    k: int
    bits: int
    block_size: int


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """(N, K) → (N, k_blocks, block_size) float32, the last block padded with zeros."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float32)
    w[:, :k] = weight
    return w.reshape(n, blocks, block_size)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis, low bits first."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` values along the last axis."""
    if bits == 8:
        return packed[..., :count]
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out[..., :count]


def quantize_rtn(
    weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE, symmetric: bool = False
) -> QuantizedWeight:
    """Round to nearest with ONNX Runtime's block quantizer (MLAS)."""
    from onnxruntime.capi import _pybind_state

    quantize = getattr(_pybind_state, f"quantize_matmul_{bits}bits", None)
    if quantize is None:
        from stlm.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"this onnxruntime ({_pybind_state.get_version_string()}) has no {bits}-bit block quantizer "
            f"(quantize_matmul_{bits}bits), which --quantize int{bits} uses",
            fix="pip install -U onnxruntime (≥ 1.22)",
        )
    n, k = weight.shape
    blocks, per_byte = -(-k // block_size), 8 // bits
    transposed = np.zeros((blocks * block_size, n), np.float32)  # ORT takes (K, N), padded to whole blocks
    transposed[:k] = weight.T
    packed = np.zeros((n, blocks, -(-block_size // per_byte)), np.uint8)
    zero_points = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quantize(packed, transposed, scales, zero_points, block_size, n, k, symmetric)
    return QuantizedWeight(packed, scales.reshape(-1), None if symmetric else zero_points, n, k, bits, block_size)


def _hqq_slab(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ on blocks ``w`` (count, size) float32: the integers, scales and float zero points.

    The scales stay those of each block's min/max grid; the zero points take HQQ's proximal steps
    against the lp-norm of the weight error, stopping when the slab's mean error no longer falls.
    """
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
    inv_scale = np.minimum(qmax / np.where(hi - lo == 0, qmax, hi - lo), np.float32(2e4)).astype(np.float32)
    zero = np.round(-lo * inv_scale)
    beta, best, best_zero = HQQ_BETA, np.inf, zero
    for _ in range(HQQ_ITERATIONS):
        wq = np.clip(np.round(w * inv_scale + zero), 0, qmax)
        error = w - (wq - zero) / inv_scale
        magnitude = np.abs(error)
        mean_error = float(magnitude.mean())
        if mean_error >= best:
            break
        best, best_zero = mean_error, zero
        shrunk = np.sign(error) * np.maximum(magnitude - np.power(magnitude + 1e-8, HQQ_LP_NORM - 1) / beta, 0)
        zero = np.mean(wq - (w - shrunk) * inv_scale, axis=-1, keepdims=True)
        beta *= HQQ_KAPPA
    q = np.clip(np.round(w * inv_scale + best_zero), 0, qmax)
    return q.astype(np.uint8), (1 / inv_scale)[:, 0], best_zero[:, 0].astype(np.float32)


Slab = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _by_slabs(weight: np.ndarray, bits: int, block_size: int, slab: Slab) -> tuple[np.ndarray, ...]:
    """``slab`` over the blocks of ``weight``, :data:`_SLAB` blocks at a time: integers (N, k_blocks,
    block_size), scales and zero points (N * k_blocks,)."""
    w = _blocks(weight, block_size).reshape(-1, block_size)
    q, scales, zeros = np.empty(w.shape, np.uint8), np.empty(len(w), np.float32), np.empty(len(w), np.float32)
    for start in range(0, len(w), _SLAB):
        part = slice(start, start + _SLAB)
        q[part], scales[part], zeros[part] = slab(w[part], (1 << bits) - 1)
    return q.reshape(weight.shape[0], -1, block_size), scales, zeros


def quantize_hqq(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """Half-Quadratic Quantization (see the module docstring), slab by slab of blocks: float zero points."""
    q, scales, zeros = _by_slabs(weight, bits, block_size, _hqq_slab)
    n, k = weight.shape
    return QuantizedWeight(pack(q, bits), scales, zeros, n, k, bits, block_size)


def _mse_slab(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The least-squared-error grid of :data:`MSE_SHRINKS` for blocks ``w`` (count, size): integers, scales, zeros."""
    lo, hi = np.minimum(w.min(axis=-1), 0.0), np.maximum(w.max(axis=-1), 0.0)
    best_err = np.full(lo.shape, np.inf, np.float32)
    best_scale, best_zero = np.ones_like(lo), np.zeros_like(lo)
    for shrink in MSE_SHRINKS:
        scale = (hi - lo) * np.float32(shrink / qmax)
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-lo * np.float32(shrink) / scale), 0, qmax)
        q = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, qmax)
        err = np.square((q - zero[:, None]) * scale[:, None] - w).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    q = np.clip(np.round(w / best_scale[:, None]) + best_zero[:, None], 0, qmax)
    return q.astype(np.uint8), best_scale, best_zero


def quantize_mse(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """Per block, the asymmetric grid over ``[s·min, s·max]`` (``s`` in :data:`MSE_SHRINKS`) with the least squared error."""
    q, scales, zeros = _by_slabs(weight, bits, block_size, _mse_slab)
    zero_points = pack(zeros.reshape(weight.shape[0], -1), bits)
    n, k = weight.shape
    return QuantizedWeight(pack(q, bits), scales, zero_points, n, k, bits, block_size)


def quantize_weight(
    weight: np.ndarray, bits: int, *, method: str = "rtn", block_size: int = BLOCK_SIZE, symmetric: bool = False
) -> QuantizedWeight:
    """``weight`` (N, K) float in MatMulNBits form by ``method`` (:data:`METHODS`; ``symmetric`` applies to rtn;
    8-bit weights of an hqq quantization use rtn, see the module docstring)."""
    if method == "hqq" and bits == 4:
        return quantize_hqq(weight, bits, block_size)
    if method == "mse":
        return quantize_mse(weight, bits, block_size)
    return quantize_rtn(weight, bits, block_size, symmetric)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The (N, K) float32 weight that ``qw`` represents (as MatMulNBits computes it)."""
    blocks = qw.packed.shape[1]
    q = unpack(qw.packed, qw.bits, qw.block_size).astype(np.float32)
    if qw.zero_points is None:
        zero = np.full((qw.n, blocks), 1 << (qw.bits - 1), np.float32)
    elif qw.zero_points.dtype == np.uint8:
        zero = unpack(qw.zero_points, qw.bits, blocks).astype(np.float32)
    else:
        zero = qw.zero_points.reshape(qw.n, blocks).astype(np.float32)
    w = (q - zero[..., None]) * qw.scales.reshape(qw.n, blocks)[..., None]
    return w.reshape(qw.n, -1)[:, : qw.k]


# -- the scheme: what --quantize asks for ---------------------------------------------------------
_KEYS: Final = {
    "method": "method",
    "block": "block_size",
    "sym": "symmetric",
    "head": "lm_head_bits",
    "edge": "edge_bits",
    "acc": "accuracy_level",
}
PRESETS: Final = QUANTIZE_PRESETS
QUANTIZE_HELP: Final = (
    "PRESET[:key=value,...]; presets " + ", ".join(PRESETS) + "; keys method=rtn|hqq|mse, block=16..256 (power of "
    "two), sym=0|1, head=4|8, edge=4|8 (first and last layer), acc=0|1|2|3|4 (MatMulNBits accuracy level)"
)


def _parse_value(key: str, text: str) -> Any:
    if key == "method":
        if text not in METHODS:
            raise ValueError(f"method {text!r} is not one of {', '.join(METHODS)}")
        return text
    if key == "sym":
        if text not in ("0", "1"):
            raise ValueError(f"sym={text} is not 0 or 1")
        return text == "1"
    value = int(text)
    if key == "block" and not (16 <= value <= 256 and value & (value - 1) == 0):
        raise ValueError(f"block={value} is not a power of two in 16..256")
    if key in ("head", "edge") and value not in (4, 8):
        raise ValueError(f"{key}={value} is not 4 or 8")
    if key == "acc" and not 0 <= value <= 4:
        raise ValueError(f"acc={value} is not in 0..4")
    return value


def parse_quantization(spec: str) -> Quantization:
    """``--quantize`` text (:data:`QUANTIZE_HELP`) → :class:`Quantization`; a bad spec is an InvalidArgumentError."""
    name, _, overrides = spec.partition(":")
    if name not in PRESETS:
        raise InvalidArgumentError(
            f"unknown quantization {spec!r}; expected one of {', '.join(PRESETS)} (optionally :key=value,...)",
            fix=f"pass --quantize {QUANTIZE_HELP}",
        )
    changes: dict[str, Any] = {}
    try:
        for item in filter(None, overrides.split(",")):
            key, eq, text = item.partition("=")
            if not eq or key not in _KEYS:
                raise ValueError(f"{item!r} is not key=value with a key of {', '.join(_KEYS)}")
            changes[_KEYS[key]] = _parse_value(key, text.strip())
    except ValueError as exc:
        raise InvalidArgumentError(f"bad --quantize {spec!r}: {exc}", fix=f"pass --quantize {QUANTIZE_HELP}") from None
    quant = replace(PRESETS[name], **changes)
    if quant.method == "hqq" and quant.bits != 4:
        raise InvalidArgumentError(
            f"bad --quantize {spec!r}: method=hqq is for 4-bit weights (its float zero points have no 8-bit "
            "CPU kernel; with integer ones it is rtn)",
            fix="use int8 (rtn) or int8:method=mse",
        )
    if quant.symmetric and quant.method != "rtn":
        raise InvalidArgumentError(
            f"bad --quantize {spec!r}: sym=1 applies to method=rtn only", fix="drop sym=1, or use method=rtn"
        )
    return quant
