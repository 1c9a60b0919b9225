"""Responses of generation requests: the jobs' outputs streamed (SSE) or collected into one body.

:class:`GenerationResponse` owns the ASGI mechanics (client disconnects cancel the jobs, errors
become a generic 500, metrics); :class:`CompletionResponse` and :class:`ChatResponse` shape the
choices as ``text_completion`` and ``chat.completion`` (``chat.completion.chunk``) bodies.

Choices: prompt ``p``'s jobs are ``per_prompt`` consecutive jobs; with ``best_of > n`` the ``n``
candidates with the highest mean log-probability per token (OpenAI's rule, raw log-probabilities)
are returned, best first. Choice indexes run ``p * n + c``. Usage counts each prompt once and
every generated token (of all ``best_of`` candidates).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from stlm.runtime.logprobs import TokenLogprob, mean_logprob
from stlm.runtime.sequence import Completion
from stlm.serve import jsonio, protocol
from stlm.serve.chat_protocol import chat_logprobs_body
from stlm.serve.guard import internal_error
from stlm.serve.jobs import Job, StepOutput
from stlm.serve.service import CompletionService, Plan

__all__ = ["ChatResponse", "CompletionResponse", "GenerationResponse"]

#: (token id, log-probability, alternatives): None for the first prompt token
Item = tuple[int, float | None, tuple[tuple[int, float], ...] | None]

log = logging.getLogger(__name__)


class TextOffsets:
    """Character offsets of tokens in the text they decode to: a token starting inside a
    multi-byte character is placed at that character (incremental UTF-8 decoding of token bytes)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0

    def next(self, data: bytes) -> int:
        """The offset of a token of bytes ``data`` (then move past it)."""
        at = self.chars
        self.chars += len(self._decoder.decode(data))
        return at


def _entries(output: StepOutput) -> list[TokenLogprob]:
    """The sampled tokens of a step with their log-probabilities (none when not recorded)."""
    if not output.logprobs:
        return []
    return [TokenLogprob(*t) for t in zip(output.token_ids, output.logprobs, output.top_logprobs, strict=True)]


def _items(entries: list[TokenLogprob]) -> list[Item]:
    return [(e.token_id, e.logprob, e.top) for e in entries]


class _Choice:
    """What one job produced so far."""

    def __init__(self, job: Job, prompt: int) -> None:
        self.job, self.prompt = job, prompt
        self.entries: list[TokenLogprob] = []
        self.final: StepOutput | None = None
        self.scored: tuple[TokenLogprob, ...] | None = None
        self.offsets = TextOffsets()
        self.started = False  # streaming: the first chunk (echo / role) was sent

    def add(self, output: StepOutput) -> None:
        if output.prompt_logprobs is not None:
            self.scored = output.prompt_logprobs
        self.entries.extend(_entries(output))
        if output.finish_reason is not None:
            self.final = output

    @property
    def completion(self) -> Completion:
        assert self.final is not None and self.final.completion is not None
        return self.final.completion


