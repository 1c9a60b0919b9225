"""GPU check of the partial-rotary kernel at StableLM-3B shapes (needs PyTorch + Triton on CUDA, not TensorRT).

For batch 1/2/4/8 x seq 1/512 x fp16/bf16 (32 heads, head dim 80, rotary dim 20, theta 10000):

* correctness of the Triton kernel (JIT launch) against an eager PyTorch rotary written like
  transformers' StableLM code, and against the numpy reference (bf16 needs ml_dtypes);
* the AOT PTX (what the TensorRT plugin bakes into engines) launched through the CUDA driver with
  TensorRT's 8 arguments, which must give the JIT kernel's bits: the default sm_80 PTX, and on a
  GPU of compute capability >= 9.0 also the portable sm_90 PTX (``STLM_PARTIAL_ROTARY_SM=90``);
* GPU time per call of the eager rotary and of the kernel for each tile (TensorRT tactic),
  measured by replaying CUDA graphs of back-to-back calls, median over many replays (CUDA events).

Run: ``PYTHONPATH=. python scripts/gpu_kernel_check.py [--quick]``; ``scripts/gpu_check.sh`` (the GPU
acceptance run) runs it as one of its steps. Exit status 1 on a mismatch, 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stlm.plugins.partial_rotary.aot import compile_ptx, launch_with_cuda_driver
from stlm.plugins.partial_rotary.kernel import partial_rotary_triton
from stlm.plugins.partial_rotary.plugin import TACTICS
from stlm.plugins.partial_rotary.reference import partial_rotary_reference, rotary_inv_freq

log = logging.getLogger("gpu_check")

HEADS, HEAD_DIM, ROTARY_DIM, THETA, MAX_POS = 32, 80, 20, 10000.0, 4096
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def eager_rotary(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' StableLmRotaryEmbedding.forward + partial apply_rotary_pos_emb, in eager PyTorch."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype)[:, None], emb.sin().to(q.dtype)[:, None]

    def apply(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :ROTARY_DIM], x[..., ROTARY_DIM:]
        half = ROTARY_DIM // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)

    return apply(q), apply(k)


def gpu_time_us(fn: Callable[[], Any], *, calls_per_graph: int = 20, replays: int = 50) -> float:
    """Median GPU time of one ``fn()`` call, from CUDA-graph replays of back-to-back calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / calls_per_graph)
    return statistics.median(samples)


