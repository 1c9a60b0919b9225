"""The generation loop and the object services embed: :class:`Generator`.

One ``Generator`` is loaded from a package folder once and called many times, from any number of
threads: it holds no per-call state (each call owns its KV cache, freed when the call ends).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stlm.errors import InvalidArgumentError
from stlm.manifest import Manifest, read_manifest
from stlm.runtime.backend import Backend
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.sequence import Completion, SequenceState
from stlm.runtime.tokenizer import Tokenizer

__all__ = ["Completion", "Generator"]


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    base = params or SamplingParams()
    try:
        return dataclasses.replace(base, **overrides) if overrides else base
    except TypeError as exc:
        raise InvalidArgumentError(
            f"unknown sampling option ({exc})",
            fix=f"use the fields of SamplingParams: {', '.join(f.name for f in dataclasses.fields(SamplingParams))}",
        ) from None


class Generator:
    """Tokenize, run, sample, detokenize. Create once with :meth:`load`, call many times."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, manifest: Manifest) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.context_length = manifest.generation.context_length
        self.eos_token_id = manifest.generation.eos_token_id

    @classmethod
    def load(cls, folder: str | Path, *, providers: list[str] | None = None, threads: int | None = None) -> Generator:
        """Load the package in ``folder``; the backend follows the package kind (ONNX or TensorRT)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        tokenizer = Tokenizer.from_file(folder / manifest.tokenizer)
        if manifest.kind == "tensorrt":
            from stlm.runtime.tensorrt_backend import TensorRTBackend

            backend: Backend = TensorRTBackend(folder, manifest)
        else:
            from stlm.runtime.onnxruntime_cuda import load_onnx_backend

            backend = load_onnx_backend(folder, manifest, providers=providers, threads=threads)
        return cls(backend, tokenizer, manifest)

    # -- public API -------------------------------------------------------------------------
    def generate(self, prompt: str, params: SamplingParams | None = None, **overrides: Any) -> str:
        """Generated continuation of ``prompt`` (the prompt itself is not included)."""
        return self.complete([prompt], params, **overrides)[0].text

    def generate_batch(
        self, prompts: Sequence[str], params: SamplingParams | None = None, **overrides: Any
    ) -> list[str]:
        """Continuations of several prompts run as one left-padded batch."""
        return [c.text for c in self.complete(prompts, params, **overrides)]

    def complete(
        self,
        prompts: Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> list[Completion]:
        """Full results (text, tokens, finish reason, logprobs) for a batch of prompts."""
        rows = self._rows(prompts, params, overrides)
        for _ in self._steps(rows, cancel):
            pass
        return [r.completion() for r in rows]

    def stream(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt`` in pieces as they become final.

        Pieces never split a UTF-8 character and are never revised; their concatenation equals
        :meth:`generate`'s result. Stop iterating (or set ``cancel``) to end early.
        """
        rows = self._rows([prompt], params, overrides)
        for pieces in self._steps(rows, cancel):
            if pieces[0]:
                yield pieces[0]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``. An empty prompt starts from BOS (unconditional generation)."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(
                f"prompt must be a string, got {type(prompt).__name__}: {prompt!r:.80}",
                fix="pass the prompt as text (str)",
            )
        return self.tokenizer.encode(prompt) if prompt else [self.manifest.generation.bos_token_id]

    # -- internals --------------------------------------------------------------------------
    def _rows(
        self,
        prompts: Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None,
        overrides: dict[str, Any],
    ) -> list[SequenceState]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise InvalidArgumentError(
                f"prompts must be a non-empty list of strings, got {prompts!r:.80}",
                fix="pass [prompt, ...], or use generate(prompt) for one",
            )
        per_row = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_row) != len(prompts):
            raise InvalidArgumentError(
                f"{len(per_row)} parameter sets for {len(prompts)} prompts",
                fix="pass one SamplingParams per prompt, or a single one",
            )
        rows = []
        for prompt, p in zip(prompts, per_row, strict=True):
            sp = _params(p, overrides)
            ids = self.encode_prompt(prompt)
            if len(ids) >= self.context_length:
                raise InvalidArgumentError(
                    f"the prompt has {len(ids)} tokens; the model's context is {self.context_length} tokens",
                    fix=f"shorten the prompt to fewer than {self.context_length} tokens",
                )
            if len(ids) + sp.max_new_tokens > self.context_length:
                raise InvalidArgumentError(
                    f"max_new_tokens {sp.max_new_tokens} after a {len(ids)}-token prompt exceeds the "
                    f"context of {self.context_length} tokens",
                    fix=f"pass max_new_tokens ≤ {self.context_length - len(ids)}, or shorten the prompt",
                )
            rows.append(SequenceState(ids, sp, self.tokenizer, self.eos_token_id))
        return rows

    def _steps(self, rows: list[SequenceState], cancel: threading.Event | None) -> Iterator[list[str]]:
        """Run the batch to the end; after each step yield the new text of every row ('' if none).

        Finished rows stay in the cache, idle, until the whole batch is done; the cache is freed
        when this generator ends (or is closed).
        """
        capacity = max(len(r.prompt) + r.params.max_new_tokens for r in rows)
        cache = self.backend.new_cache(len(rows), capacity)
        logits = self.backend.forward(cache, [r.prompt for r in rows])
        while True:
            cancelled = cancel is not None and cancel.is_set()
            pieces = [
                ("" if r.finished else r.cancel() if cancelled else r.step(logits[b])) for b, r in enumerate(rows)
            ]
            yield pieces
            feed = [[] if r.finished else [r.last_token] for r in rows]
            if not any(feed):
                return
            logits = self.backend.forward(cache, feed)