class GenerationResponse:
    """Streams (SSE) or collects the outputs of a request's jobs; cancels them on disconnect."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(
        self,
        service: CompletionService,
        plan: Plan,
        jobs: list[Job],
        queue: asyncio.Queue[tuple[int, StepOutput]],
        arrived: float,
        rid: str,
    ) -> None:
        self.service, self.plan, self.jobs, self.queue, self.arrived = service, plan, jobs, queue, arrived
        self.request = plan.request
        self.rid = rid
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.status = 499  # until the response has been sent
        self.choices = [_Choice(job, k // plan.per_prompt) for k, job in enumerate(jobs)]
        self.generated = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
                try:
                    await (self._stream(send) if self.request.stream else self._collect(send))
                except OSError:
                    self.status = 499
                group.cancel_scope.cancel()
        finally:
            for job in self.jobs:
                job.cancel()
            self.service.metrics.requests.inc(1, str(self.status))
            self.service.metrics.latency.observe(time.monotonic() - self.arrived)

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        pending = len(self.jobs)
        while pending:
            index, output = await self.queue.get()
            pending -= output.finish_reason is not None
            self.generated += len(output.token_ids)
            yield index, output

    def _usage(self) -> dict[str, int]:
        return protocol.usage_body(self.plan.prompt_tokens, self.generated)

    # -- collected -------------------------------------------------------------------------------
    async def _collect(self, send: Send) -> None:
        async for index, output in self._outputs():
            self.choices[index].add(output)
            if output.error is not None:  # the scheduler logged the details under this request id
                for job in self.jobs:
                    job.cancel()
                error = internal_error(self.rid)
                await self._send_json(send, error.body(), error.status)
                return
        bodies = [self._choice_body(choice, i) for i, choice in enumerate(self._returned())]
        body = protocol.response_body(
            self.object_name, self.id, self.created, self.service.model, bodies, self._usage()
        )
        await self._send_json(send, body, 200)

    def _returned(self) -> list[_Choice]:
        """The choices returned, in index order (the best ``n`` of each prompt's ``best_of``)."""
        plan, out = self.plan, []
        for p in range(len(plan.prompts)):
            candidates = self.choices[p * plan.per_prompt : (p + 1) * plan.per_prompt]
            if plan.per_prompt > plan.n:
                candidates = sorted(candidates, key=lambda c: -mean_logprob(c.completion.logprobs or ()))
            out.extend(candidates[: plan.n])
        return out

    def _choice_body(self, choice: _Choice, index: int) -> dict[str, Any]:
        raise NotImplementedError

    async def _send_json(self, send: Send, body: dict[str, Any], status: int) -> None:
        try:
            data = jsonio.dumps(body)
        except ValueError:  # NaN/inf: never sent as (invalid) JSON
            log.exception("request %s: the response is not valid JSON", self.rid)
            status, data = 500, jsonio.dumps(internal_error(self.rid).body())
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})
        self.status = status

    # -- streamed --------------------------------------------------------------------------------
    async def _stream(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        status = 200
        async for index, output in self._outputs():
            if output.error is not None:
                status = 500
                await self._chunk(send, protocol.sse(internal_error(self.rid).body()))
                continue
            choice = self.choices[index]
            choice.add(output)
            for body in self._delta_bodies(choice, index, output):
                await self._send_chunk(send, [body])
        if self.request.include_usage:
            usage = self._usage()
            await self._chunk(
                send,
                protocol.sse(
                    protocol.response_body(self.chunk_name, self.id, self.created, self.service.model, [], usage)
                ),
            )
        await self._chunk(send, protocol.sse("[DONE]"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.status = status

    def _delta_bodies(self, choice: _Choice, index: int, output: StepOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def _send_chunk(self, send: Send, choices: list[dict[str, Any]]) -> None:
        usage = self._usage() if self.request.continuous_usage else None
        body = protocol.response_body(self.chunk_name, self.id, self.created, self.service.model, choices, usage)
        await self._chunk(send, protocol.sse(body))

    @staticmethod
    async def _chunk(send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})


def _finish_reason(output: StepOutput | None) -> str | None:
    if output is None or output.finish_reason is None:
        return None
    return protocol.FINISH_REASONS.get(output.finish_reason, output.finish_reason)


class CompletionResponse(GenerationResponse):
    """``text_completion`` bodies (the same object name for chunks, as OpenAI)."""

    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl-"

    def _logprobs(self, choice: _Choice, items: list[Item]) -> dict[str, Any]:
        texts = self.service.texts
        tops: list[dict[str, float] | None] = []
        for token, logprob, top in items:
            if top is None or logprob is None:
                tops.append(None)
                continue
            alternatives = {texts.text_of(i): lp for i, lp in top}
            alternatives.setdefault(texts.text_of(token), logprob)  # OpenAI adds the chosen token
            tops.append(alternatives)
        offsets = [choice.offsets.next(texts.bytes_of(token)) for token, _, _ in items]
        return protocol.logprobs_body(
            [texts.text_of(t) for t, _, _ in items], [lp for _, lp, _ in items], tops, offsets
        )

    def _prompt_items(self, choice: _Choice) -> list[Item]:
        ids = self.plan.prompts[choice.prompt]
        scored = choice.scored or ()
        return [(ids[0], None, None), *((e.token_id, e.logprob, e.top) for e in scored)]

    def _choice_body(self, choice: _Choice, index: int) -> dict[str, Any]:
        request = self.request
        assert isinstance(request, protocol.CompletionRequest)
        echo = request.echo
        text = (self.plan.texts[choice.prompt] if echo else "") + choice.completion.text
        logprobs = None
        if request.logprobs is not None:
            items = self._prompt_items(choice) if echo else []
            items += _items(choice.entries)
            logprobs = self._logprobs(choice, items)
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": _finish_reason(choice.final)}

    def _delta_bodies(self, choice: _Choice, index: int, output: StepOutput) -> list[dict[str, Any]]:
        request = self.request
        assert isinstance(request, protocol.CompletionRequest)
        text, items = output.text, _items(_entries(output))
        if not choice.started:
            choice.started = True
            if request.echo:
                text = self.plan.texts[choice.prompt] + text
                items = [*(self._prompt_items(choice) if request.logprobs is not None else []), *items]
        logprobs = self._logprobs(choice, items) if request.logprobs is not None and items else None
        finish = _finish_reason(output)
        if finish is None and not text and logprobs is None:
            return []
        return [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]


class ChatResponse(GenerationResponse):
    """``chat.completion`` bodies and ``chat.completion.chunk`` events."""

    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _choice_body(self, choice: _Choice, index: int) -> dict[str, Any]:
        logprobs = chat_logprobs_body(self.service.texts, choice.entries) if self.request.logprobs else None
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.completion.text},
            "logprobs": logprobs,
            "finish_reason": _finish_reason(choice.final),
        }

    def _delta_bodies(self, choice: _Choice, index: int, output: StepOutput) -> list[dict[str, Any]]:
        bodies = []
        if not choice.started:
            choice.started = True
            bodies.append(
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            )
        entries = _entries(output)
        logprobs = chat_logprobs_body(self.service.texts, entries) if self.request.logprobs and entries else None
        finish = _finish_reason(output)
        if output.text or logprobs is not None or finish is not None:
            delta = {"content": output.text} if output.text or finish is None else {}
            bodies.append({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        return bodies
