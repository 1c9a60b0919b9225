"""The one engine: the server (its real scheduler thread, fed through the service's request
parsing) and ``Generator`` decode the same tokens, because both run :class:`stlm.runtime.engine.Engine`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from stlm.runtime import Generator, SamplingParams
from stlm.runtime.engine import Engine
from stlm.runtime.jobs import Job, StepOutput
from stlm.runtime.sequence import Completion, SequenceState
from stlm.serve import CompletionService, ServeConfig

WORDS = "the quick brown fox jumps over a lazy dog while seven bold wizards quietly judge its form".split()


def _requests() -> list[dict[str, Any]]:
    """32 mixed completions: prompt lengths 1..~60 words, greedy and seeded sampling, stop strings,
    max_tokens from 1 to 40."""
    out = []
    for i in range(32):
        body: dict[str, Any] = {
            "prompt": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + (i * 7) % 60)),
            "max_tokens": 1 + (i * 13) % 40,
        }
        if i % 3:
            body.update(temperature=0.7 + 0.1 * (i % 4), seed=1000 + i)
            if i % 5 == 0:
                body.update(top_k=40, top_p=0.9)
        else:
            body["temperature"] = 0.0
        if i % 4 == 1:
            body["stop"] = ["e", " a"]
        elif i % 4 == 3:
            body["stop"] = "t"
        out.append(body)
    return out


def _params(body: dict[str, Any]) -> SamplingParams:
    """``body`` as the runtime's sampling parameters, built independently of the server's parser."""
    return SamplingParams(
        max_new_tokens=body["max_tokens"],
        temperature=body["temperature"],
        seed=body.get("seed"),
        top_k=body.get("top_k", 0),
        top_p=body.get("top_p", 1.0),
        stop=body.get("stop", ()),
    )


def _serve(service: CompletionService, bodies: list[dict[str, Any]]) -> list[Completion]:
    """Submit every request at once to the started scheduler; their completions, in order."""
    done: dict[int, Completion] = {}
    finished = threading.Event()

    def sink(i: int) -> Any:
        def post(output: StepOutput) -> None:
            if output.finish_reason is not None:
                assert output.error is None, output.error
                assert output.completion is not None
                done[i] = output.completion
                if len(done) == len(bodies):
                    finished.set()

        return post

    jobs = []
    for i, body in enumerate(bodies):
        plan = service.prepare(json.dumps({"model": service.model, **body}).encode())
        jobs.extend(Job(state, sink(i), tag=f"r{i}") for state in plan.states)
    service.scheduler.start()
    try:
        service.scheduler.submit(jobs)
        assert finished.wait(300), f"only {len(done)} of {len(bodies)} requests finished"
    finally:
        service.scheduler.stop(timeout=30)
    return [done[i] for i in range(len(bodies))]


def test_server_and_generator_decode_the_same_tokens(packages: dict[str, Path]) -> None:
    package = packages["hd16-inplace"]
    generator = Generator.load(package)
    bodies = _requests()
    config = ServeConfig(package, port=0, max_batch=4, max_queue=32, max_context=256, prefill_chunk=16)
    served = _serve(CompletionService(Generator.load(package), config), bodies)
    batched = generator.complete([b["prompt"] for b in bodies], [_params(b) for b in bodies])
    alone = [generator.complete([b["prompt"]], _params(b))[0] for b in bodies]
    streamed = ["".join(generator.stream(b["prompt"], _params(b))) for b in bodies[:8]]  # streaming == non-streaming
    for i, (s, b, a) in enumerate(zip(served, batched, alone, strict=True)):
        assert s.token_ids == b.token_ids == a.token_ids, f"request {i}: {bodies[i]}"
        assert (s.text, s.finish_reason) == (b.text, b.finish_reason) == (a.text, a.finish_reason), i
    assert streamed == [a.text for a in alone[:8]]
    reasons = {c.finish_reason for c in alone}
    assert {"length", "stop"} <= reasons, reasons  # the mix really exercises the stop strings
    assert any(len(c.token_ids) > 16 for c in alone)


def test_seeded_sampling_reproduces_and_cancel_stops(packages: dict[str, Path]) -> None:
    generator = Generator.load(packages["hd16-inplace"])
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    first = generator.complete(["a lazy dog", "the fox"], params)
    assert generator.complete(["a lazy dog", "the fox"], params) == first
    cancel = threading.Event()
    pieces = []
    for piece in generator.stream("the fox", SamplingParams(max_new_tokens=200, temperature=0.0), cancel=cancel):
        pieces.append(piece)
        cancel.set()
    greedy = generator.generate("the fox", SamplingParams(max_new_tokens=200, temperature=0.0))
    assert 0 < len("".join(pieces)) < len(greedy) and greedy.startswith("".join(pieces))


class _Doomed(SequenceState):
    """A sequence whose third sampling step fails (as a row whose logits overflowed would)."""

    def step(self, logits: Any) -> str:
        if len(self.generated) == 2:
            raise FloatingPointError("row overflowed")
        return super().step(logits)


@pytest.mark.parametrize("isolate", [True, False])
def test_a_failing_row_fails_alone_or_raises(packages: dict[str, Path], isolate: bool) -> None:
    """The server's engine (``isolate``) fails only the failing job; Generator's raises the error."""
    generator = Generator.load(packages["hd16-inplace"])
    tokenizer, eos = generator.tokenizer, generator.eos_token_id
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    ids = generator.encode_prompt("the fox")
    outputs: list[StepOutput] = []
    engine = Engine(generator.backend, max_batch=2, capacity=32, prefill_chunk=8, isolate=isolate)
    engine.waiting.append(Job(SequenceState(list(ids), params, tokenizer, eos), outputs.append))
    engine.waiting.append(Job(_Doomed(list(ids), params, tokenizer, eos), outputs.append))
    if not isolate:
        with pytest.raises(FloatingPointError):
            for _ in engine.steps():
                pass
        return
    for _ in engine.steps():
        pass
    finals = [o for o in outputs if o.finish_reason is not None]
    assert sorted(o.finish_reason or "" for o in finals) == ["error", "length"]
    good = next(o.completion for o in finals if o.completion is not None)
    assert good.token_ids == generator.complete(["the fox"], params)[0].token_ids
    assert engine.slots_in_use == 0
