"""``stlm serve``: an OpenAI-compatible HTTP server with continuous batching over one KV cache.

Runtime-side: like :mod:`stlm.runtime` it never imports torch or transformers. Typical use::

    from stlm.serve import run_server

    run_server("stablelm-onnx", port=8000, max_batch=8)     # blocks until SIGINT/SIGTERM

Modules: :mod:`~stlm.serve.scheduler` (continuous batching), :mod:`~stlm.serve.protocol`
(OpenAI request/response bodies), :mod:`~stlm.serve.app` (ASGI routes), :mod:`~stlm.serve.metrics`
(Prometheus text), :mod:`~stlm.serve.server` (uvicorn).
"""

from stlm.extras import require_extra

require_extra("serve", feature="the HTTP server (stlm.serve: `stlm serve`)")

from stlm.serve.app import CompletionService, ServeConfig, create_app, load_service  # noqa: E402 - after the extra check
from stlm.serve.scheduler import QueueFullError, Scheduler, SchedulerStoppedError  # noqa: E402 - after the extra check
from stlm.serve.server import BackgroundServer, run_server  # noqa: E402 - after the extra check

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