def numpy_dtype(name: str) -> Any:
    if name == "fp16":
        return np.float16
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def check_case(
    name: str, batch: int, seq: int, *, with_reference: bool, aot: dict[tuple[str, int, int], Any]
) -> dict[str, Any]:
    """Check and time one shape; returns one table row."""
    dtype = DTYPES[name]
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + seq)
    q = torch.randn(batch, HEADS, seq, HEAD_DIM, device="cuda", generator=gen).mul_(3).to(dtype)
    k = torch.randn(batch, HEADS, seq, HEAD_DIM, device="cuda", generator=gen).mul_(3).to(dtype)
    if seq == 1:
        pos = torch.randint(0, MAX_POS, (batch, 1), device="cuda", generator=gen)
    else:
        start = torch.randint(0, MAX_POS - seq + 1, (batch, 1), device="cuda", generator=gen)
        pos = torch.arange(seq, device="cuda")[None] + start
    inv_freq = torch.from_numpy(rotary_inv_freq(ROTARY_DIM, THETA)).cuda()
    row: dict[str, Any] = {"dtype": name, "batch": batch, "seq": seq}

    q_out, k_out = partial_rotary_triton(q, k, pos, rotary_dim=ROTARY_DIM, theta=THETA)
    q_eager, k_eager = eager_rotary(q, k, pos, inv_freq)
    row["vs_eager"] = max((a.float() - b.float()).abs().max().item() for a, b in ((q_out, q_eager), (k_out, k_eager)))
    row["eager_exact"] = bool(torch.equal(q_out, q_eager) and torch.equal(k_out, k_eager))

    np_dtype = numpy_dtype(name)
    if with_reference and np_dtype is not None:
        arrays = [t.float().cpu().numpy().astype(np_dtype) for t in (q, k)]
        q_ref, k_ref = partial_rotary_reference(*arrays, pos.cpu().numpy(), rotary_dim=ROTARY_DIM, theta=THETA)
        got = [t.float().cpu().numpy() for t in (q_out, k_out)]
        row["vs_ref"] = max(
            float(np.abs(g - r.astype(np.float32)).max()) for g, r in zip(got, (q_ref, k_ref), strict=True)
        )
    else:
        row["vs_ref"] = None

    aot_q, aot_k = torch.empty_like(q), torch.empty_like(k)
    row["aot_exact"] = True
    for (dtype_name, tactic, _arch), compiled in aot.items():
        if dtype_name != name:
            continue
        block_h, num_warps = TACTICS[tactic]
        launch_with_cuda_driver(compiled, q, k, pos, aot_q, aot_k)
        jit_q, jit_k = partial_rotary_triton(
            q, k, pos, rotary_dim=ROTARY_DIM, theta=THETA, block_h=block_h, num_warps=num_warps
        )
        row["aot_exact"] &= bool(torch.equal(aot_q, jit_q) and torch.equal(aot_k, jit_k) and torch.equal(jit_q, q_out))

    row["eager_us"] = gpu_time_us(lambda: eager_rotary(q, k, pos, inv_freq))
    outs = (torch.empty_like(q), torch.empty_like(k))
    tiles = {}
    for tactic, (block_h, num_warps) in TACTICS.items():
        tiles[tactic] = gpu_time_us(lambda bh=block_h, nw=num_warps: partial_rotary_triton(
            q, k, pos, rotary_dim=ROTARY_DIM, theta=THETA, block_h=bh, num_warps=nw, out=outs))  # fmt: skip
    row["best_tactic"] = min(tiles, key=tiles.__getitem__)
    row["triton_us"] = tiles[row["best_tactic"]]
    row["tiles_us"] = tiles
    row["bytes"] = 2 * (q.numel() + k.numel()) * q.element_size()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="numpy reference only for batch <= 2 (faster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("torch.cuda is not available: this check needs an NVIDIA GPU and a CUDA build of PyTorch")
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    log.info(
        "device: %s (sm_%d%d), torch %s, triton %s",
        props.name, props.major, props.minor, torch.__version__, triton.__version__,
    )  # fmt: skip
    started = time.time()
    arches = [80] + ([90] if props.major >= 9 else [])  # sm_90 PTX is portable to every later GPU
    aot = {
        (name, tactic, arch): compile_ptx(name, arch=arch, block_h=block_h, num_warps=num_warps)
        for name in DTYPES
        for tactic, (block_h, num_warps) in TACTICS.items()
        for arch in arches
    }
    targets = sorted({c.ptx_target for c in aot.values()})
    log.info("AOT PTX compiled for %s (%d kernels) in %.1fs", ", ".join(targets), len(aot), time.time() - started)

    rows = []
    for name in DTYPES:
        for seq in (1, 512):
            for batch in (1, 2, 4, 8):
                rows.append(check_case(name, batch, seq, with_reference=not args.quick or batch <= 2, aot=aot))

    header = f"{'dtype':5} {'batch':>5} {'seq':>4} {'|tri-eager|':>11} {'|tri-ref|':>9} {'aot=jit':>7} " \
             f"{'eager us':>9} {'triton us':>9} {'speedup':>7} {'tile':>6} {'GB/s':>6}"  # fmt: skip
    log.info("\n%s\n%s", header, "-" * len(header))
    failed = False
    for r in rows:
        ref = "n/a" if r["vs_ref"] is None else f"{r['vs_ref']:.2e}"
        tile = "x".join(map(str, TACTICS[r["best_tactic"]]))
        log.info(
            "%-5s %5d %4d %11.2e %9s %7s %9.1f %9.1f %6.1fx %6s %6.0f",
            r["dtype"], r["batch"], r["seq"], r["vs_eager"], ref, "yes" if r["aot_exact"] else "NO",
            r["eager_us"], r["triton_us"], r["eager_us"] / r["triton_us"], tile, r["bytes"] / r["triton_us"] / 1e3,
        )  # fmt: skip
        # Outputs may differ from eager PyTorch / numpy by one rounding where GPU and CPU cos/sin differ.
        ulp = 2.0 ** (-10 if r["dtype"] == "fp16" else -7)
        magnitude = 32.0  # |q|, |k| < ~6 sigma * 3 < 32: one ulp there is the worst legitimate difference
        worst = max(r["vs_eager"], r["vs_ref"] or 0.0)
        failed |= worst > ulp * magnitude or not r["aot_exact"]
    log.info("tile = heads per program x warps (the plugin's TensorRT tactics: %s)", TACTICS)
    log.info("total %.1fs: %s", time.time() - started, "FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
