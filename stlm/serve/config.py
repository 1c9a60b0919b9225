"""What ``stlm serve`` is configured with: :class:`ServeConfig`, the one place its defaults live.

The CLI's option defaults, :func:`stlm.serve.run_server` and the Ray deployment all read them
from here. Every value is checked on construction (:class:`InvalidArgumentError` naming the
option); checks that need the loaded package (the KV cache fits in memory, ``max_context`` fits
the model) are in :mod:`stlm.serve.resources`. Light: no web framework is imported.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from stlm.errors import InvalidArgumentError

__all__ = ["LOOPBACK_HOSTS", "ServeConfig", "available_cpus"]

#: Host names that always mean this machine (``--host`` binds loopback by default).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# name -> (CLI option, low, high, kind)
_INF = math.inf
_BOUNDS: dict[str, tuple[str, float, float, type]] = {
    "port": ("--port", 0, 65535, int),
    "max_batch": ("--max-batch", 1, 1 << 20, int),
    "max_queue": ("--max-queue", 0, 1 << 20, int),
    "prefill_chunk": ("--prefill-chunk", 1, 1 << 20, int),
    "max_connections": ("--max-connections", 1, 1 << 20, int),
    "max_body_bytes": ("max_body_bytes", 1024, 1 << 30, int),
    "shutdown_timeout": ("--shutdown-timeout", 0, 24 * 3600, float),
    "header_timeout": ("--header-timeout", 0.01, 3600, float),
    "body_timeout": ("--body-timeout", 0.01, 3600, float),
}


log = logging.getLogger(__name__)
MAX_THREADS = 1024
#: uvicorn's log levels (--log-level); stlm's own loggers follow the same level.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: --logprobs-mode choices (the first is the default): see stlm.runtime.logprobs.
LOGPROBS_MODES = ("raw", "processed")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``stlm serve`` is configured with (see :func:`stlm.serve.run_server`).

    ``max_context=None`` means ``min(model context, 2048)``. ``api_key=None`` serves without
    authentication (then only loopback Host names and ``application/json`` bodies are accepted,
    unless ``host`` names another address). Timeouts are in seconds: ``header_timeout`` for a
    request's headers to arrive, ``body_timeout`` for its whole body, ``shutdown_timeout`` for
    in-flight requests to finish after SIGTERM before they are cancelled. ``chat_template`` (a
    file, or the template text) replaces the package's chat template. ``logprobs_mode``: what
    reported log-probabilities are taken from ('raw': the model's own, OpenAI's definition;
    'processed': after logit_bias, penalties and temperature). ``log_level`` and ``access_log``
    configure uvicorn's and stlm's logging (not used on Ray Serve, whose proxy logs requests).
    ``otlp_traces_endpoint``: an OTLP/HTTP URL that receives a span tree per generation request
    (:mod:`stlm.serve.tracing`; needs the ``tracing`` extra).
    """

    package: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = None
    prefill_chunk: int = 256
    model_name: str | None = None
    threads: int | None = None
    max_connections: int = 256
    max_body_bytes: int = 4 << 20
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    chat_template: str | None = None
    logprobs_mode: str = "raw"
    log_level: str = "info"
    access_log: bool = True
    otlp_traces_endpoint: str | None = None

    def __post_init__(self) -> None:
        for name, (option, low, high, kind) in _BOUNDS.items():
            object.__setattr__(self, name, _bounded(option, getattr(self, name), low, high, kind))
        if self.max_context is not None:
            _bounded("--max-context", self.max_context, 2, 1 << 24, int)
        if self.threads is not None:
            # Bounded (ONNX Runtime starts one OS thread each), not tied to this machine's CPUs: with Ray
            # the configuration is checked where the driver runs, and replicas may run on larger hosts.
            _bounded("--threads", self.threads, 1, MAX_THREADS, int)
            if self.threads > available_cpus():
                log.warning(
                    "--threads %d exceeds the %d CPUs this process may use here", self.threads, available_cpus()
                )
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidArgumentError(
                f"--host {self.host!r} is invalid: expected an address or host name", fix="pass e.g. --host 127.0.0.1"
            )
        if self.api_key is not None:
            _check_key(self.api_key)
        _choice("--logprobs-mode", self.logprobs_mode, LOGPROBS_MODES)
        _choice("--log-level", self.log_level, LOG_LEVELS)
        if not isinstance(self.access_log, bool):
            raise InvalidArgumentError(
                f"access_log={self.access_log!r} is invalid: expected a bool",
                fix="pass --access-log or --no-access-log",
            )
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise InvalidArgumentError(
                f"--chat-template {self.chat_template!r} is invalid: expected a file name or a template",
                fix="pass --chat-template FILE",
            )
        endpoint = self.otlp_traces_endpoint
        if endpoint is not None and (not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://"))):
            raise InvalidArgumentError(
                f"--otlp-traces-endpoint {endpoint!r} is invalid: expected an http:// or https:// URL",
                fix="pass e.g. --otlp-traces-endpoint http://127.0.0.1:4318/v1/traces",
            )
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name.strip()):
            raise InvalidArgumentError(
                f"--model-name {self.model_name!r} is invalid: expected a non-empty name",
                fix="omit --model-name to use the package folder's name",
            )


def _bounded(option: str, value: object, low: float, high: float, kind: type, why: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and isinstance(value, float)):
        raise InvalidArgumentError(
            f"{option} {value!r} is invalid: expected {'a whole number' if kind is int else 'a number'}",
            fix=f"pass {option} between {_fmt(low)} and {_fmt(high)}",
        )
    number = float(value) if kind is float else value
    if not (math.isfinite(number) and low <= number <= high):
        raise InvalidArgumentError(
            f"{option} {value!r} is out of range: expected {_fmt(low)}..{_fmt(high)} {why}".rstrip(),
            fix=f"pass {option} between {_fmt(low)} and {_fmt(high)}",
        )
    return number


def _choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgumentError(
            f"{option} {value!r} is invalid: expected one of {', '.join(choices)}", fix=f"pass {option} {choices[0]}"
        )


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_key(key: object) -> None:
    # never echo the key itself in a message: it is a secret
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(
            "--api-key is empty: an empty key would switch authentication off",
            fix="pass a non-empty key (e.g. from `openssl rand -hex 32`), or omit --api-key to serve without one",
        )
    if not all("!" <= c <= "~" for c in key):
        raise InvalidArgumentError(
            "--api-key contains spaces, control or non-ASCII characters, which an HTTP header cannot carry",
            fix="use printable ASCII without spaces (e.g. `openssl rand -hex 32`)",
        )
