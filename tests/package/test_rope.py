"""inv_freq, computed once (stlm.package.rope), against transformers' own computation in torch float32.

transformers evaluates ``theta ** (arange(0, d, 2) / d)`` as a torch tensor op. torch's CPU kernel
takes its scalar path (``std::pow`` = the C library's powf) for tensors shorter than two SIMD vectors
and its vector path (SLEEF powf) beyond, which can differ by an ulp: the same rotary width can give
transformers different bits on different CPUs. stlm computes the scalar path's value for every width,
so it is bit-equal to torch's scalar path everywhere and to transformers' tensor wherever torch takes
that path (StableLM-3B's rotary_dim 20 included); elsewhere within 2 ulps of it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stlm.package import rope
from stlm.package.config import model_config_from_hf

WIDTHS = list(range(2, 130, 2))
THETAS = [10000.0, 500000.0, 1e6, 10.0]


def transformers_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """What transformers' default rope initialisation computes (its code, on this CPU)."""
    return (1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))).numpy()


def torch_scalar_path(rotary_dim: int, theta: float) -> np.ndarray:
    """The same expression one element at a time (torch's scalar ``std::pow`` path)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return np.array([(1.0 / (theta ** exponents[i : i + 1])).item() for i in range(len(exponents))], np.float32)


def _lanes() -> int:
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 4)


@pytest.mark.parametrize("theta", THETAS)
def test_inv_freq_equals_torch_for_every_width(theta: float) -> None:
    for width in WIDTHS:
        ours = rope.inv_freq(width, theta)
        assert ours.dtype == np.float32 and ours.shape == (width // 2,)
        assert np.array_equal(ours, torch_scalar_path(width, theta)), width
        theirs = transformers_inv_freq(width, theta)
        if width // 2 < 2 * _lanes():  # torch's tensor op takes its scalar path: the same bits
            assert np.array_equal(ours, theirs), width
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2, width  # 1 ulp in the power, rounded again by the reciprocal


def test_stablelm_3b_rotary_is_bit_exact_with_transformers() -> None:
    from transformers import StableLmConfig
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

    config = StableLmConfig(
        hidden_size=2560,
        num_attention_heads=32,
        num_hidden_layers=1,
        intermediate_size=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    hf = StableLmRotaryEmbedding(config)
    cfg = model_config_from_hf({**config.to_dict(), "model_type": "stablelm"})
    assert cfg.rotary_dim == 20
    assert np.array_equal(rope.inv_freq(cfg.rotary_dim, cfg.rope_theta), hf.inv_freq.numpy())
    positions = torch.arange(4096)[None]
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    ours_cos, ours_sin = rope.cos_sin(np.arange(4096), cfg.rotary_dim, cfg.rope_theta)
    np.testing.assert_allclose(ours_cos, cos[0, :, :10].numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours_sin, sin[0, :, :10].numpy(), rtol=0, atol=2e-6)
    assert np.array_equal(
        rope.angles(np.arange(4096), 20, 10000.0), (positions[0, :, None].float() * hf.inv_freq).numpy()
    )
