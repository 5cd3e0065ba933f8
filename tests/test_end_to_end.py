"""End to end: real server and client processes talking gRPC over loopback on real MNIST shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import dataset_dir
from genfl_shared.runfiles import METRICS_JSONL, read_events
from helpers import free_port, start_server, wait_until

SUMMARY_FIELDS = {"dataset", "alpha", "clients", "seed", "pretrain", "cas", "cas_federated", "rounds", "final"}
ROUND_FIELDS = {"phase", "round", "weighted_client_accuracy", "test_accuracy", "train_loss", "seconds"}
# Small but complete: 3 clients on 3,000 MNIST images, both phases, every server-side step.
SMALL_RUN = ["--clients", "3", "--alpha", "1.0", "--train-subset", "3000", "--cvae-rounds", "3",
             "--classifier-rounds", "3", "--synthetic-samples", "2000", "--cas-epochs", "1",
             "--pretrain-epochs", "2", "--seed", "7"]


def run_cli(module: str, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One launch of both phases (server + 3 client processes); shared by the assertions below."""
    out = tmp_path_factory.mktemp("full_run")
    result = run_cli("genfl_experiments.launch", "--data-root", str(dataset_dir("mnist")), "--out", str(out),
                     *SMALL_RUN)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


@pytest.mark.system
def test_summary_has_every_field(full_run):
    out, _ = full_run
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["dataset"] == "mnist" and summary["alpha"] == 1.0 and summary["clients"] == 3
    assert summary["seed"] == 7 and summary["pretrain"] is True
    assert [(r["phase"], r["round"]) for r in summary["rounds"]] == [
        ("cvae", 1), ("cvae", 2), ("cvae", 3), ("classifier", 1), ("classifier", 2), ("classifier", 3)]
    for record in summary["rounds"]:
        assert ROUND_FIELDS <= record.keys()
        assert record["seconds"] > 0 and record["train_loss"] > 0
    assert 0 <= summary["cas"] <= 1 and 0 <= summary["cas_federated"] <= 1
    assert {"weighted_client_accuracy", "test_accuracy"} <= summary["final"].keys()
    # metrics.jsonl has one line per round, plus the server-side steps
    events = read_events(out / METRICS_JSONL)
    assert sum(e["event"] == "round" for e in events) == 6
    assert {"synthetic", "cas", "pretrain"} <= {e["event"] for e in events}


@pytest.mark.system
def test_accuracy_beats_chance_clearly(full_run):
    out, _ = full_run
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final["weighted_client_accuracy"] > 0.3, final  # chance is 0.1
    assert final["test_accuracy"] > 0.3, final


@pytest.mark.system
def test_outputs_are_weights_only_checkpoints_and_a_sample_grid(full_run):
    out, result = full_run
    for name, model in (("cvae.pt", "cvae"), ("classifier.pt", "classifier"),
                        ("pretrained_classifier.pt", "classifier"), ("cas_classifier.pt", "classifier")):
        data = torch.load(out / name, weights_only=True)
        assert data["model"] == model and data["state_dict"]
    png = (out / "synthetic_samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for i in range(3):
        assert "server ended run" in (out / "logs" / f"client-00{i}.log").read_text()
    assert "test acc" in result.stdout  # the results table


@pytest.mark.integration
def test_client_exits_nonzero_with_clear_message_for_a_wrong_shard_path(tmp_path):
    missing = tmp_path / "no-such-shard.npz"
    result = run_cli("genfl_client.cli", "--server", "127.0.0.1:1", "--shard", str(missing), timeout=60)
    assert result.returncode != 0
    assert "no-such-shard.npz" in result.stderr and "cannot use shard" in result.stderr


@pytest.mark.integration
def test_client_exits_nonzero_for_a_corrupt_shard(tmp_path):
    bad = tmp_path / "client-000.npz"
    bad.write_bytes(b"not a shard at all")
    result = run_cli("genfl_client.cli", "--server", "127.0.0.1:1", "--shard", str(bad), timeout=60)
    assert result.returncode != 0 and "client-000.npz" in result.stderr


@pytest.mark.integration
def test_client_waits_for_a_late_server_then_fails_cleanly_on_the_wrong_dataset(tmp_path, data_root):
    """The client keeps retrying while the server is down; once up, the server refuses its dataset
    and the client exits non-zero with the server's reason."""
    shards = tmp_path / "shards"
    part = run_cli("genfl_shared.partition_cli", "--dataset", "mnist", "--data-root", str(data_root("mnist")),
                   "--clients", "1", "--iid", "--train-subset", "200", "--seed", "0", "--out", str(shards))
    assert part.returncode == 0, part.stderr
    port = free_port()
    client = subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", f"127.0.0.1:{port}",
                               "--shard", str(shards / "client-000.npz")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        time.sleep(4)  # the client is up and retrying against a closed port
        assert client.poll() is None
        server = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", "--address", f"127.0.0.1:{port}",
                                   "--clients", "1", "--dataset", "fmnist", "--out", str(tmp_path / "run"),
                                   "--register-timeout", "60"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output, _ = client.communicate(timeout=90)
        assert client.returncode != 0
        assert "FAILED_PRECONDITION" in output and "'fmnist'" in output
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, D, Z, ...), None when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


