"""The Ray Serve deployment without a cluster: options, CLI mistakes, a missing Ray, the lost-replica
middleware around Ray's proxy, and the replica's health check over the real app."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from stlm.cli import cli
from stlm.errors import InvalidArgumentError
from stlm.serve import ServeConfig
from stlm.serve.ray import RayOptions, build_app, deployment_options, parse_autoscale
from stlm.serve.ray.deployment import StlmReplica, _replica_app, replica_config
from stlm.serve.ray.metrics import parse_sample, probe
from stlm.serve.ray.proxy import LostReplicaMiddleware, proxy_middlewares

CONFIG = ServeConfig(Path("pkg"), max_batch=6, max_queue=10)


@given(st.text(max_size=12))
def test_autoscale_parses_or_says_what_is_expected(text: str) -> None:
    try:
        low, high = parse_autoscale(text)
    except InvalidArgumentError as exc:
        assert "MIN:MAX" in str(exc) and "--autoscale 1:4" in str(exc)
    else:
        assert 0 <= low <= high and high >= 1
        low_text, high_text = "".join(text.split()).split(":")
        assert (int(low_text), int(high_text)) == (low, high)


@pytest.mark.parametrize("text, pair", [("1:4", (1, 4)), ("0:2", (0, 2)), ("3:3", (3, 3))])
def test_autoscale_values(text: str, pair: tuple[int, int]) -> None:
    assert parse_autoscale(text) == pair


@pytest.mark.parametrize("text", ["4:1", "0:0", "1", "-1:2", "a:b", ":", "1:2:3", ""])
def test_autoscale_mistakes(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="--autoscale"):
        parse_autoscale(text)


def test_fixed_replicas_admit_what_one_server_admits() -> None:
    options = deployment_options(CONFIG, RayOptions(replicas=3, num_cpus=2, num_gpus=1))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 6 + 10
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert options["graceful_shutdown_timeout_s"] == 30.0
    assert deployment_options(CONFIG, RayOptions())["num_replicas"] == 1


def test_autoscaling_targets_max_batch_ongoing_requests() -> None:
    options = deployment_options(CONFIG, RayOptions(autoscale=(0, 4), autoscaling={"upscale_delay_s": 5}))
    assert "num_replicas" not in options and options["ray_actor_options"] == {}
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 6,
        "upscale_delay_s": 5,
    }


def test_replica_threads_follow_its_cpus() -> None:
    assert replica_config(CONFIG, RayOptions(num_cpus=4)).threads == 4
    assert replica_config(CONFIG, RayOptions(num_cpus=0.5)).threads is None
    assert replica_config(ServeConfig(Path("p"), threads=2), RayOptions(num_cpus=4)).threads == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"replicas": 2, "autoscale": (1, 2)}, "both given"),
        ({"replicas": 0}, "--replicas 0"),
        ({"num_cpus": -1}, "--num-cpus -1"),
        ({"num_gpus": float("nan")}, "--num-gpus nan"),
        ({"shutdown_timeout": -5}, "shutdown timeout"),
    ],
)
def test_option_mistakes(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        RayOptions(**kwargs)


@pytest.mark.parametrize(
    "args, match",
    [
        ({}, "'package'"),
        ({"package": "p", "api_key": "k"}, "api_key"),
        ({"package": "p", "max_batch": "x"}, "max_batch"),
    ],
)
def test_application_builder_args(args: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        build_app(args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--autoscale", "4:1"], "--autoscale '4:1' is invalid"),
        (["--replicas", "0"], "--replicas 0 is invalid"),
        (["--replicas", "2", "--autoscale", "1:2"], "both given"),
        (["--replicas", "2", "--port", "0"], "--port 0 is invalid with Ray Serve"),
    ],
)
def test_cli_mistakes_exit_2(flags: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), *flags])
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output


BLOCK_RAY = "import sys; sys.modules['ray'] = None; from stlm.cli import main; main()"


def test_missing_ray_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "serve", str(tmp_path), "--replicas", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and "pip install 'stlm[ray]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_single_process_serve_never_imports_ray(random_package: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCK_RAY, "serve", str(random_package), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr


# -- the lost-replica middleware around Ray's proxy -------------------------------------------------
def drive(app: Any, *, disconnect: bool = False) -> list[dict[str, Any]]:
    """Run ``app`` on one GET and return the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"} if disconnect else {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent


def proxy_sending(*messages: dict[str, Any], read: bool = False) -> Any:
    """A stand-in for Ray's proxy that sends ``messages`` and returns, as it does when a replica dies."""

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        if read:
            await receive()
        for message in messages:
            await send(message)

    return proxy


START_SSE = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
START_JSON = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}


def test_an_unanswered_request_gets_a_retryable_503() -> None:
    [start, body] = drive(LostReplicaMiddleware(proxy_sending()))
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error" and "retry" in error["message"]
    assert not body.get("more_body", False)


def test_a_cut_stream_ends_with_an_error_event() -> None:
    chunk = {"type": "http.response.body", "body": b'data: {"x": 1}\n\n', "more_body": True}
    sent = drive(LostReplicaMiddleware(proxy_sending(START_SSE, chunk)))
    assert sent[:2] == [START_SSE, chunk] and len(sent) == 3 and not sent[2].get("more_body", False)
    event = sent[2]["body"]
    assert event.startswith(b"data: ") and json.loads(event[6:])["error"]["code"] == "replica_unavailable"
    # a stream cut after its [DONE] event is only closed
    done = {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True}
    assert drive(LostReplicaMiddleware(proxy_sending(START_SSE, done)))[2] == {
        "type": "http.response.body",
        "body": b"",
    }


def test_complete_responses_and_gone_clients_are_left_alone() -> None:
    whole = (START_JSON, {"type": "http.response.body", "body": b"{}"})
    assert drive(LostReplicaMiddleware(proxy_sending(*whole))) == list(whole)
    assert drive(LostReplicaMiddleware(proxy_sending(read=True)), disconnect=True) == []
    [middleware] = proxy_middlewares()
    assert middleware.cls is LostReplicaMiddleware


# -- the replica ------------------------------------------------------------------------------------
def test_replica_health_is_the_apps_health(random_package: Path) -> None:
    replica = StlmReplica(ServeConfig(random_package, max_batch=2))
    app = _replica_app()
    assert app is replica.asgi_app
    service = replica.service
    service.scheduler.start()
    try:
        asyncio.run(replica.check_health())
        status, body = asyncio.run(probe(app, "/health"))
        assert status == 200 and json.loads(body)["status"] == "ok"
    finally:
        service.scheduler.stop()
    with pytest.raises(RuntimeError, match="GET /health answered 503"):
        asyncio.run(replica.check_health())


def test_metric_sample_names() -> None:
    assert parse_sample('stlm_requests_total{status="200"}') == ("stlm_requests_total", {"status": "200"})
    assert parse_sample("stlm_slots_total") == ("stlm_slots_total", {})
    assert parse_sample('x_bucket{le="+Inf",a="q\\"b"}') == ("x_bucket", {"le": "+Inf", "a": 'q"b'})
    with pytest.raises(ValueError):
        parse_sample("1bad")
