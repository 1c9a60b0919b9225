"""Running the app with uvicorn: in the foreground (``stlm serve``) or in a background thread.

uvicorn handles SIGINT/SIGTERM in the foreground: it stops accepting connections, lets in-flight
requests (streams included) finish, then runs the app's shutdown, which drains the scheduler.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn

from stlm.errors import InvalidArgumentError, StlmError
from stlm.serve.app import CompletionService, ServeConfig, create_app, load_service

__all__ = ["BackgroundServer", "run_server"]

log = logging.getLogger(__name__)


def _uvicorn_config(service: CompletionService, *, log_level: str, access_log: bool) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(service),
        host=service.config.host,
        port=service.config.port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=None,
        server_header=False,
    )


def run_server(
    package: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_context: int | None = None,
    prefill_chunk: int = 256,
    model_name: str | None = None,
    threads: int | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve ``package`` over HTTP until SIGINT/SIGTERM, then drain in-flight requests and return.

    Binds ``host`` (loopback by default: pass ``0.0.0.0`` deliberately, with ``api_key``, to expose
    it). ``max_batch`` slots of ``max_context`` tokens (default ``min(context, 2048)``) run at once;
    up to ``max_queue`` more sequences wait, beyond which requests get 429.
    """
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"--port {port} is invalid: expected 0..65535", fix="pass e.g. --port 8000")
    config = ServeConfig(
        Path(package),
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        model_name=model_name,
        threads=threads,
    )
    service = load_service(config)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    server = uvicorn.Server(_uvicorn_config(service, log_level=log_level, access_log=access_log))
    _run_foreground(server)
    if service.scheduler.crashed is not None:
        raise StlmError(f"the scheduler crashed: {service.scheduler.crashed!r}", fix="see the log above")


def _run_foreground(server: uvicorn.Server) -> None:
    """``server.run()``; a SIGINT/SIGTERM that uvicorn handled (graceful shutdown) ends it normally.

    uvicorn re-raises the signal it caught once it has shut down; while it runs, the handlers
    installed here only note that signal, so the process exits with status 0 instead of dying.
    """
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    caught: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in watched}
    for sig in watched:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        log.info("stopped by %s after draining", signal.Signals(caught[0]).name)


class BackgroundServer:
    """Serve a :class:`CompletionService` from a thread (tests, benchmarks, notebooks).

    ``with BackgroundServer(service) as server: ... server.url ...``; leaving the block shuts it
    down gracefully (in-flight requests finish) and joins the thread. Port 0 picks a free port.
    """

    def __init__(
        self,
        service: CompletionService,
        *,
        log_level: str = "warning",
        access_log: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        self.service = service
        self._server = uvicorn.Server(_uvicorn_config(service, log_level=log_level, access_log=access_log))
        self._thread = threading.Thread(target=self._server.run, name="stlm-serve", daemon=True)
        self._start_timeout = start_timeout
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.service.config.host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Start and wait until the socket is bound."""
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise StlmError("the server did not start", fix="see the log (is the port in use?)")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown: stop accepting, finish in-flight requests, drain, join."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