@pytest.mark.system
def test_ctrl_c_stops_every_child(tmp_path, data_root):
    launch = subprocess.Popen([sys.executable, "-m", "genfl_experiments.launch", "--data-root", str(data_root("mnist")),
                               "--out", str(tmp_path), "--clients", "2", "--iid", "--train-subset", "600",
                               "--rounds", "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        children: set[int] = set()
        while time.monotonic() < deadline and len(children) < 3:  # server + 2 clients
            children |= _children(launch.pid)
            time.sleep(0.2)
        assert len(children) == 3, "launcher did not start a server and 2 clients"
        # Wait until rounds are running.
        wait_until(lambda: read_events(tmp_path / METRICS_JSONL) or launch.poll() is not None,
                   deadline - time.monotonic(), "the first round", interval=0.2)
        assert launch.poll() is None
        launch.send_signal(signal.SIGINT)
        try:
            output, _ = launch.communicate(timeout=30)
        except subprocess.TimeoutExpired as error:
            alive = {pid: _state(pid) for pid in children if _alive(pid)}
            raise AssertionError(f"the launcher did not exit within 30 s of Ctrl-C; children still there "
                                 f"(pid: state): {alive}; its output so far:\n{error.output}") from None
        assert launch.returncode == 130, output
        assert "stopping the server and the clients" in output
        # Its children end on SIGTERM (the server does not wait to tell clients that are already gone).
        assert re.search(r"stopped 3 processes in \d+\.\d s$", output, re.MULTILINE), output
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if launch.poll() is None:
            launch.kill()


@pytest.mark.integration
def test_fedprox_and_fedavgm_runs_complete(tmp_path, data_root):
    """Each strategy end to end: real server and 2 client processes, the setting recorded."""
    shards = tmp_path / "shards"
    part = run_cli("genfl_shared.partition_cli", "--dataset", "mnist", "--data-root", str(data_root("mnist")),
                   "--clients", "2", "--alpha", "0.5", "--train-subset", "400", "--seed", "0", "--out", str(shards))
    assert part.returncode == 0, part.stderr
    for strategy, extra in (("fedprox", ["--prox-mu", "0.1"]), ("fedavgm", ["--fedavgm-momentum", "0.5"])):
        out = tmp_path / strategy
        server, endpoint = start_server(out, "--phase", "cvae", "--rounds", "2", "--clients", "2", "--address",
                                        "127.0.0.1:0", "--strategy", strategy, *extra)
        clients = []
        try:
            address = endpoint["address"]
            clients = [subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", address, "--shard",
                                         str(shards / f"client-00{i}.npz"), "--threads", "1"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for i in range(2)]
            assert server.wait(180) == 0 and [c.wait(60) for c in clients] == [0, 0]
        finally:
            for proc in (server, *clients):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["strategy"] == strategy
        assert [r["round"] for r in summary["rounds"]] == [1, 2]
        assert all(r["train_loss"] > 0 for r in summary["rounds"])
