"""The loaded package behind the routes: :class:`CompletionService` turns request bodies into plans.

A :class:`Plan` is what a generation request becomes once parsed and tokenized (CPU work, run off
the event loop): one prompt per ``prompt`` entry (or the rendered chat), ``best_of`` (else ``n``)
decoding states per prompt, each with its own seed, and whether the prompts are scored (echo with
logprobs). Choice ``c`` of a prompt samples with ``seed`` itself for ``c = 0`` (so ``n=1``
reproduces a single request) and with a seed derived from ``(seed, c)`` otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stlm.errors import InvalidArgumentError, PackageError, StlmError
from stlm.runtime.chat import ChatTemplate, load_chat_template, missing_template
from stlm.runtime.generator import Generator
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.sequence import SequenceState
from stlm.runtime.token_bytes import TokenTexts
from stlm.serve.apierror import ApiError
from stlm.serve.chat_protocol import ChatRequest, parse_chat_request
from stlm.serve.config import ServeConfig, available_cpus
from stlm.serve.metrics import Gauge, ServerMetrics
from stlm.serve.offload import CpuPool
from stlm.serve.prompts import PromptEncoder
from stlm.serve.protocol import CompletionRequest, Prompt, api_error_from, parse_completion_request
from stlm.serve.resources import check_kv_cache, memory_budget
from stlm.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from stlm.serve.tracing import RequestTracer

__all__ = ["CompletionService", "Plan", "derive_seed", "load_service"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048


def derive_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice ``choice`` of a request with ``seed``: ``seed`` for choice 0, else a
    63-bit seed drawn from ``SeedSequence([seed, choice])`` (None stays None: fresh entropy)."""
    if seed is None or choice == 0:
        return seed
    return int(np.random.SeedSequence([seed, choice]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Plan:
    """A generation request ready to run: ``states[k]`` decodes prompt ``k // per_prompt``."""

    request: CompletionRequest | ChatRequest
    prompts: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]  # each prompt's text (echo)
    states: tuple[SequenceState, ...]
    per_prompt: int  # decoding states per prompt (best_of, else n)
    n: int  # choices returned per prompt
    prompt_logprobs: int | None  # alternatives per scored prompt position; None: not scored

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the request (each prompt once, however many choices)."""
        return sum(len(p) for p in self.prompts)


class CompletionService:
    """The loaded package, its scheduler, tokenizer helpers and metrics: what the routes call."""

    def __init__(self, generator: Generator, config: ServeConfig) -> None:
        self.generator = generator
        self.config = config
        self.model = config.model_name or Path(config.package).resolve().name
        context = generator.context_length
        self.capacity = config.max_context or min(context, DEFAULT_MAX_CONTEXT)
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or not 2 <= self.capacity <= context:
            raise InvalidArgumentError(
                f"--max-context {config.max_context} is invalid: expected 2..{context} (the model's context)",
                fix=f"pass --max-context ≤ {context}",
            )
        backend = generator.backend.name
        check_kv_cache(generator.manifest, backend, config.max_batch, self.capacity, memory_budget(backend))
        self.chat_template: ChatTemplate | None = load_chat_template(
            config.package, generator.manifest, generator.tokenizer, config.chat_template
        )
        self.encoder = PromptEncoder(generator.tokenizer, generator.manifest.generation.bos_token_id, self.capacity)
        self.texts = TokenTexts(generator.tokenizer)
        self.vocab_size = generator.manifest.model.vocab_size
        self.draining = False  # the server is shutting down: not ready for new requests
        self.cpu = CpuPool(max(1, min(4, available_cpus() // 2)))  # leave cores to the event loop and the model
        self.metrics = ServerMetrics(self.model)
        self.tracer: RequestTracer | None = None
        if config.otlp_traces_endpoint is not None:  # opentelemetry is imported only then
            from stlm.serve.tracing import otlp_tracer

            self.tracer = otlp_tracer(config.otlp_traces_endpoint, f"stlm {self.model}")
        try:
            self.scheduler = Scheduler(
                generator.backend,
                max_batch=config.max_batch,
                capacity=self.capacity,
                max_queue=config.max_queue,
                prefill_chunk=config.prefill_chunk,
                metrics=self.metrics,
            )
        except (MemoryError, ValueError) as exc:  # the estimate passed but the allocation failed
            raise InvalidArgumentError(
                f"cannot allocate the KV cache of --max-batch {config.max_batch} × --max-context {self.capacity} "
                f"({type(exc).__name__}: {str(exc)[:200]})",
                fix="pass a smaller --max-batch or --max-context",
            ) from None
        s = self.scheduler
        self.metrics.bind_gauges(
            [
                Gauge("stlm_queue_depth", "Sequences waiting for a slot.", lambda: s.queue_depth),
                Gauge("stlm_running_batch_size", "Rows fed by the latest scheduler step.", lambda: s.running_batch),
                Gauge("stlm_slots_in_use", "Cache slots holding a sequence.", lambda: s.slots_in_use),
                Gauge("stlm_slots_total", "Cache slots (--max-batch).", lambda: s.max_batch),
                Gauge("stlm_slot_capacity_tokens", "Tokens one slot holds (--max-context).", lambda: s.capacity),
            ]
        )
        self.metrics.bind_vllm_gauges(
            lambda: s.slots_in_use, lambda: s.queue_depth, lambda: s.slots_in_use / s.max_batch
        )

    def start_draining(self) -> None:
        """The server stopped accepting connections: readiness fails from now on."""
        self.draining = True

    # -- requests → plans (CPU work: call off the event loop) ----------------------------------------
    def prepare(self, raw: bytes) -> Plan:
        """Parse and tokenize a ``/v1/completions`` body."""
        request = parse_completion_request(raw)
        self.check_model(request.model)
        ids = self.encode(request.prompts)
        texts = tuple(p if isinstance(p, str) else self.decode(p) for p in request.prompts)
        scored = request.logprobs if request.echo and request.logprobs is not None else None
        return self._plan(request, ids, texts, request.best_of, request.n, scored, ("prompt", "max_tokens", False))

    def prepare_chat(self, raw: bytes) -> Plan:
        """Parse a ``/v1/chat/completions`` body, render its messages with the chat template, tokenize."""
        request = parse_chat_request(raw)
        self.check_model(request.model)
        if self.chat_template is None:
            raise ApiError(400, _message(missing_template(self.model)), param="messages", code="no_chat_template")
        try:
            prompt = self.chat_template.render(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                variables=request.template_kwargs,
            )
        except StlmError as exc:
            raise ApiError(400, _message(exc), param="messages", code="invalid_value") from None
        ids = self.encode([prompt])
        fields = ("messages", request.max_tokens_field, request.max_tokens is None)
        return self._plan(request, ids, (prompt,), request.n, request.n, None, fields)

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is None or the served model's id."""
        if model is not None and model != self.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )

    def encode(self, prompts: tuple[Prompt, ...] | list[str]) -> list[list[int]]:
        """Ids of text and token prompts (text cut at the slot capacity; ids checked against the vocabulary)."""
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.encoder.encode(texts) if texts else [])
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                out.append(next(encoded))
                continue
            bad = next((t for t in prompt if t >= self.vocab_size), None)
            if bad is not None:
                where = f"prompt[{i}]" if len(prompts) > 1 else "the prompt"
                raise ApiError(
                    400,
                    f"{where} holds the token id {bad}; this model's ids are 0..{self.vocab_size - 1}",
                    param="prompt",
                    code="invalid_value",
                )
            out.append(list(prompt))
        return out

    def decode(self, ids: tuple[int, ...] | list[int]) -> str:
        """Text of token ids, special tokens included."""
        return self.generator.tokenizer.decode(ids, skip_special_tokens=False)

    def _plan(
        self,
        request: CompletionRequest | ChatRequest,
        prompts: list[list[int]],
        texts: tuple[str, ...],
        per_prompt: int,
        n: int,
        scored: int | None,
        fields: tuple[str, str, bool],
    ) -> Plan:
        """``fields``: the request's prompt field, its max-tokens field, and whether an absent
        max-tokens fills the slot (chat) rather than defaulting (completions: 16)."""
        most = self.scheduler.max_batch + self.scheduler.max_queue
        if len(prompts) * per_prompt > most:
            many = "best_of" if per_prompt > n else "n"
            raise ApiError(
                400,
                f"the request asks for {len(prompts)} prompt(s) × {many}={per_prompt} sequences; this server runs "
                f"{self.scheduler.max_batch} at once and queues {self.scheduler.max_queue} (fix: ask for at most "
                f"{most} sequences per request)",
                param=many if per_prompt > 1 else "prompt",
                code="invalid_value",
            )
        params = dataclasses.replace(request.params, logprobs_mode=self.config.logprobs_mode)
        if per_prompt > n:  # best_of ranks candidates by their mean log-probability
            params = dataclasses.replace(params, logprobs=True)
        states = []
        for i, ids in enumerate(prompts):
            limit = self._max_tokens(i, len(prompts), ids, params, fields)
            for c in range(per_prompt):
                choice = dataclasses.replace(params, max_new_tokens=limit, seed=derive_seed(params.seed, c))
                states.append(SequenceState(ids, choice, self.generator.tokenizer, self.generator.eos_token_id))
        return Plan(request, tuple(tuple(p) for p in prompts), texts, tuple(states), per_prompt, n, scored)

    def _max_tokens(
        self, i: int, count: int, ids: list[int], params: SamplingParams, fields: tuple[str, str, bool]
    ) -> int:
        prompt_field, field, fill = fields
        where = f"prompt[{i}]" if count > 1 else "the prompt"
        if len(ids) >= self.capacity:
            raise ApiError(
                400,
                f"{where} has {self.capacity} tokens or more; this server's context is {self.capacity} tokens "
                "(fix: shorten it)",
                param=prompt_field,
                code="context_length_exceeded",
            )
        room = self.capacity - len(ids)
        if fill:
            return room
        if len(ids) + params.max_new_tokens > self.capacity:
            raise ApiError(
                400,
                f"{field}={params.max_new_tokens} after {where} of {len(ids)} tokens exceeds this server's context "
                f"of {self.capacity} tokens (fix: pass {field} ≤ {room})",
                param=field,
                code="context_length_exceeded",
            )
        return params.max_new_tokens


def _message(exc: StlmError) -> str:
    return api_error_from(exc).message


def load_service(config: ServeConfig) -> CompletionService:
    """Load ``config.package`` and build its scheduler (not started yet: the app's startup does)."""
    generator = Generator.load(config.package, threads=config.threads)
    manifest = generator.manifest
    if manifest.kind != "tensorrt" and not manifest.variant.inplace:
        raise PackageError(
            f"{config.package} uses the 'concat' KV cache, whose arrays grow with every step: "
            "a long-running server needs fixed slots",
            fix="export the package with --kv-cache inplace (the ONNX Runtime default)",
        )
    return CompletionService(generator, config)
