"""`stlm serve PKG --replicas 1` starts a Ray instance whose every process listens on loopback only.

The serve process runs without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` in its environment (so the
loopback comes from stlm, not from the test) and without ``--ray-address`` (the operator's
command), with a private ``RAY_TMPDIR`` (so it starts its own instance). Once a request has been
answered, every listening TCP socket of the serve process and its descendants (GCS, raylet,
dashboard and its agents, workers, the replica, Serve's proxy) is listed with psutil; any address
other than 127.0.0.1 / ::1 fails the test.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'stlm[ray]')")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

START_TIMEOUT = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(root: int) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every listening TCP socket of ``root`` and its descendants."""
    try:
        tree = psutil.Process(root)
        pids = {root} | {p.pid for p in tree.children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    found = []
    for pid in sorted(pids):
        try:
            process = psutil.Process(pid)
            name = " ".join(process.cmdline()[:1]) or process.name()
            sockets = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(c.laddr.ip, c.laddr.port, pid, name) for c in sockets if c.status == psutil.CONN_LISTEN]
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_every_ray_process_stlm_starts_listens_on_loopback(random_package: Path, tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="stlm-ray-lo-", dir="/tmp"))
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "stlm", "serve", str(random_package), "--replicas", "1", "--num-cpus", "0.5"]
    command += ["--port", str(port), "--max-batch", "2", "--max-context", "256"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "from Ray Serve (Ray at " not in log.read_text(errors="replace"):
            assert process.poll() is None, f"stlm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        gcs = re.search(r"Ray at (\S+?):\d+;", log.read_text(errors="replace"))
        assert gcs is not None and _loopback(gcs[1]), log.read_text()[-2000:]
        body = b'{"prompt": "Once", "max_tokens": 2}'
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
        sockets = _listening(process.pid)
        assert any(p == port for _, p, _, _ in sockets), sockets  # the listing sees Serve's proxy
        assert len({pid for _, _, pid, _ in sockets}) >= 4, sockets  # GCS, raylet, agents, workers, ...
        exposed = [s for s in sockets if not _loopback(s[0])]
        assert not exposed, f"Ray processes of stlm serve listen beyond loopback: {exposed}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
