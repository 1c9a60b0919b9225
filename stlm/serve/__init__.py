"""``stlm serve``: an OpenAI-compatible HTTP server with continuous batching over one KV cache.

Runtime-side: like :mod:`stlm.runtime` it never imports torch or transformers. Typical use::

    from stlm.serve import run_server

    run_server("stablelm-onnx", port=8000, max_batch=8)     # blocks until SIGINT/SIGTERM

Modules: :mod:`~stlm.serve.config` (:class:`ServeConfig`, every default), :mod:`~stlm.serve.scheduler`
(continuous batching), :mod:`~stlm.serve.protocol` and :mod:`~stlm.serve.chat_protocol` (OpenAI
request/response bodies), :mod:`~stlm.serve.service` (requests → plans of decoding states),
:mod:`~stlm.serve.responses` (streamed or collected choices), :mod:`~stlm.serve.app` (ASGI routes),
:mod:`~stlm.serve.ops` (tokenizer, version, health/readiness, metrics routes),
:mod:`~stlm.serve.guard` (limits every route gets), :mod:`~stlm.serve.metrics` (Prometheus text),
:mod:`~stlm.serve.server` (uvicorn). See docs/serving.md for every endpoint and field.

Names are imported on first use, so ``from stlm.serve.config import ServeConfig`` (the CLI's
defaults) does not need the web framework installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stlm.support.extras import require_extra

if TYPE_CHECKING:
    from stlm.serve.app import create_app
    from stlm.serve.config import ServeConfig
    from stlm.serve.jobs import QueueFullError, SchedulerStoppedError
    from stlm.serve.scheduler import Scheduler
    from stlm.serve.server import BackgroundServer, run_server
    from stlm.serve.service import CompletionService, load_service

_WHERE = {
    "BackgroundServer": "server",
    "CompletionService": "service",
    "QueueFullError": "jobs",
    "Scheduler": "scheduler",
    "SchedulerStoppedError": "jobs",
    "ServeConfig": "config",
    "create_app": "app",
    "load_service": "service",
    "run_server": "server",
}

__all__ = [
    "BackgroundServer",
    "CompletionService",
    "QueueFullError",
    "Scheduler",
    "SchedulerStoppedError",
    "ServeConfig",
    "create_app",
    "load_service",
    "run_server",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'stlm.serve' has no attribute {name!r}")
    if _WHERE[name] != "config":  # the configuration is plain data; the rest needs the web framework
        require_extra("serve", feature="the HTTP server (stlm.serve: `stlm serve`)")
    return getattr(importlib.import_module(f"stlm.serve.{_WHERE[name]}"), name)
