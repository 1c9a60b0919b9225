"""``stlm serve PACKAGE --replicas N``: start or join Ray, deploy, serve until a signal, tear down."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from stlm.errors import InvalidArgumentError, StlmError
from stlm.package.manifest import read_manifest
from stlm.serve.config import ServeConfig
from stlm.serve.ray.deployment import APP_NAME, RayOptions, bind, import_serve, parse_autoscale
from stlm.serve.ray.proxy import CALLBACK_ENV, CALLBACK_PATH

__all__ = ["run_ray_server", "serve_on_ray"]

log = logging.getLogger(__name__)

LOCAL_ADDRESSES = (None, "auto", "local")
# Ray takes the machine's network address as its node address unless this is "0" (then loopback).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# run_server settings with no meaning on Ray Serve (its proxy logs and serves HTTP)
_PROXY_SETTINGS = {"log_level", "access_log"}


def run_ray_server(
    package: str | Path,
    *,
    replicas: int | None = None,
    autoscale: str | None = None,
    ray_address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    **settings: Any,
) -> None:
    """Like :func:`stlm.serve.run_server` (same ``settings``), served by Ray Serve replicas.

    ``replicas`` (fixed count) or ``autoscale`` (``"MIN:MAX"``), ``num_cpus``/``num_gpus`` per
    replica, ``ray_address`` to join (default: the local Ray instance, or a new one). Blocks until
    SIGINT/SIGTERM, then drains and removes the deployment.
    """
    known = {f.name for f in fields(ServeConfig)}
    shutdown_timeout = settings.pop("shutdown_timeout", None)
    ignored = sorted(k for k, v in settings.items() if k not in known | _PROXY_SETTINGS and v is not None)
    if ignored:
        log.warning("ignored with Ray Serve: %s", ", ".join(ignored))
    port = settings.get("port", 8000)
    if not 1 <= port <= 65535:
        raise InvalidArgumentError(
            f"--port {port} is invalid with Ray Serve: expected 1..65535", fix="pass e.g. --port 8000"
        )
    config = ServeConfig(Path(package), **{k: v for k, v in settings.items() if k in known})
    options = RayOptions(
        replicas=replicas,
        autoscale=parse_autoscale(autoscale) if autoscale is not None else None,
        address=ray_address,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        shutdown_timeout=30.0 if shutdown_timeout is None else float(shutdown_timeout),
    )
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", config.host)
    serve_on_ray(config, options)


def serve_on_ray(config: ServeConfig, options: RayOptions, *, stop: threading.Event | None = None) -> None:
    """Deploy ``config`` per ``options``, serve on ``config.host:config.port`` until ``stop`` or a signal.

    Joins the Ray instance at ``options.address`` (None: the local one if running, else a new one
    that this call owns). On the way out the application is deleted (its replicas finish their
    requests for up to ``options.shutdown_timeout`` s); Serve and Ray stop too if this call
    started them. ``stop`` (default: SIGINT/SIGTERM in the main thread) ends the serving.
    """
    if options.address is None and "ray" not in sys.modules:
        # A Ray instance started by this call serves one machine: like the HTTP server, its own
        # services (GCS, raylets, workers, dashboard) stay on loopback. Ray reads this when it is
        # imported; a multi-node cluster is started with `ray start` and joined with --ray-address.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    serve = import_serve()
    import ray

    if options.address in LOCAL_ADDRESSES:  # the package is on this machine: check it before deploying
        read_manifest(config.package)
    application = bind(config, options)
    # Ray's proxies load this callback at start (in processes the Ray instance started here inherits).
    os.environ.setdefault(CALLBACK_ENV, CALLBACK_PATH)
    try:
        ray.init(address=options.address)
    except ConnectionError as exc:
        raise StlmError(
            f"could not join the Ray cluster at {options.address!r}: {exc}",
            fix="start it (`ray start --head`) or pass its address with --ray-address HOST:PORT",
        ) from None
    node = getattr(ray._private.worker, "_global_node", None)
    owned = bool(getattr(node, "head", False))
    try:
        _deploy(serve, ray, application, config)
        log.warning(
            "serving %s on http://%s:%d from Ray Serve (Ray at %s; Ctrl-C to stop)",
            config.package,
            config.host,
            config.port,
            ray.get_runtime_context().gcs_address,
        )
        _wait(stop or threading.Event(), signals=stop is None)
    finally:
        _teardown(serve, ray, owned=owned)


def _deploy(serve: Any, ray: Any, application: Any, config: ServeConfig) -> None:
    """Start Serve's proxies on ``host:port`` (unless Serve already runs) and the application."""
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application, name=APP_NAME, route_prefix="/")
    except (RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        log.debug("deploying on Ray Serve failed", exc_info=exc)
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StlmError(
            f"the Ray Serve deployment failed to start ({type(exc).__name__}: {last})",
            fix="see the Ray log above (is stlm installed and the package present on every node, do the resources fit?)",
        ) from None


def _wait(stop: threading.Event, *, signals: bool) -> None:
    if not signals or threading.current_thread() is not threading.main_thread():
        stop.wait()
        return
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in watched}
    for sig in watched:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.warning("stopping: draining the replicas")


def _teardown(serve: Any, ray: Any, *, owned: bool) -> None:
    try:
        if owned:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
