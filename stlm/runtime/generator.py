"""The generation loop and the object services embed: :class:`Generator`.

One ``Generator`` is loaded from a package folder once and called many times, from any number of
threads: it holds no per-call state (each call owns its KV cache, freed when the call ends).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.package.manifest import Manifest, read_manifest
from stlm.runtime.backend import Backend
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.sequence import Completion, SequenceState, check_fits
from stlm.runtime.tokenizer import Tokenizer

#: Tokens per row fed at once by :meth:`Generator.logits` (bounds the (rows, chunk, vocab) logits).
DEFAULT_LOGITS_CHUNK = 512

__all__ = ["Completion", "Generator"]


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    if params is not None and not isinstance(params, SamplingParams):
        raise InvalidArgumentError(
            f"params is a {type(params).__name__}, expected a SamplingParams",
            fix="pass SamplingParams(...), or the options as keywords: generate(prompt, max_new_tokens=...)",
        )
    base = params or SamplingParams()
    try:
        return dataclasses.replace(base, **overrides) if overrides else base
    except TypeError as exc:
        raise InvalidArgumentError(
            f"unknown sampling option ({exc})",
            fix=f"use the fields of SamplingParams: {', '.join(f.name for f in dataclasses.fields(SamplingParams))}",
        ) from None


MAX_THREADS = 1024  # ONNX Runtime starts every intra-op thread up front


def _check_threads(threads: object) -> None:
    """``threads``: None or 1 .. :data:`MAX_THREADS`."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise InvalidArgumentError(
            f"threads={threads!r} is invalid: expected an int from 1 to {MAX_THREADS}",
            fix=f"pass --threads N with N ≤ the number of cores ({os.cpu_count()} here), or omit it to use them all",
        )


class Generator:
    """Tokenize, run, sample, detokenize. Create once with :meth:`load`, call many times."""

    def __init__(self, backend: Backend[Any], tokenizer: Tokenizer, manifest: Manifest) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.context_length = manifest.generation.context_length
        self.eos_token_id = manifest.generation.eos_token_id

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None, threads: int | None = None) -> Generator:
        """Load the package in ``folder``; the backend follows the package kind (ONNX or TensorRT).

        ONNX packages run on ``device`` ('cpu' or 'cuda'; None: CUDA when onnxruntime-gpu has a GPU,
        else the CPU) with ``threads`` intra-op threads.
        """
        _check_threads(threads)
        folder = Path(folder)
        manifest = read_manifest(folder)
        tokenizer = Tokenizer.from_file(folder / manifest.tokenizer)
        backend: Backend[Any]
        if manifest.kind == "tensorrt":
            from stlm.runtime.tensorrt_backend import TensorRTBackend

            backend = TensorRTBackend(folder, manifest)
        else:
            from stlm.runtime.onnxruntime_backend import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(folder, manifest, device=device, threads=threads)
        return cls(backend, tokenizer, manifest)

    # -- public API -------------------------------------------------------------------------
    def generate(self, prompt: str, params: SamplingParams | None = None, **overrides: Any) -> str:
        """Generated continuation of ``prompt`` (the prompt itself is not included)."""
        return self.complete([prompt], params, **overrides)[0].text

    def generate_batch(
        self, prompts: Sequence[str], params: SamplingParams | None = None, **overrides: Any
    ) -> list[str]:
        """Continuations of several prompts run as one batch (each row as if alone)."""
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

    def logits(self, token_ids: Sequence[Sequence[int]], *, chunk: int | None = None) -> list[np.ndarray]:
        """Teacher-forced float32 logits of every position: for each sequence of ``token_ids``, a
        (len, vocab) array whose row ``i`` is the model's prediction after token ``i``.

        The sequences run as one batch, ``chunk`` tokens per row at a time (default
        :data:`DEFAULT_LOGITS_CHUNK`), so long inputs never hold more than (rows, chunk, vocab)
        logits on the device. Each sequence must fit the context. Perplexity, lm-eval's
        log-likelihoods and echoed prompt log-probabilities are computed from these.
        """
        rows = self._token_rows(token_ids)
        step = DEFAULT_LOGITS_CHUNK if chunk is None else chunk
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise InvalidArgumentError(f"chunk={chunk!r} is invalid: expected an int >= 1", fix="pass e.g. chunk=512")
        cache = self.backend.new_cache(len(rows), max(max(map(len, rows)), 1))
        pieces: list[list[np.ndarray]] = [[] for _ in rows]
        for start in range(0, max(map(len, rows)), step):
            feed = [row[start : start + step] for row in rows]
            for r, out in enumerate(self.backend.forward_all(cache, feed)):
                pieces[r].append(np.asarray(out, dtype=np.float32))
        vocab = self.manifest.model.vocab_size
        return [np.concatenate(p) if p else np.zeros((0, vocab), np.float32) for p in pieces]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``. An empty prompt starts from BOS (unconditional generation)."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(
                f"prompt must be a string, got {type(prompt).__name__}: {prompt!r:.80}",
                fix="pass the prompt as text (str)",
            )
        return self.tokenizer.encode(prompt) if prompt else [self.manifest.generation.bos_token_id]

    # -- internals --------------------------------------------------------------------------
    def _token_rows(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """``token_ids`` checked: a non-empty list of sequences of vocabulary ids that fit the context."""
        if isinstance(token_ids, str) or not isinstance(token_ids, Sequence) or not token_ids:
            raise InvalidArgumentError(
                f"token_ids must be a non-empty list of token id lists, got {token_ids!r:.80}",
                fix="pass [[id, ...], ...]",
            )
        vocab = self.manifest.model.vocab_size
        rows = []
        for i, seq in enumerate(token_ids):
            if isinstance(seq, str) or not isinstance(seq, Sequence):
                raise InvalidArgumentError(
                    f"token_ids[{i}] is {seq!r:.80}, not a list of ids", fix="pass [[id, ...], ...]"
                )
            row = [int(t) for t in seq]
            if any(not 0 <= t < vocab for t in row):
                raise InvalidArgumentError(
                    f"token_ids[{i}] holds an id outside [0, {vocab})", fix="pass token ids of this model's vocabulary"
                )
            check_fits(len(row), 0, self.context_length)
            rows.append(row)
        return rows

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
            check_fits(len(ids), sp.max_new_tokens, self.context_length)
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
