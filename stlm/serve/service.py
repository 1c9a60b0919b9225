"""The model side of ``stlm serve``: :class:`CompletionService` holds the loaded package, its
scheduler and metrics, and turns a parsed request into decoding states (the routes in
:mod:`stlm.serve.app` call it)."""

from __future__ import annotations

import logging
from pathlib import Path

from stlm.errors import InvalidArgumentError, PackageError
from stlm.runtime.generator import Generator
from stlm.runtime.sequence import ContextLengthError, SequenceState, check_fits
from stlm.serve import protocol
from stlm.serve.apierror import ApiError
from stlm.serve.config import ServeConfig, available_cpus
from stlm.serve.metrics import Gauge, ServerMetrics
from stlm.serve.offload import CpuPool
from stlm.serve.prompts import PromptEncoder
from stlm.serve.protocol import CompletionRequest
from stlm.serve.resources import check_kv_cache, memory_budget
from stlm.serve.scheduler import Scheduler

__all__ = ["CompletionService", "load_service"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048


class CompletionService:
    """The loaded package, its scheduler and metrics: what the routes call."""

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
        self.encoder = PromptEncoder(generator.tokenizer, generator.manifest.generation.bos_token_id, self.capacity)
        self.cpu = CpuPool(max(1, min(4, available_cpus() // 2)))  # leave cores to the event loop and the model
        self.metrics = ServerMetrics()
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

    def prepare(self, raw: bytes) -> tuple[CompletionRequest, list[SequenceState]]:
        """Parse a request body and tokenize its prompts (CPU work: call it off the event loop)."""
        request = protocol.parse_completion_request(raw)
        return request, self.sequences(request)

    def sequences(self, request: CompletionRequest) -> list[SequenceState]:
        """One decoding state per prompt; 400 if a prompt (plus max_tokens) cannot fit a slot."""
        if request.model is not None and request.model != self.model:
            raise ApiError(
                404,
                f"the model {request.model!r} does not exist; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )
        most = self.scheduler.max_batch + self.scheduler.max_queue
        if len(request.prompts) > most:
            raise ApiError(
                400,
                f"the request has {len(request.prompts)} prompts; this server runs {self.scheduler.max_batch} "
                f"at once and queues {self.scheduler.max_queue} (fix: send at most {most} per request)",
                param="prompt",
                code="invalid_value",
            )
        states = []
        for i, ids in enumerate(self.encoder.encode(request.prompts)):
            where = f"prompt[{i}]" if len(request.prompts) > 1 else "the prompt"
            if len(ids) >= self.capacity:  # the encoder stops at the capacity: the prompt may be longer still
                raise ApiError(
                    400,
                    f"{where} has {self.capacity} tokens or more; this server's context is {self.capacity} tokens "
                    "(fix: shorten it)",
                    param="prompt",
                    code="context_length_exceeded",
                )
            try:
                check_fits(
                    len(ids), request.params.max_new_tokens, self.capacity, where=where, max_tokens_name="max_tokens"
                )
            except ContextLengthError as exc:
                raise ApiError(
                    400, f"{exc.problem} (fix: {exc.fix})", param=exc.param, code="context_length_exceeded"
                ) from None
            states.append(SequenceState(ids, request.params, self.generator.tokenizer, self.generator.eos_token_id))
        return states

    def token_text(self, token_id: int) -> str:
        """The text of one token, for ``logprobs.tokens``."""
        return self.generator.tokenizer.decode([token_id], skip_special_tokens=False)


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
