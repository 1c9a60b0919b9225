"""Cost of constrained decoding: decode time per token with and without a JSON-Schema mask.

Builds a random-weight package (``--shape``, default the ``medium`` preset) in a temporary folder,
then alternates (A/B, ``--rounds`` rounds) a constrained and an unconstrained greedy generation of
``--tokens`` tokens at each batch size, and prints the medians per token and their difference (the
mask's cost: llguidance's mask computation, its application, and the matcher's advance). The
constrained rows use a schema that cannot finish early (a long string field), so both runs
generate the same number of tokens. Usage::

    python benchmarks/constraint_mask.py --batch 1 --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from stlm import assets
from stlm.export.onnx_export import export_onnx
from stlm.runtime import Constraint, Generator, SamplingParams
from stlm.testing.checkpoint import write_random_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["a", "b"]}, "text": {"type": "string", "minLength": 400}},
    "required": ["kind", "text"],
}


def _per_token(gen: Generator, batch: int, tokens: int, constraint: Constraint | None) -> float:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, constraint=constraint)
    start = time.perf_counter()
    done = gen.complete(["Output:"] * batch, params)
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == tokens for c in done), [c.finish_reason for c in done]
    return elapsed / tokens


def mask_only(batch: int, steps: int) -> float:
    """Median seconds per step of the mask alone for ``batch`` rows (no model): prepare_masks,
    mask application on (vocab,) logits and the matcher's advance, following a greedy walk."""
    import numpy as np

    from stlm.runtime.constraints import ConstraintState, prepare_masks
    from stlm.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_file(assets.NEOX_TOKENIZER)
    logits = np.random.default_rng(0).standard_normal(50304).astype(np.float32)
    rows = [ConstraintState(Constraint("json_schema", SCHEMA), tok, 50304, [0]) for _ in range(batch)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        prepare_masks(rows)
        for r in rows:
            r.advance(int(np.argmax(r.mask(logits))))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Print the A/B medians (ms per decode step) for each batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="medium")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mask-only", action="store_true", help="time the mask alone (no model)")
    args = parser.parse_args(argv)
    if args.mask_only:
        for batch in args.batch or [1, 8]:
            print(f"batch {batch}: mask alone {mask_only(batch, args.tokens) * 1e3:.2f} ms/step")
        return 0
    constraint = Constraint("json_schema", SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        ck = write_random_checkpoint(Path(tmp) / "ck", shape=args.shape, tokenizer=assets.NEOX_TOKENIZER, seed=0)
        gen = Generator.load(export_onnx(ck, Path(tmp) / "pkg", kv_cache="inplace"), threads=args.threads)
        for batch in args.batch or [1, 8]:
            _per_token(gen, batch, 8, constraint)  # warm-up (and the llguidance tokenizer, built once)
            free, masked = [], []
            for _ in range(args.rounds):
                free.append(_per_token(gen, batch, args.tokens, None))
                masked.append(_per_token(gen, batch, args.tokens, constraint))
            a, b = statistics.median(free) * 1e3, statistics.median(masked) * 1e3
            print(f"batch {batch}: free {a:.2f} ms/step, constrained {b:.2f} ms/step, mask {b - a:+.2f} ms/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
