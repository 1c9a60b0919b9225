"""Weight-only block quantization for ONNX Runtime's ``MatMulNBits`` (pure numpy functions).

A Linear weight (N out, K in) is split into blocks of ``block_size`` along K; each block gets a
float scale and an unsigned zero point (asymmetric, min/max), values are stored as ``bits``-bit
unsigned integers packed low-nibble first, exactly in MatMulNBits' layout:
B (N, k_blocks, block_size·bits/8) uint8, scales (N·k_blocks,), zero points (N, ceil(k_blocks·bits/8)) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANT_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in MatMulNBits form."""

    packed: np.ndarray  # (N, k_blocks, blob) uint8
    scales: np.ndarray  # (N * k_blocks,) float32
    zero_points: np.ndarray  # (N, ceil(k_blocks * bits / 8)) uint8
    n: int
    k: int
    bits: int
    block_size: int


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis, low bits first."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out[..., :count]


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """Quantize ``weight`` (N, K) float to ``bits`` bits per value, blocks of ``block_size`` along K."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float32)
    w[:, :k] = weight
    w = w.reshape(n, blocks, block_size)
    qmax = (1 << bits) - 1
    lo = np.minimum(w.min(axis=2), 0.0)
    hi = np.maximum(w.max(axis=2), 0.0)
    scale = (hi - lo) / qmax
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, qmax)
    return QuantizedWeight(
        packed=_pack(q, bits),
        scales=scale.astype(np.float32).reshape(-1),
        zero_points=_pack(zero, bits),
        n=n,
        k=k,
        bits=bits,
        block_size=block_size,
    )


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The (N, K) float32 weight that ``qw`` represents (reference for tests)."""
    blocks = qw.packed.shape[1]
    q = _unpack(qw.packed, qw.bits, qw.block_size).astype(np.float32)
    zero = _unpack(qw.zero_points, qw.bits, blocks).astype(np.float32)
    w = (q - zero[..., None]) * qw.scales.reshape(qw.n, blocks)[..., None]
    return w.reshape(qw.n, -1)[:, : qw.k]
