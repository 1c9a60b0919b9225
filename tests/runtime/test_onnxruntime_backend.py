"""The one ONNX Runtime backend: IOBinding on the CPU provider (the code the CUDA provider runs),
the in-place step plan, every position's logits, bfloat16 caches through OrtValues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.package.contract import INPUT_IDS, LOGITS_INDEX, SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from stlm.package.manifest import read_manifest
from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend
from stlm.runtime.ort_session import CUDA_PROVIDER
from stlm.runtime.steps import DUMMY_TOKEN, plan_inplace_step


def _backend(folder: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(folder, read_manifest(folder), device="cpu")


@pytest.mark.parametrize("shape", ["hd16", "hd64"])
def test_inplace_and_concat_graphs_agree_on_a_ragged_schedule(packages: dict[str, Path], shape: str) -> None:
    """New prompts join rows that are decoding, rows idle, fill up and restart: the in-place plan
    (split calls, dummy tokens, per-row slices) gives the concat graph's logits (fp32: to 1e-5)."""
    backends = [_backend(packages[shape]), _backend(packages[f"{shape}-inplace"])]
    rng = np.random.default_rng(0)
    batch, capacity = 3, 12
    caches = [b.new_cache(batch, capacity) for b in backends]
    lengths = np.zeros(batch, dtype=np.int64)
    for step in range(16):
        feed: list[list[int]] = []
        for r in range(batch):
            n = 0 if step and rng.random() < 0.25 else int(rng.integers(2, 7)) if lengths[r] == 0 else 1
            if lengths[r] + n > capacity:  # the row is full: release it and start a new prompt
                for backend, cache in zip(backends, caches, strict=True):
                    backend.release(cache, r)
                lengths[r], n = 0, int(rng.integers(2, 5))
            feed.append(rng.integers(0, 50000, size=n).tolist())
            lengths[r] += n
        concat, inplace = (backend.forward(cache, feed) for backend, cache in zip(backends, caches, strict=True))
        fed = [r for r in range(batch) if feed[r]]
        np.testing.assert_allclose(inplace[fed], concat[fed], rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
        for cache in caches:
            np.testing.assert_array_equal(cache.lengths, lengths)


def test_plan_batches_decode_and_first_prompts_and_splits_mixed_steps() -> None:
    lengths = np.array([5, 0, 3])
    decode = plan_inplace_step([[7], [], [8]], lengths)
    assert len(decode) == 1 and decode[0].results == (0, 2)
    feeds = decode[0].feeds
    assert feeds[INPUT_IDS].tolist() == [[7], [DUMMY_TOKEN], [8]]
    assert feeds[SEQLENS_K].tolist() == [5, 0, 3]  # the idle row's dummy lands at slot `length`, uncounted
    assert int(feeds[TOTAL_SEQUENCE_LENGTH]) == 6 and feeds[LOGITS_INDEX].tolist() == [[0], [0], [0]]

    first = plan_inplace_step([[1, 2, 3], [4], []], np.zeros(3, np.int64))
    assert len(first) == 1 and first[0].results == (0, 1)
    assert first[0].feeds[SEQLENS_K].tolist() == [2, 0, 0] and int(first[0].feeds[TOTAL_SEQUENCE_LENGTH]) == 3
    assert first[0].feeds[LOGITS_INDEX].tolist() == [[2], [0], [0]]

    mixed = plan_inplace_step([[9], [1, 2, 3, 4], [5, 6]], lengths)
    assert [(c.first_row, c.batch, c.results) for c in mixed] == [(0, 3, (0,)), (1, 1, (1,)), (2, 1, (2,))]
    assert mixed[0].feeds[INPUT_IDS].tolist() == [[9], [DUMMY_TOKEN], [DUMMY_TOKEN]]
    assert mixed[1].feeds[SEQLENS_K].tolist() == [3] and int(mixed[1].feeds[TOTAL_SEQUENCE_LENGTH]) == 4
    assert mixed[2].feeds[SEQLENS_K].tolist() == [4] and int(mixed[2].feeds[TOTAL_SEQUENCE_LENGTH]) == 5
    every = plan_inplace_step([[9], [1, 2, 3, 4], []], lengths, every_position=True)
    assert every[1].feeds[LOGITS_INDEX].tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("variant", ["hd16", "hd16-inplace"])
def test_forward_all_gives_forward_at_every_position(packages: dict[str, Path], variant: str) -> None:
    """Every position's logits from one call equal the last-token logits of feeding token by token."""
    backend = _backend(packages[variant])
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (6, 3, 0)]
    every = backend.forward_all(backend.new_cache(3, 8), prompts)
    assert [e.shape for e in every] == [(6, 50304), (3, 50304), (0, 50304)]
    one_by_one = backend.new_cache(3, 8)
    for i in range(6):
        step = backend.forward(one_by_one, [p[i : i + 1] for p in prompts])
        for r, p in enumerate(prompts):
            if i < len(p):
                np.testing.assert_allclose(every[r][i], step[r], rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_a_clear_error(packages: dict[str, Path]) -> None:
    backend = _backend(packages["hd16-inplace"])
    cache = backend.new_cache(1, 4)
    backend.forward(cache, [[1, 2, 3, 4]])
    with pytest.raises(InvalidArgumentError, match="holds 4"):
        backend.forward(cache, [[5]])


def test_device_choice_without_cuda(package: Path) -> None:
    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    manifest = read_manifest(package)
    assert OnnxRuntimeBackend(package, manifest).device == "cpu"
    with pytest.raises(BackendUnavailableError) as err:
        OnnxRuntimeBackend(package, manifest, device="cuda")
    assert "CUDA execution provider" in str(err.value)


def test_sessions_do_not_spin_and_take_the_thread_count(package: Path) -> None:
    """Intra-op threads block between parallel sections (spinning ones starve busy shared cores:
    docs/benchmarks.md); ``threads`` sets the pool size."""
    backend = OnnxRuntimeBackend(package, read_manifest(package), device="cpu", threads=2)
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2


def test_spinning_can_be_restored_for_dedicated_machines(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STLM_ORT_ALLOW_SPINNING", "1")
    backend = OnnxRuntimeBackend(package, read_manifest(package), device="cpu", threads=2)
    assert backend.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
