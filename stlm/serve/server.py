"""Running the app with uvicorn: in the foreground (``stlm serve``) or in a background thread.

Shutdown (SIGINT/SIGTERM in the foreground, :meth:`BackgroundServer.stop` in a thread): the
server stops accepting connections, closes idle ones, and lets in-flight requests (streams
included) finish for up to ``shutdown_timeout`` seconds from the signal; then it cancels what
remains, stops the scheduler and returns. A second signal cancels at once. If cleanup itself
hangs (a stuck model call), a watchdog ends the process :data:`WATCHDOG_GRACE` seconds after
the deadline with exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import uvicorn

from stlm.errors import InvalidArgumentError, StlmError
from stlm.serve.app import create_app
from stlm.serve.config import LOOPBACK_HOSTS, ServeConfig
from stlm.serve.connections import protocol_class
from stlm.serve.service import CompletionService, load_service

__all__ = ["WATCHDOG_GRACE", "BackgroundServer", "run_server"]

log = logging.getLogger(__name__)

#: Seconds past the shutdown deadline after which a process that has not exited is ended.
WATCHDOG_GRACE = 5.0


class _Server(uvicorn.Server):
    """uvicorn with the shutdown deadline counted from the (first) signal."""

    def __init__(self, config: uvicorn.Config, deadline: float, on_shutdown: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.deadline = deadline
        self.exit_requested: float | None = None
        self.on_shutdown = on_shutdown  # told when the shutdown starts (readiness turns 503)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # a second signal: stop waiting for requests
            self.force_exit = True
        super().handle_exit(sig, frame)
        self.exit_requested = self.exit_requested or time.monotonic()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        start = self.exit_requested or time.monotonic()
        reserve = min(1.0, self.deadline / 4)  # for cancelling, stopping the scheduler and exiting
        remaining = max(0.0, start + self.deadline - reserve - time.monotonic())
        log.info("shutting down: in-flight requests have %.1fs to finish", remaining)
        self.config.timeout_graceful_shutdown = remaining  # type: ignore[assignment]  # uvicorn takes any number
        await super().shutdown(sockets)
        if self.force_exit:  # a second signal: uvicorn neither cancelled the requests nor stopped the app
            tasks = list(self.server_state.tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=reserve)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.lifespan.shutdown(), timeout=reserve)


def _uvicorn_config(service: CompletionService, *, log_level: str, access_log: bool) -> uvicorn.Config:
    config = service.config
    return uvicorn.Config(
        create_app(service),
        host=config.host,
        port=config.port,
        http=protocol_class(config.header_timeout, config.max_connections),
        ws="none",
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=int(config.shutdown_timeout),
        server_header=False,
    )


def run_server(package: str | Path | ServeConfig, **options: Any) -> int | None:
    """Serve ``package`` over HTTP until SIGINT/SIGTERM, then finish in-flight requests and return.

    ``options`` are :class:`ServeConfig` fields (or pass a whole ``ServeConfig``; its ``log_level``
    and ``access_log`` configure uvicorn's and stlm's logging). Binds ``host``
    (loopback by default: pass ``0.0.0.0`` deliberately, with ``api_key``, to expose it).
    ``max_batch`` slots of ``max_context`` tokens (default ``min(context, 2048)``) run at once; up
    to ``max_queue`` more sequences wait, beyond which requests get 429. After a signal,
    requests have ``shutdown_timeout`` seconds to finish before they are cancelled. Returns the
    signal that stopped the server (None if it stopped otherwise).
    """
    config = package if isinstance(package, ServeConfig) else _config(Path(package), options)
    _check_bindable(config.host, config.port)
    service = load_service(config)
    _set_log_level(config.log_level)  # after loading: a refusal is the first thing the CLI prints
    if config.host not in LOOPBACK_HOSTS and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", config.host)
    uvicorn_config = _uvicorn_config(service, log_level=config.log_level, access_log=config.access_log)
    server = _Server(uvicorn_config, config.shutdown_timeout, service.start_draining)
    try:
        stopped_by = _run_foreground(server)
    except SystemExit as exc:  # uvicorn exits when it cannot start (it logged why)
        raise StlmError(
            f"the server did not start on {config.host}:{config.port} (uvicorn exited with status {exc.code})",
            fix="see the log above",
        ) from None
    if service.scheduler.crashed is not None:
        raise StlmError(f"the scheduler crashed: {service.scheduler.crashed!r}", fix="see the log above")
    return stopped_by


def _set_log_level(level: str) -> None:
    """stlm's own loggers follow ``--log-level`` (uvicorn's follow it through its config)."""
    logger = logging.getLogger("stlm")
    logger.setLevel(5 if level == "trace" else getattr(logging, level.upper()))
    if not logging.getLogger().handlers:  # run_server called outside the CLI: show the messages
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _config(package: Path, options: dict[str, Any]) -> ServeConfig:
    try:
        return ServeConfig(package, **options)
    except TypeError as exc:
        raise InvalidArgumentError(f"unknown server option ({exc})", fix="pass fields of ServeConfig") from None


def _check_bindable(host: str, port: int) -> None:
    """An :class:`StlmError` now, rather than a uvicorn exit later, when ``host:port`` cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidArgumentError(
            f"--host {host!r} is not an address this machine can resolve ({exc})",
            fix="pass an IP address such as 127.0.0.1 or 0.0.0.0",
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise StlmError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                fix="pass another --port (or --port 0 for any free one), or stop the process that uses it",
            ) from None


def _run_foreground(server: _Server) -> int | None:
    """``server.run()``; a SIGINT/SIGTERM that uvicorn handled (graceful shutdown) ends it normally.

    uvicorn re-raises the signal it caught once it has shut down; while it runs, the handlers
    installed here only note that signal, so the process exits with status 0 instead of dying.
    A watchdog thread ends the process if it is still alive well after the shutdown deadline.
    """
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return None
    caught: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in watched}
    for sig in watched:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    threading.Thread(target=_watchdog, args=(server,), name="stlm-shutdown-watchdog", daemon=True).start()
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not caught:
        return None
    log.info("stopped by %s", signal.Signals(caught[0]).name)
    return caught[0]


def _watchdog(server: _Server) -> None:
    while server.exit_requested is None:
        time.sleep(0.2)
    time.sleep(max(0.0, server.exit_requested + server.deadline + WATCHDOG_GRACE - time.monotonic()))
    log.critical("still running %gs after the shutdown deadline: exiting now", WATCHDOG_GRACE)
    logging.shutdown()
    os._exit(1)


class BackgroundServer:
    """Serve a :class:`CompletionService` from a thread (tests, benchmarks, notebooks).

    ``with BackgroundServer(service) as server: ... server.url ...``; leaving the block shuts it
    down gracefully (in-flight requests get ``shutdown_timeout``) and joins the thread. Port 0
    picks a free port.
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
        config = _uvicorn_config(service, log_level=log_level, access_log=access_log)
        self._server = _Server(config, service.config.shutdown_timeout, service.start_draining)
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

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown: stop accepting, let in-flight requests finish (up to the config's
        ``shutdown_timeout``), cancel the rest, stop the scheduler, join."""
        self._server.exit_requested = time.monotonic()
        self._server.should_exit = True
        self._thread.join(self._server.deadline + 10 if timeout is None else timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
