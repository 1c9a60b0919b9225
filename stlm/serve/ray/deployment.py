"""The Ray Serve deployment of ``stlm serve``: options, the replica, the application builder.

Each replica is one Ray actor that loads the package and runs the very app of ``stlm serve``
(:func:`stlm.serve.app.create_app` over its own :class:`~stlm.serve.app.CompletionService`:
scheduler thread, KV cache slots, metrics). Ray's HTTP proxy hands every request to a replica
(power-of-two choices on ongoing requests) and streams the ASGI messages back, so routes, bodies,
server-sent events, the API key, limits and error shapes are those of the single-process server.

Ray is optional (``pip install 'stlm[ray]'``): this module imports it only inside functions, and
``stlm serve`` without ``--replicas``/``--autoscale`` never imports this module.

Two ways in, one deployment (:func:`bind`):

- :func:`stlm.serve.ray.driver.run_ray_server` (the CLI): start or join Ray, deploy, block until
  SIGINT/SIGTERM, tear down.
- :func:`build_app` (a Ray Serve application builder): ``serve run stlm.serve.ray.deployment:build_app
  package=/models/pkg`` or a KubeRay ``RayService``'s ``import_path``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.serve.config import ServeConfig
from stlm.serve.ray.metrics import MetricsExporter, probe
from stlm.serve.service import CompletionService, load_service

if TYPE_CHECKING:
    from starlette.types import ASGIApp

__all__ = [
    "APP_NAME",
    "DEPLOYMENT_NAME",
    "RayOptions",
    "StlmReplica",
    "bind",
    "build_app",
    "deployment_options",
    "import_serve",
    "parse_app_args",
    "parse_autoscale",
]

log = logging.getLogger(__name__)

APP_NAME = "stlm"
DEPLOYMENT_NAME = "stlm"
INSTALL_FIX = "pip install 'stlm[ray]'"
HEALTH_CHECK_PERIOD_S = 10.0  # how often Ray calls StlmReplica.check_health (Ray's default)


@dataclass(frozen=True)
class RayOptions:
    """How the deployment is spread over Ray (``stlm serve --replicas/--autoscale/...``).

    ``replicas`` fixes the replica count; ``autoscale=(MIN, MAX)`` lets Ray Serve add and remove
    replicas on ongoing requests (one of the two; neither means 1 replica). ``num_cpus`` and
    ``num_gpus`` are reserved per replica (``num_gpus=1``: one engine per GPU). ``address`` is
    passed to ``ray.init`` (None: join the local Ray instance if one runs, else start one).
    ``autoscaling`` overrides entries of Ray's ``autoscaling_config`` (e.g. ``upscale_delay_s``).
    """

    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    shutdown_timeout: float = 30.0
    autoscaling: Mapping[str, Any] = field(default_factory=dict)
    metrics_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.autoscale is not None:
            raise InvalidArgumentError(
                "--replicas and --autoscale were both given", fix="pass --replicas N or --autoscale MIN:MAX"
            )
        if self.replicas is not None and (isinstance(self.replicas, bool) or self.replicas < 1):
            raise InvalidArgumentError(f"--replicas {self.replicas} is invalid: expected ≥ 1", fix="pass --replicas 2")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                flag = "--" + name.replace("_", "-")
                raise InvalidArgumentError(f"{flag} {value} is invalid: expected ≥ 0", fix=f"pass e.g. {flag} 1")
        if not self.shutdown_timeout >= 0:
            raise InvalidArgumentError(
                f"the shutdown timeout {self.shutdown_timeout} is invalid: expected ≥ 0 seconds",
                fix="pass e.g. 30",
            )


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` → ``(MIN, MAX)`` with ``0 ≤ MIN ≤ MAX`` and ``MAX ≥ 1``."""
    match = re.fullmatch(r"\s*([0-9]{1,6})\s*:\s*([0-9]{1,6})\s*", text)
    if match is not None:
        low, high = int(match[1]), int(match[2])
        if low <= high and high >= 1:
            return low, high
    raise InvalidArgumentError(
        f"--autoscale {text!r} is invalid: expected MIN:MAX with 0 ≤ MIN ≤ MAX and MAX ≥ 1",
        fix="pass e.g. --autoscale 1:4",
    )


def deployment_options(config: ServeConfig, options: RayOptions) -> dict[str, Any]:
    """Ray Serve ``Deployment.options(...)`` for ``config`` spread per ``options`` (pure).

    A replica admits ``max_batch + max_queue`` requests, like one ``stlm serve`` process (beyond
    that, requests wait in Ray's router for the least busy replica). Autoscaling targets
    ``max_batch`` ongoing requests per replica: Ray adds a replica once requests wait for a cache
    slot on average, and removes one when the others can hold the load with free slots.
    """
    max_batch = config.max_batch
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_batch + config.max_queue,
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "ray_actor_options": {
            key: value
            for key, value in (("num_cpus", options.num_cpus), ("num_gpus", options.num_gpus))
            if value is not None
        },
    }
    if options.autoscale is not None:
        low, high = options.autoscale
        deployment["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": max_batch,
            **options.autoscaling,
        }
    else:
        deployment["num_replicas"] = options.replicas or 1
    return deployment


def replica_config(config: ServeConfig, options: RayOptions) -> ServeConfig:
    """The config each replica loads: ONNX Runtime threads default to the CPUs reserved for it."""
    if config.threads is None and options.num_cpus is not None and options.num_cpus >= 1:
        return replace(config, threads=int(options.num_cpus))
    return config


