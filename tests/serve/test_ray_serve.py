"""`stlm serve --replicas 2` on a real local Ray cluster, driven over loopback with the `openai` client.

One `python -m stlm serve PKG --replicas 2 --ray-address local` process (it starts and owns its
Ray instance) serves the module; the tests run in file order: outputs and errors against the
single-process server, streaming, the loss of a replica, per-replica metrics, then an autoscaled
deployment joined to the same Ray instance, and last the SIGTERM teardown (no process left).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import client as http_client
from pathlib import Path
from typing import Any

import pytest

# Joining stlm serve's Ray instance (token auth by default, token in ~/.ray/auth_token) from this
# process takes RAY_AUTH_MODE=token, read when ray is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray on loopback only (as `stlm serve --replicas` starts it): no traffic to the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'stlm[ray]')")

import openai

from stlm.runtime import Generator
from stlm.serve import BackgroundServer, ServeConfig, load_service

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "ray-test-key"
MAX_BATCH, MAX_QUEUE, MAX_CONTEXT = 4, 16, 2048
SETTINGS = ["--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-context", str(MAX_CONTEXT)]
REPLICA_TITLE = "ray::ServeReplica:stlm:stlm"
START_TIMEOUT = 300.0
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
MODEL = "tiny"  # the package folder's name
PROMPTS = [f"Prompt number {i}: once upon a time" + " and then" * (i % 5) for i in range(16)]


@dataclass
class Cluster:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    address: str
    package: Path
    descendants: set[int]
    ray_tmp: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout:.0f} s"
        time.sleep(interval)


def http(url: str, *, body: bytes | None = None, key: str | None = KEY, timeout: float = 60) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET (no body) or POST."""
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry)] = (int(stat[1]), cmdline.strip())
    return found


def descendants_of(root: int) -> set[int]:
    table, found, frontier = processes(), set(), {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def replica_pids() -> set[int]:
    return {pid for pid, (_, cmd) in processes().items() if cmd.startswith(REPLICA_TITLE)}


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


@pytest.fixture(scope="module")
def package(random_package: Path) -> Path:
    return random_package


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    """Ray's temp dir for this module (sessions, logs, sockets): short, private, removed after."""
    path = Path(tempfile.mkdtemp(prefix="stlm-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(package: Path, ray_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = free_port()
    log = tmp_path_factory.mktemp("ray-log") / "serve.log"
    command = [sys.executable, "-m", "stlm", "serve", str(package), "--replicas", "2", "--num-cpus", "0.5"]
    command += ["--port", str(port), "--api-key", KEY, "--ray-address", "local", *SETTINGS]
    with open(log, "wb") as sink:
        env = {**ENV, "RAY_TMPDIR": str(ray_tmp)}
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, f"stlm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        return "from Ray Serve (Ray at " in log.read_text(errors="replace")

    try:
        wait_for(up, START_TIMEOUT, "stlm serve's 'serving' line")
        match = re.search(r"Ray at (\S+);", log.read_text(errors="replace"))
        assert match, log.read_text()[-2000:]
        assert http(f"{url}/health", key=None)[0] == 200 and len(replica_pids()) == 2
        yield Cluster(url, process, log, match[1], package, descendants_of(process.pid), ray_tmp)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


@pytest.fixture(scope="module")
def generator(package: Path) -> Generator:
    return Generator.load(package)


def client(base: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, timeout=120, **kw)


def test_16_concurrent_requests_equal_single_process(cluster: Cluster, generator: Generator) -> None:
    api = client(cluster.url, max_retries=0)
    model = api.models.list().data[0].id
    assert model == cluster.package.name

    def one(prompt: str) -> str:
        return api.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, PROMPTS))
    assert texts == [generator.generate(p, max_new_tokens=16, temperature=0) for p in PROMPTS]
    assert len(replica_pids()) == 2


def test_streaming_through_the_proxy(cluster: Cluster, generator: Generator) -> None:
    api = client(cluster.url, max_retries=0)
    stream = api.completions.create(
        model=cluster.package.name,
        prompt=PROMPTS[3],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == generator.generate(PROMPTS[3], max_new_tokens=24, temperature=0)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


BAD_REQUESTS = [
    ("POST", "/v1/completions", b"{not json", KEY),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "model": "nope"}).encode(), KEY),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**6}).encode(), KEY),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "temperature": -1}).encode(), KEY),
    ("POST", "/v1/completions", json.dumps({"prompt": "x"}).encode(), None),
    ("GET", "/v1/models", None, "wrong"),
    ("GET", "/v1/nothing", None, KEY),
    ("GET", "/v1/completions", None, KEY),
]


def test_errors_and_routes_match_the_single_process_server(cluster: Cluster) -> None:
    config = ServeConfig(
        cluster.package, port=0, api_key=KEY, max_batch=MAX_BATCH, max_queue=MAX_QUEUE, max_context=MAX_CONTEXT
    )
    with BackgroundServer(load_service(config)) as single:
        for method, path, body, key in BAD_REQUESTS:
            assert method == ("POST" if body is not None else "GET")
            expected = http(single.url + path, body=body, key=key)
            assert expected[0] >= 400, (path, expected)
            assert http(cluster.url + path, body=body, key=key) == expected, (path, body, key)
        for path in ("/v1/models", "/health"):
            assert http(cluster.url + path) == http(single.url + path)


