"""The rotary embedding's frequencies and angle tables, computed once for the exporter and the plugin.

transformers computes ``inv_freq = 1 / theta ** (arange(0, rotary_dim, 2) / rotary_dim)`` in
torch float32. Here the exponent is the same float32 division and each power is the C library's
``powf`` (numpy's float32 scalar power), which is what torch's scalar CPU path (``std::pow``)
returns, bit for bit. torch takes that path for tensors shorter than two SIMD vectors (rotary_dim
< 32 on AVX2, < 64 on AVX-512; StableLM-3B's rotary_dim is 20); for longer ones its vector path
(SLEEF ``powf``) can be 1 ulp away, so transformers' own value then depends on the CPU it
initialised on. numpy's float32 *array* ``power`` (SIMD) and a float64 power rounded once both
differ from torch's scalar path for some widths.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def inv_freq(rotary_dim: int, theta: float) -> npt.NDArray[np.float32]:
    """The ``rotary_dim // 2`` inverse frequencies, float32 (see the module docstring)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    base = np.float32(theta)
    powers = np.array([base**e for e in exponents], dtype=np.float32)  # scalar powf, element by element
    return np.float32(1.0) / powers


def angles(positions: npt.ArrayLike, rotary_dim: int, theta: float) -> npt.NDArray[np.float32]:
    """``float32(position) * inv_freq``: shape ``positions.shape + (rotary_dim // 2,)``, float32."""
    return np.asarray(positions).astype(np.float32)[..., None] * inv_freq(rotary_dim, theta)


def cos_sin(positions: npt.ArrayLike, rotary_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos and sin of :func:`angles` (half width: each pair's angle once)."""
    freqs = angles(positions, rotary_dim, theta)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
