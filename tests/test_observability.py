"""Metrics, health and logs of real server/client processes, checked with real Prometheus tools."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import dataset_dir
from helpers import free_port, wait_until

pytestmark = pytest.mark.integration

ROUNDS = 2
CLIENTS = 2


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_for(predicate, timeout: float, what: str):
    """Wait for an endpoint that may not answer yet (refused, not found, not parsed)."""
    return wait_until(predicate, timeout, what, interval=0.2, ignore=(OSError, ValueError, KeyError, grpc.RpcError))


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (Debian package 'prometheus'; .ci/run installs it)"
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("obs_shards")
    result = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                             "--data-root", str(dataset_dir("mnist")), "--clients", str(CLIENTS), "--iid",
                             "--train-subset", "600", "--seed", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


class Run:
    """A short federated run (cvae phase) whose server and clients all serve /metrics."""

    def __init__(self, tmp_path: Path, shards: Path, *, linger: float, log_format: str = "text"):
        self.out = tmp_path / "run"
        self.server_metrics = free_port()
        self.client_metrics = [free_port() for _ in range(CLIENTS)]
        self.grpc_port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.server_log = tmp_path / "server.log"
        self.procs.append(self._spawn(self.server_log, "genfl_server.cli", "--phase", "cvae", "--clients",
                                      str(CLIENTS), "--rounds", str(ROUNDS), "--address",
                                      f"127.0.0.1:{self.grpc_port}", "--out", str(self.out), "--metrics-port",
                                      str(self.server_metrics), "--linger-seconds", str(linger),
                                      "--log-format", log_format))
        self.client_logs = []
        for i, port in enumerate(self.client_metrics):
            log = tmp_path / f"client-{i}.log"
            self.client_logs.append(log)
            self.procs.append(self._spawn(log, "genfl_client.cli", "--server", f"127.0.0.1:{self.grpc_port}",
                                          "--shard", str(shards / f"client-00{i}.npz"), "--metrics-port",
                                          str(port), "--linger-seconds", str(linger), "--threads", "1",
                                          "--log-format", log_format))

    @staticmethod
    def _spawn(log: Path, module: str, *args: str) -> subprocess.Popen:
        with open(log, "w") as f:
            return subprocess.Popen([sys.executable, "-m", module, *args], stdout=f, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180) -> list[int]:
        return [p.wait(timeout) for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_metrics_endpoints_pass_promtool_and_health_goes_serving(tmp_path, shards):
    promtool = require("promtool")
    run = Run(tmp_path, shards, linger=30)
    try:
        # Health: SERVING once the server listens (it has loaded what it needs before listening).
        channel = grpc.insecure_channel(f"127.0.0.1:{run.grpc_port}", options=[
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)])
        stub = health_pb2_grpc.HealthStub(channel)
        status = wait_for(lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status,
                          60, "the health service")
        assert status == health_pb2.HealthCheckResponse.SERVING
        named = stub.Check(health_pb2.HealthCheckRequest(service="genfl.v2.FederatedLearning"), timeout=1)
        assert named.status == health_pb2.HealthCheckResponse.SERVING
        # Wait for the run to finish; the server lingers with its final metrics.
        wait_for(lambda: (run.out / "summary.json").exists(), 180, "the run to finish")
        server_text = wait_for(lambda: http_get(f"http://127.0.0.1:{run.server_metrics}/metrics"), 10, "metrics")
        check = subprocess.run([promtool, "check", "metrics"], input=server_text, capture_output=True, text=True)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
        assert f'genfl_rounds_completed_total{{phase="cvae"}} {float(ROUNDS)}' in server_text
        assert 'genfl_phase{genfl_phase="done"} 1.0' in server_text
        assert "genfl_client_updates_accepted_total" in server_text and "genfl_build_info" in server_text
        channel.close()
    finally:
        run.stop()


def test_client_metrics_pass_promtool(tmp_path, shards):
    """A client's endpoint, read while it waits for a server that is not there yet."""
    promtool = require("promtool")
    port = free_port()
    client = subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", f"127.0.0.1:{free_port()}",
                               "--shard", str(shards / "client-000.npz"), "--metrics-port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        text = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/metrics"), 60, "client metrics")
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
        for name in ("genfl_client_train_seconds_total", "genfl_client_samples_trained_total",
                     "genfl_client_sent_bytes_total", "genfl_client_received_bytes_total",
                     "genfl_client_last_train_loss"):
            assert name in text
    finally:
        client.kill()
        client.wait()


def test_real_prometheus_scrapes_the_run(tmp_path, shards):
    prometheus = require("prometheus")
    prom_port = free_port()
    run_dir = tmp_path / "prom"
    run_dir.mkdir()
    run = Run(tmp_path, shards, linger=6)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "genfl-server", "static_configs": [{"targets": [f"127.0.0.1:{run.server_metrics}"]}]},
            {"job_name": "genfl-client",
             "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in run.client_metrics]}]},
        ],
    }
    (run_dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is valid YAML
    prom = subprocess.Popen([prometheus, f"--config.file={run_dir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={run_dir / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=open(run_dir / "prometheus.log", "w"), stderr=subprocess.STDOUT)

    def query(expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        codes = run.wait(240)
        assert codes == [0] * (CLIENTS + 1), (codes, run.server_log.read_text()[-3000:])
        completed = wait_for(lambda: query('max_over_time(genfl_rounds_completed_total{phase="cvae"}[10m])'),
                             30, "the rounds counter in Prometheus")
        assert [float(r["value"][1]) for r in completed] == [float(ROUNDS)]
        up = query('max_over_time(up{job="genfl-client"}[10m])')
        assert len(up) == CLIENTS and all(float(r["value"][1]) == 1.0 for r in up), up
        assert float(query('max_over_time(up{job="genfl-server"}[10m])')[0]["value"][1]) == 1.0
        accepted = query('max_over_time(genfl_client_updates_accepted_total{type="TASK_TYPE_TRAIN"}[10m])')
        assert float(accepted[0]["value"][1]) == ROUNDS * CLIENTS
    finally:
        run.stop()
        prom.terminate()
        prom.wait(10)


def test_json_logs_carry_phase_and_round(tmp_path, shards):
    run = Run(tmp_path, shards, linger=0, log_format="json")
    try:
        assert run.wait(240) == [0] * (CLIENTS + 1)
    finally:
        run.stop()
    server_lines = [json.loads(line) for line in run.server_log.read_text().splitlines() if line.startswith("{")]
    round_lines = [line for line in server_lines if "cvae round" in line["message"]]
    assert len(round_lines) == ROUNDS
    assert all(line["phase"] == "cvae" and line["round"] in (1, 2) for line in round_lines)
    client_lines = [json.loads(line) for line in run.client_logs[0].read_text().splitlines() if line.startswith("{")]
    task_lines = [line for line in client_lines if line["message"].startswith(("train task", "evaluate task"))]
    assert task_lines and all({"phase", "round", "level", "time"} <= line.keys() for line in task_lines)