def _raw_completion(url: str, stream: bool) -> tuple[int, str, bytes]:
    """(status, content type, body) of one long completion, read to the end or to a cut connection."""
    host, port = url.removeprefix("http://").split(":")
    connection = http_client.HTTPConnection(host, int(port), timeout=120)
    body = {"prompt": "Hi", "max_tokens": MAX_CONTEXT - 8, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    data = b""
    try:
        data = response.read()
    except http_client.IncompleteRead as exc:
        data = exc.partial
    finally:
        connection.close()
    return response.status, response.getheader("content-type", ""), data


def _lost(status: int, kind: str, data: bytes) -> bool:
    """True for the retryable error of a lost replica, in JSON or as the stream's last event."""
    if status == 503 and kind.startswith("application/json"):
        return json.loads(data)["error"]["code"] == "replica_unavailable"
    events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line.startswith(b"data: ")]
    if status != 200 or not events or events[-1] == b"[DONE]":
        return False
    return json.loads(events[-1]).get("error", {}).get("code") == "replica_unavailable"


def _complete(status: int, kind: str, data: bytes) -> bool:
    if kind.startswith("text/event-stream"):
        return status == 200 and data.endswith(b"data: [DONE]\n\n")
    return status == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(cluster: Cluster) -> None:
    before = replica_pids()
    assert len(before) == 2
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(_raw_completion, cluster.url, i % 2 == 0) for i in range(6)]
        time.sleep(0.5)
        ticks = {pid: cpu_ticks(pid) for pid in before}
        time.sleep(0.3)
        victim = max(before, key=lambda pid: cpu_ticks(pid) - ticks[pid])  # the busier one holds requests
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=180) for f in pending]
    assert all(_complete(*r) or _lost(*r) for r in results), [(r[0], r[1], r[2][-300:]) for r in results]
    assert any(_lost(*r) for r in results), "the killed replica held none of the requests"
    # The openai client retries the 503 of a lost replica; meanwhile Ray starts a new replica.
    api = client(cluster.url, max_retries=4)
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(lambda p: api.completions.create(model=MODEL, prompt=p, max_tokens=8).choices[0].text, PROMPTS)
        )
    assert len(texts) == len(PROMPTS)
    wait_for(lambda: len(replica_pids() - before) == 1 and len(replica_pids()) == 2, 180, "a new replica")
    wait_for(lambda: http(f"{cluster.url}/health", key=None)[0] == 200, 60, "health after replacement")


def _ray_metrics(ray_tmp: Path) -> list[str]:
    """Sample lines ``ray_stlm_*`` from every Ray metrics endpoint (the Prometheus file_sd Ray writes)."""
    targets = set()
    for discovery in ray_tmp.rglob("prom_metrics_service_discovery.json"):
        try:
            targets |= {t for group in json.loads(discovery.read_text()) for t in group["targets"]}
        except (OSError, ValueError):
            continue
    lines = []
    for target in sorted(targets):
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
                lines += [x for x in response.read().decode().splitlines() if x.startswith("ray_stlm_")]
        except OSError:
            continue
    return lines


def test_metrics_of_every_replica_reach_prometheus(cluster: Cluster) -> None:
    status, text = http(f"{cluster.url}/metrics")
    assert status == 200 and 'stlm_slots_total{model_name="tiny"} 4' in text  # one replica's own exposition
    live = replica_pids()

    def per_replica() -> set[str]:
        return {
            m[1]
            for line in _ray_metrics(cluster.ray_tmp)
            if line.startswith("ray_stlm_slots_total{") and (m := re.search(r'replica="([^"]+)"', line))
        }

    wait_for(lambda: len(per_replica()) >= len(live), 120, "ray_stlm_slots_total of every replica", interval=3)
    served = [
        x for x in _ray_metrics(cluster.ray_tmp) if x.startswith("ray_stlm_requests_total{") and 'status="200"' in x
    ]
    assert sum(float(x.rsplit(" ", 1)[1]) for x in served) > 0


def test_autoscaling_adds_a_replica_under_load(cluster: Cluster) -> None:
    import ray
    from ray import serve

    from stlm.serve.ray import RayOptions, bind

    fast = {"upscale_delay_s": 1, "downscale_delay_s": 600, "look_back_period_s": 2}
    config = ServeConfig(cluster.package, api_key=KEY, max_batch=2, max_queue=16, max_context=MAX_CONTEXT)
    options = RayOptions(autoscale=(1, 2), num_cpus=0.5, autoscaling=fast)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.run(bind(config, options), name="autoscale", route_prefix="/autoscale")

        def running() -> int:
            states = serve.status().applications["autoscale"].deployments["stlm"].replica_states
            return int(states.get("RUNNING", 0))

        assert running() == 1
        api = client(f"{cluster.url}/autoscale", max_retries=2)
        deadline = time.monotonic() + 150
        with ThreadPoolExecutor(8) as pool:
            while running() < 2:
                assert time.monotonic() < deadline, "autoscaling did not add a replica within 150 s"
                load = [pool.submit(api.completions.create, model=MODEL, prompt=p, max_tokens=64) for p in PROMPTS[:8]]
                assert all(f.result(timeout=120).choices for f in load)
        assert running() == 2
    finally:
        serve.delete("autoscale")
        ray.shutdown()


def test_sigterm_drains_and_leaves_no_process(cluster: Cluster) -> None:
    spawned = cluster.descendants | descendants_of(cluster.process.pid)
    assert spawned, "stlm serve started no Ray process"
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(180) == 0, cluster.log.read_text()[-4000:]
    wait_for(lambda: not (spawned & set(processes())), 60, "every Ray process of stlm serve gone")
