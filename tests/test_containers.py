"""End to end in real containers: the images, the generated compose file, Prometheus and the dashboard.

For K = 3 MNIST clients with mutual TLS + per-client tokens (``--secure``, the deployment's default
way; the plaintext compose file differs only in the secrets and is checked statically in
test_deploy.py: one container run keeps CI within its time), the generated compose file is checked by ``docker-compose config``, brought up with the local images
(genfl:latest and genfl-prometheus:latest from ``bash deploy/build-image.sh --offline``) and must:

- complete the run: summary.json in the server's volume, every client container exited 0, never restarted;
- mount into each client container exactly its own shard, read-only, and no other data (with --secure
  also only its own certificate, key and token, read-only);
- keep the server healthy by its compose healthcheck (with TLS on: the probe speaks mutual TLS);
- have Prometheus (a container of the deployment) scrape the server and all 3 clients (``up == 1`` for
  4 targets, through its HTTP API), with the round counters at the rounds run;
- answer every query of every panel of deploy/grafana/dashboards/genfl.json with data (as Grafana asks
  them: a range query over the run), since the Grafana image itself cannot be pulled here;
- leave no container, network or volume behind after ``down -v``.

Needs a Docker engine, docker-compose (v1, Debian) or the compose plugin (v2), and the two images.
Without them the test is skipped with the reason, unless GENFL_REQUIRE_DOCKER is set (.ci/run sets it),
when it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, wait_until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "deploy" / "compose" / "generate.py"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "genfl.json"
IMAGE = "genfl:latest"
PROMETHEUS_IMAGE = "genfl-prometheus:latest"
BUILD_COMMAND = "bash deploy/build-image.sh --offline"
CLIENTS = 3
ROUNDS = 2
# Small and quick: 600 training images over 3 clients, 2 rounds per phase, a small synthetic set.
SERVER_OPTIONS = ["local-epochs=1", "synthetic-samples=200", "cas-epochs=1", "pretrain-epochs=1",
                  "round-timeout=300"]
RUN_TIMEOUT = 900  # seconds for the whole run on a loaded 2-core machine
LINGER_SECONDS = 12  # > 2 scrape intervals (5 s): the final values get scraped


def _docker_problem() -> str | None:
    """Why containers cannot run here (None: they can)."""
    if shutil.which("docker") is None:
        return "no docker command (Debian: apt-get install docker.io; or bash scripts/setup.sh)"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if info.returncode != 0:
        return f"no Docker engine answers ({info.stderr.strip()[:200]}); start dockerd"
    if _compose_command() is None:
        return "neither docker-compose (v1) nor the docker compose plugin (v2) is installed"
    for image in (IMAGE, PROMETHEUS_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            return f"image {image} is missing: build it with `{BUILD_COMMAND}`"
    return None


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def docker_ready():
    problem = _docker_problem()
    if problem is not None:
        if os.environ.get("GENFL_REQUIRE_DOCKER"):
            pytest.fail(f"GENFL_REQUIRE_DOCKER is set, but {problem}")
        pytest.skip(f"container test needs Docker: {problem} (set GENFL_REQUIRE_DOCKER=1 to fail instead)")


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


class Deployment:
    """One generated compose project, driven with docker-compose (v1) or docker compose (v2)."""

    def __init__(self, folder: Path, project: str):
        self.file = folder / "docker-compose.yml"
        self.project = project
        self._ids: dict[str, str] = {}  # service -> container id (compose v1 is slow to start: ask once)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run(*_compose_command(), "-p", self.project, "-f", str(self.file), *args, timeout=timeout,
                   check=check)

    def container(self, service: str) -> dict:
        if service not in self._ids:
            [self._ids[service]] = self.compose("ps", "-q", service).stdout.split()
        return json.loads(run("docker", "inspect", self._ids[service]).stdout)[0]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False, timeout=60).stdout[-12000:]

    def resources(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: run("docker", *command, "--filter", label, "-q").stdout.split()
                for kind, command in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                                      ("volumes", ["volume", "ls"]))}


class Prometheus:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def instant(self, query: str, at: float) -> list[dict]:
        return self.get("query", query=query, time=f"{at:.3f}")["result"]

    def range(self, query: str, start: float, end: float) -> list[dict]:
        return self.get("query_range", query=query, start=f"{start:.3f}", end=f"{end:.3f}", step="5")["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]  # rows may nest panels
    return [(panel.get("title", "?"), target["expr"]) for panel in panels
            for target in panel.get("targets", []) if target.get("expr")]


def partition(data_root, out: Path) -> None:
    run(sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist", "--data-root",
        str(data_root("mnist")), "--clients", str(CLIENTS), "--alpha", "1.0", "--train-subset", "600",
        "--seed", "0", "--out", str(out), timeout=300)


def generate(folder: Path, shards: Path, test_data: Path, prometheus_port: int, project: str, secure: bool) -> None:
    args = [sys.executable, str(GENERATOR), "--clients", str(CLIENTS), "--shards-dir", str(shards),
            "--out", str(folder / "docker-compose.yml"), "--test-data", str(test_data),
            "--rounds", str(ROUNDS), "--image", IMAGE, "--no-build", "--prometheus-image", PROMETHEUS_IMAGE,
            "--no-grafana", "--prometheus-port", str(prometheus_port), "--project-name", project,
            "--linger-seconds", str(LINGER_SECONDS), "--client-threads", "1"]
    for option in SERVER_OPTIONS:
        args += ["--server-option", option]
    if secure:
        args += ["--secure", "--secrets-dir", str(folder.parent / "secrets")]
    run(*args, timeout=120)


def check_client_mounts(container: dict, index: int, shards: Path, secrets: Path | None) -> None:
    """Exactly its own shard under /data, read-only; with --secure only its own secrets besides."""
    name = f"client-{index:03d}"
    mounts = {m["Destination"]: m for m in container["Mounts"]}
    for destination, mount in mounts.items():
        assert mount["Type"] == "bind" and mount["RW"] is False, f"{name}: {destination} is not a read-only bind"
    data = sorted(d for d in mounts if not d.startswith("/run/secrets/"))
    assert data == ["/data/shard.npz"], f"{name} mounts {data}"
    assert Path(mounts["/data/shard.npz"]["Source"]).resolve() == (shards / f"{name}.npz").resolve()
    secret_mounts = {d: Path(m["Source"]).name for d, m in mounts.items() if d.startswith("/run/secrets/")}
    if secrets is None:
        assert secret_mounts == {}
    else:
        assert secret_mounts == {"/run/secrets/genfl/ca.pem": "ca.pem",
                                 "/run/secrets/genfl/client.pem": f"{name}.pem",
                                 "/run/secrets/genfl/client.key": f"{name}.key",
                                 "/run/secrets/genfl/client.token": f"{name}.token"}
        for destination in secret_mounts:
            assert Path(mounts[destination]["Source"]).parent.resolve() == secrets.resolve()


def test_compose_run_in_containers_with_mtls_and_tokens(docker_ready, data_root, tmp_path):
    secure = True
    shards = tmp_path / "shards"
    partition(data_root, shards)
    folder = tmp_path / "compose"
    project = f"genfl-test-{os.getpid()}-{'secure' if secure else 'plain'}"
    prometheus_port = free_port()
    generate(folder, shards, data_root("mnist"), prometheus_port, project, secure)
    deployment = Deployment(folder, project)
    # docker-compose v1 (1.29) accepts the file: nothing in it is v2-only.
    deployment.compose("config", "-q")

    started = time.time()
    try:
        deployment.compose("up", "-d", timeout=600)
        client_names = [f"client-{i:03d}" for i in range(CLIENTS)]

        def clients_exited():
            states = [deployment.container(name)["State"] for name in client_names]
            return all(s["Status"] == "exited" and not s["Restarting"] for s in states) and states

        states = wait_until(clients_exited, RUN_TIMEOUT, "every client container to exit", interval=5,
                            details=deployment.logs)
        for name, state in zip(client_names, states, strict=True):
            container = deployment.container(name)
            assert state["ExitCode"] == 0, f"{name} exited {state['ExitCode']}\n{deployment.logs()}"
            assert container["RestartCount"] == 0, f"{name} was restarted\n{deployment.logs()}"

        server = deployment.container("server")

        def summary():
            result = run("docker", "exec", server["Id"], "cat", "/out/summary.json", check=False)
            return json.loads(result.stdout) if result.returncode == 0 else None

        run_summary = wait_until(summary, 120, "summary.json in the server's volume", interval=2,
                                 details=deployment.logs)
        assert any(m["Type"] == "volume" and m["Destination"] == "/out" for m in server["Mounts"])
        # The server idles after its run, still answering the healthcheck (through TLS with --secure).
        assert wait_until(lambda: deployment.container("server")["State"]["Health"]["Status"] == "healthy",
                          60, "the server to stay healthy", interval=2, details=deployment.logs)
        ended = time.time()

        for index, name in enumerate(client_names):
            check_client_mounts(deployment.container(name), index, shards,
                                tmp_path / "secrets" if secure else None)

        prometheus = Prometheus(prometheus_port)
        window = f"{int(ended - started) + 60}s"
        ever_up = prometheus.instant(f'max_over_time(up{{job=~"genfl-.*"}}[{window}])', ended)
        instances = {series["metric"]["instance"]: float(series["value"][1]) for series in ever_up}
        assert instances == {"server:9100": 1.0, **{f"{n}:9100": 1.0 for n in client_names}}, ever_up
        rounds = prometheus.instant(f"max_over_time(genfl_rounds_completed_total[{window}])", ended)
        completed = {series["metric"]["phase"]: float(series["value"][1]) for series in rounds}
        assert completed == {"cvae": ROUNDS, "classifier": ROUNDS}, rounds

        no_data = [f"{title}: {expr}" for title, expr in dashboard_queries()
                   if not prometheus.range(expr, started, ended)]
        assert not no_data, "dashboard queries without data:\n" + "\n".join(no_data)
        assert run_summary, run_summary
    finally:
        deployment.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    assert deployment.resources() == {"containers": [], "networks": [], "volumes": []}


def test_image_runs_as_10001_from_its_venv_with_nothing_of_the_build_host(docker_ready):
    """The image's history, config and files hold no package index, pip configuration or host path."""
    image = json.loads(run("docker", "image", "inspect", IMAGE).stdout)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert not [e for e in config["Env"] if e.startswith("PIP_") or "http" in e], config["Env"]
    assert config["Labels"].get("org.genfl.inputs"), "not built by deploy/build-image.sh"
    history = run("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    for host_detail in ("127.0.0.1", "PIP_FIND_LINKS", "PIP_INDEX_URL", str(REPO), "/opt/wheels", "/opt/pypi"):
        assert host_detail not in history, f"{host_detail} is in the image's history"
    probe = ("id -u; for c in python genfl-server genfl-client genfl-health; do command -v $c; done; "
             "ls /etc/pip.conf /etc/xdg/pip /root/.config/pip /home/genfl/.config/pip /tmp/wheels 2>/dev/null; "
             "python -c 'import sys, torch, genfl_server; print(sys.prefix, torch.__version__)'")
    result = run("docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c", probe, timeout=180, check=False)
    assert result.stdout.split("\n")[:5] == ["10001", "/opt/genfl/bin/python", "/opt/genfl/bin/genfl-server",
                                              "/opt/genfl/bin/genfl-client", "/usr/local/bin/genfl-health"], result
    assert result.stdout.split("\n")[5].startswith("/opt/genfl 2.14.1"), result  # no pip config, no wheels left
