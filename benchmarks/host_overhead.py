"""Host-side cost per generated token: everything the runtime does outside the model call.

Per token: ``sample_token`` on a 50304-entry logits row (repetition penalty over prompt +
generated ids when enabled), ``IncrementalDetokenizer.push``, ``StopMatcher.feed`` and the
bookkeeping (appending the id to the sequence buffer, the EOS / length checks). Batch 1 reports
per token; batch 8 reports per step (8 rows handled one after another on the host).

Run: ``.venv/bin/python benchmarks/host_overhead.py [--steps 2000] [--warmup 200]``.
Targets: median <= 1 ms per token at batch 1, <= 3 ms per step at batch 8.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import stlm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from stlm.assets import NEOX_TOKENIZER  # noqa: E402
from stlm.runtime.detokenize import IncrementalDetokenizer  # noqa: E402
from stlm.runtime.sampling import SamplingParams, make_rng, sample_token  # noqa: E402
from stlm.runtime.stops import StopMatcher  # noqa: E402
from stlm.runtime.tokenizer import Tokenizer  # noqa: E402

VOCAB = 50304
PROMPT_LEN = 512
EOS = 0
TOKENIZER = NEOX_TOKENIZER  # bundled with stlm
STOPS = ("\n\nUser:", "###")
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0, max_new_tokens=1 << 20, stop=STOPS),
    "t0.8/k50/p0.95/rp1.1": SamplingParams(
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
        max_new_tokens=1 << 20,
        stop=STOPS,
        seed=0,
    ),
}


class Row:
    """The per-sequence host state a generator keeps."""

    def __init__(self, tokenizer: Tokenizer, prompt: np.ndarray, capacity: int, seed: int) -> None:
        self.ids = np.zeros(PROMPT_LEN + capacity, dtype=np.int64)
        self.ids[:PROMPT_LEN] = prompt
        self.length = PROMPT_LEN
        self.logprobs: list[float] = []
        self.rng = make_rng(seed)
        self.detok = IncrementalDetokenizer(tokenizer, prompt.tolist())
        self.stops = StopMatcher(STOPS)
        self.text: list[str] = []
        self.done = False


def run(
    tokenizer: Tokenizer, params: SamplingParams, batch: int, steps: int, warmup: int, pool: np.ndarray
) -> dict[str, np.ndarray]:
    """Time ``warmup + steps`` decode steps; return per-step seconds by component."""
    data = np.random.default_rng(1)
    total = warmup + steps
    rows = [Row(tokenizer, data.integers(2, 50000, PROMPT_LEN), total, seed=r) for r in range(batch)]
    times = {k: np.zeros(total) for k in ("sample", "detok", "stop", "bookkeeping", "total")}
    clock = time.perf_counter
    for step in range(total):
        t_sample = t_detok = t_stop = t_book = 0.0
        start = clock()
        for r, row in enumerate(rows):
            logits = pool[(step * batch + r) % pool.shape[0]]
            t0 = clock()
            token, logprob = sample_token(logits, params, row.rng, row.ids[: row.length])
            t1 = clock()
            row.ids[row.length] = token
            row.length += 1
            row.logprobs.append(logprob)
            finished = token == EOS or row.length - PROMPT_LEN >= params.max_new_tokens
            t2 = clock()
            piece = row.detok.push(token)
            t3 = clock()
            out, stopped = row.stops.feed(piece)
            t4 = clock()
            if out:
                row.text.append(out)
            row.done = row.done or stopped or finished  # benchmark keeps going regardless
            t5 = clock()
            t_sample += t1 - t0
            t_detok += t3 - t2
            t_stop += t4 - t3
            t_book += (t2 - t1) + (t5 - t4)
        end = clock()
        times["sample"][step] = t_sample
        times["detok"][step] = t_detok
        times["stop"][step] = t_stop
        times["bookkeeping"][step] = t_book
        times["total"][step] = end - start
    return {k: v[warmup:] for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print median / p99 in ms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    args = parser.parse_args(argv)
    if not args.tokenizer.is_file():
        print(f"tokenizer not found at {args.tokenizer}; pass --tokenizer", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(args.tokenizer)
    # Random logits from a fixed seed, with a few peaked tokens like a real LM row.
    data = np.random.default_rng(0)
    pool = (data.standard_normal((64, VOCAB)) * 2.5).astype(np.float32)
    pool[np.arange(64)[:, None], data.integers(2, 50000, (64, 5))] += 8.0

    print(
        f"host overhead, vocab {VOCAB}, prompt {PROMPT_LEN} tokens, {args.steps} steps "
        f"after {args.warmup} warm-up; ms per token (batch 1) / per step (batch 8)"
    )
    header = (
        f"{'setting':<22} {'batch':>5} {'median':>8} {'p99':>8}   "
        f"{'sample':>7} {'detok':>7} {'stop':>7} {'book':>7}  (component medians)"
    )
    print(header)
    targets = {1: 1.0, 8: 3.0}
    ok = True
    for name, params in SETTINGS.items():
        for batch in (1, 8):
            t = run(tokenizer, params, batch, args.steps, args.warmup, pool)
            med, p99 = (float(np.percentile(t["total"], q)) * 1e3 for q in (50, 99))
            parts = " ".join(f"{float(np.median(t[k])) * 1e3:7.3f}" for k in ("sample", "detok", "stop", "bookkeeping"))
            flag = "ok" if med <= targets[batch] else f"OVER {targets[batch]} ms target"
            ok = ok and med <= targets[batch]
            print(f"{name:<22} {batch:>5} {med:8.3f} {p99:8.3f}   {parts}  {flag}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
