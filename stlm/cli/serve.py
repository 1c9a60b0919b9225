"""``stlm serve``: the command's options (defaults from :class:`~stlm.serve.config.ServeConfig`) and
its two ways to run, in this process or as Ray Serve replicas. Registered by :mod:`stlm.cli`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from stlm.cli.output import quiet
from stlm.serve.config import LOG_LEVELS, LOGPROBS_MODES, ServeConfig
from stlm.support.extras import require_extra


def _api_key(value: str | None) -> str | None:
    """click reads an empty STLM_API_KEY as unset; an empty key must be refused, not ignored."""
    if value is None and os.environ.get("STLM_API_KEY") == "":
        return ""  # ServeConfig refuses it with the message for an empty key
    return value


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--host", default=ServeConfig.host, show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=ServeConfig.port, show_default=True, type=int, help="TCP port (0: any free port).")
@click.option(
    "--api-key",
    default=None,
    envvar="STLM_API_KEY",
    callback=lambda ctx, param, value: _api_key(value),
    help="Require 'Authorization: Bearer KEY' on every route but /health (or set STLM_API_KEY). Without a key "
    "only loopback Host names and application/json bodies are accepted.",
)
@click.option(
    "--max-batch",
    default=ServeConfig.max_batch,
    show_default=True,
    type=int,
    help="Sequences decoded together (cache slots).",
)
@click.option(
    "--max-queue",
    default=ServeConfig.max_queue,
    show_default=True,
    type=int,
    help="Sequences that may wait for a slot; beyond this requests get 429.",
)
@click.option(
    "--max-context",
    default=None,
    type=int,
    help="Tokens per slot (prompt + completion) [default: min(model context, 2048)].",
)
@click.option("--model-name", default=None, help="Model id clients pass [default: the package folder's name].")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads [default: ORT's].")
@click.option(
    "--max-connections",
    default=ServeConfig.max_connections,
    show_default=True,
    type=int,
    help="Open connections; past it the one waiting longest for headers is closed (or 503).",
)
@click.option(
    "--header-timeout",
    default=ServeConfig.header_timeout,
    show_default=True,
    type=float,
    help="Seconds a connection has to send a request's headers.",
)
@click.option(
    "--body-timeout",
    default=ServeConfig.body_timeout,
    show_default=True,
    type=float,
    help="Seconds a request has to send its whole body (else 408).",
)
@click.option(
    "--shutdown-timeout",
    default=ServeConfig.shutdown_timeout,
    show_default=True,
    type=float,
    help="After SIGTERM/SIGINT, seconds in-flight requests have to finish before they are cancelled.",
)
@click.option(
    "--replicas",
    default=None,
    type=int,
    help="Serve from N replicas on Ray Serve (each with its own scheduler and KV cache); needs stlm[ray].",
)
@click.option(
    "--autoscale",
    default=None,
    metavar="MIN:MAX",
    help="Ray Serve replicas scaled on load between MIN and MAX (target: --max-batch ongoing requests each).",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster to join with --replicas/--autoscale (e.g. auto, HOST:6379) [default: the local one, or a new one].",
)
@click.option(
    "--chat-template",
    default=None,
    metavar="FILE",
    help="Jinja chat template for /v1/chat/completions (replaces the package's) [default: the package's, if any].",
)
@click.option(
    "--logprobs-mode",
    type=click.Choice(list(LOGPROBS_MODES)),
    default=ServeConfig.logprobs_mode,
    show_default=True,
    help="Reported log-probabilities: the model's own (raw, OpenAI's definition) or after logit_bias, "
    "penalties and temperature (processed).",
)
@click.option(
    "--log-level",
    type=click.Choice(list(LOG_LEVELS)),
    default=ServeConfig.log_level,
    show_default=True,
    help="Log level of the server (uvicorn and stlm).",
)
@click.option(
    "--access-log/--no-access-log", default=ServeConfig.access_log, show_default=True, help="Log every request."
)
@click.option("--num-cpus", default=None, type=float, help="CPUs reserved per Ray Serve replica [default: 1].")
@click.option("--num-gpus", default=None, type=float, help="GPUs per Ray Serve replica (1: one engine per GPU).")
def serve(
    package: Path,
    replicas: int | None,
    autoscale: str | None,
    ray_address: str | None,
    num_cpus: float | None,
    num_gpus: float | None,
    **options: Any,
) -> None:
    """Serve PACKAGE over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) with continuous
    batching.

    With --replicas or --autoscale, the same server runs as replicas on Ray Serve (pip install 'stlm[ray]').
    """
    ctx = click.get_current_context()
    if quiet() and ctx.get_parameter_source("log_level") in (None, ParameterSource.DEFAULT):
        options["log_level"] = "error"  # -q: errors only, unless --log-level says otherwise
    if any(v is not None for v in (replicas, autoscale, ray_address, num_cpus, num_gpus)):
        require_extra("ray", feature="serving on Ray Serve (--replicas/--autoscale)")
        from stlm.serve.ray import run_ray_server

        run_ray_server(
            package,
            replicas=replicas,
            autoscale=autoscale,
            ray_address=ray_address,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            **options,
        )
        return
    from stlm.serve import run_server  # needs the serve extra (a clear error without it)

    if run_server(ServeConfig(package, **options)) is not None:
        # stopped by SIGTERM/SIGINT and shut down within --shutdown-timeout: end the process now
        # instead of after the interpreter's teardown (~0.5 s), so that it ends within the deadline
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