# -- the replica ---------------------------------------------------------------------------------
_built: list[ASGIApp] = []  # hands the app from StlmReplica.__init__ to _replica_app (same actor process)


def _replica_app() -> ASGIApp:
    """The ingress builder Ray Serve calls right after ``StlmReplica.__init__`` in the replica."""
    return _built.pop()


class StlmReplica:
    """One replica: the package, its scheduler and the app of ``stlm serve``.

    Ray Serve starts the app's lifespan (the scheduler thread) after this constructor, drives
    its routes from the proxy, calls :meth:`check_health` periodically (a failure makes Ray
    replace the replica), and runs the lifespan's shutdown (drain) when the replica stops.
    """

    def __init__(self, config: ServeConfig, metrics_interval_s: float = 5.0) -> None:
        if config.api_key is None and os.environ.get("STLM_API_KEY"):
            config = replace(config, api_key=os.environ["STLM_API_KEY"])
        self.service: CompletionService = load_service(config)
        from stlm.serve.app import create_app  # Starlette: only in a replica, not in the driver

        self.asgi_app = create_app(self.service)
        _built.append(self.asgi_app)
        self.exporter = MetricsExporter(self.service.metrics, metrics_interval_s)
        self.exporter.start()

    async def check_health(self) -> None:
        """Raise unless the app's own ``GET /health`` answers 200 (Ray then replaces the replica)."""
        self.exporter.start()  # no-op once running (the constructor starts it where a loop runs)
        status, body = await probe(self.asgi_app, "/health")
        if status != 200:
            raise RuntimeError(f"GET /health answered {status}: {body!r}")


def import_serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailableError(
            f"Ray Serve is not installed ({exc.name or 'ray'} is missing): --replicas and --autoscale run on Ray Serve",
            fix=INSTALL_FIX,
        ) from None
    return serve


def bind(config: ServeConfig, options: RayOptions) -> Any:
    """The Ray Serve application (``Deployment.bind()``) of ``config`` spread per ``options``.

    ``config.package`` is a path on the nodes that run replicas (it is not read here).
    """
    serve = import_serve()
    deployment = serve.deployment(serve.ingress(_replica_app)(StlmReplica))
    return deployment.options(**deployment_options(config, options)).bind(
        replica_config(config, options), options.metrics_interval_s
    )


# log_level/access_log configure uvicorn, which a replica does not run (Ray's proxy serves HTTP)
_CONFIG_KEYS = {f.name for f in fields(ServeConfig)} - {"package", "host", "port", "api_key", "log_level", "access_log"}
_OPTION_KEYS = {"replicas", "autoscale", "num_cpus", "num_gpus", "shutdown_timeout"}


def build_app(args: Mapping[str, Any]) -> Any:
    """Ray Serve application builder: ``serve run stlm.serve.ray.deployment:build_app package=PKG ...``.

    ``args`` as read by :func:`parse_app_args` (a KubeRay ``RayService``'s ``serveConfigV2`` passes
    them as the application's ``args``).
    """
    return bind(*parse_app_args(args))


def parse_app_args(args: Mapping[str, Any]) -> tuple[ServeConfig, RayOptions]:
    """The settings of :func:`build_app`'s ``args`` (strings from ``serve run``, or typed values).

    ``package`` (required), any ``stlm serve`` setting (``max_batch``, ``max_queue``,
    ``max_context``, ``prefill_chunk``, ``model_name``, ``threads``) and ``replicas``,
    ``autoscale`` (``"MIN:MAX"``), ``num_cpus``, ``num_gpus``, ``shutdown_timeout``. The API key
    comes from ``STLM_API_KEY`` in the replicas' environment (a Kubernetes Secret), never from args.
    """
    unknown = set(args) - _CONFIG_KEYS - _OPTION_KEYS - {"package"}
    if "package" not in args or unknown:
        raise InvalidArgumentError(
            f"application args {sorted(args)} are invalid: expected 'package' and any of "
            f"{sorted(_CONFIG_KEYS | _OPTION_KEYS)}",
            fix="pass e.g. package=/models/stablelm max_batch=8 autoscale=1:4",
        )
    config = ServeConfig(Path(str(args["package"])), **{k: _typed(k, args[k]) for k in _CONFIG_KEYS & set(args)})
    autoscale = args.get("autoscale")
    options = RayOptions(
        replicas=_typed("replicas", args["replicas"]) if "replicas" in args else None,
        autoscale=parse_autoscale(str(autoscale)) if autoscale is not None else None,
        num_cpus=_typed("num_cpus", args["num_cpus"]) if "num_cpus" in args else None,
        num_gpus=_typed("num_gpus", args["num_gpus"]) if "num_gpus" in args else None,
        shutdown_timeout=_typed("shutdown_timeout", args.get("shutdown_timeout", 30.0)),
    )
    return config, options


_OPTION_TYPES: dict[str, type] = {"replicas": int, "num_cpus": float, "num_gpus": float, "shutdown_timeout": float}


def _typed(key: str, value: Any) -> Any:
    """``value`` (a string from ``serve run``, or typed from a config file) as ``key``'s type."""
    declared = _OPTION_TYPES.get(key) or str({f.name: f.type for f in fields(ServeConfig)}[key])
    kind: Any = (
        declared if isinstance(declared, type) else float if "float" in declared else int if "int" in declared else str
    )
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"application arg {key}={value!r} is invalid: expected {kind.__name__}", fix=f"pass e.g. {key}=8"
        ) from None
