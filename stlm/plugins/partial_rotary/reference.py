"""Pure numpy reference of the partial rotary embedding (transformers' StableLM semantics).

Numerics follow the PyTorch model step by step so that the plugin can be held to it exactly:

* ``inv_freq`` from :func:`stlm.package.rope.inv_freq` (the one place it is computed: float32, the power
  correctly rounded, as PyTorch's scalar CPU path computes it);
* ``freqs = float32(position) * inv_freq``; ``cos``/``sin`` in float32, then cast to the q/k dtype;
* ``x * cos + rotate_half(x) * sin`` in the q/k dtype, each product and the sum rounded to it.

bfloat16 arrays use ``ml_dtypes.bfloat16`` (as ONNX Runtime returns them).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from stlm.errors import InvalidArgumentError
from stlm.package import rope
from stlm.plugins.partial_rotary.spec import MAX_POSITION, validate_attributes

SUPPORTED_NUMPY_DTYPES: Final = ("float32", "float16", "bfloat16")


def rotary_inv_freq(rotary_dim: int, theta: float) -> npt.NDArray[np.float32]:
    """Return the ``rotary_dim // 2`` inverse frequencies as float32 (:func:`stlm.package.rope.inv_freq`)."""
    validate_attributes(rotary_dim, theta)
    return rope.inv_freq(rotary_dim, theta)


def rotary_cos_sin(
    position_ids: npt.NDArray[np.integer], rotary_dim: int, theta: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Return float32 ``cos, sin`` of shape ``position_ids.shape + (rotary_dim,)`` (freqs repeated twice)."""
    validate_attributes(rotary_dim, theta)
    cos, sin = rope.cos_sin(position_ids, rotary_dim, theta)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def _check_inputs(q: np.ndarray, k: np.ndarray, position_ids: np.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise InvalidArgumentError(
            f"q and k must be 4-D (batch, heads, seq, head_dim), got shapes {q.shape} and {k.shape}"
        )
    if q.dtype != k.dtype or q.dtype.name not in SUPPORTED_NUMPY_DTYPES:
        raise InvalidArgumentError(
            f"q and k must share one dtype among {', '.join(SUPPORTED_NUMPY_DTYPES)}, got {q.dtype} and {k.dtype}"
        )
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise InvalidArgumentError(
            f"k {k.shape} must match q {q.shape} in batch, seq and head_dim", fix="pass q and k of one attention layer"
        )
    if position_ids.shape != (batch, seq) or not np.issubdtype(position_ids.dtype, np.integer):
        raise InvalidArgumentError(
            f"position_ids must be an integer array of shape {(batch, seq)}, "
            f"got {position_ids.dtype} {position_ids.shape}"
        )
    if position_ids.size and (position_ids.min() < 0 or position_ids.max() >= MAX_POSITION):
        raise InvalidArgumentError(
            f"positions must lie in [0, 2**24), got [{position_ids.min()}, {position_ids.max()}]"
        )


def apply_partial_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary_dim: int) -> np.ndarray:
    """Rotate the first ``rotary_dim`` dims of ``x`` (batch, heads, seq, head_dim) with fp32 ``cos``/``sin``.

    ``cos``/``sin`` have shape (batch, seq, rotary_dim); they are cast to ``x.dtype`` and the
    arithmetic runs in ``x.dtype``, as in transformers' ``apply_rotary_pos_emb``.
    """
    half = rotary_dim // 2
    c = cos.astype(x.dtype)[:, None]
    s = sin.astype(x.dtype)[:, None]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated_half = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out_rot = (x_rot * c + rotated_half * s).astype(x.dtype)
    return np.concatenate([out_rot, x_pass], axis=-1)


def partial_rotary_reference(
    q: np.ndarray, k: np.ndarray, position_ids: np.ndarray, *, rotary_dim: int, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(q_out, k_out)``: the partial rotary embedding of q and k (same shapes and dtype).

    ``q``: (batch, num_heads, seq, head_dim), ``k``: (batch, num_kv_heads, seq, head_dim), float32,
    float16 or ``ml_dtypes.bfloat16``; ``position_ids``: (batch, seq) integers in [0, 2**24).
    """
    q, k, position_ids = np.asarray(q), np.asarray(k), np.asarray(position_ids)
    _check_inputs(q, k, position_ids)
    validate_attributes(rotary_dim, theta, q.shape[-1])
    cos, sin = rotary_cos_sin(position_ids, rotary_dim, theta)
    return apply_partial_rotary(q, cos, sin, rotary_dim), apply_partial_rotary(k, cos, sin, rotary_dim)
