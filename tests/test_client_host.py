"""The client host (``genfl-client`` with several ``--shard``): real server and client processes
over loopback on real MNIST shards.

Under --deterministic a run whose clients share one host process must compute exactly what the
same run computes with one process per client: every tensor of every checkpoint torch.equal, and
the same round records (wall times aside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import dataset_dir
from deterministic_numbers import numbers
from genfl_shared.checkpoint import load_checkpoint
from genfl_shared.runfiles import METRICS_JSONL, read_events
from helpers import free_port, kill_all, log_tail

CLIENTS = 3
# Both phases, every model the clients train (CVAE, then the classifier after a short pre-training).
SERVER_ARGS = ["--phase", "all", "--clients", str(CLIENTS), "--cvae-rounds", "2", "--classifier-rounds", "1",
               "--local-epochs", "1", "--synthetic-samples", "200", "--cas-epochs", "0", "--pretrain-epochs", "1",
               "--seed", "3", "--deterministic", "--threads", "1", "--dataset", "mnist"]
# No --test-data: the server's test-set evaluation is the same code either way and costs most of
# a round on this machine; what the clients compute is all in the checkpoints and round records.
CHECKPOINTS = {"cvae.pt": "cvae", "pretrained_classifier.pt": "classifier", "classifier.pt": "classifier"}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("host_shards")
    part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                           "--data-root", str(dataset_dir("mnist")), "--clients", str(CLIENTS), "--alpha", "0.5",
                           "--train-subset", "450", "--seed", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert part.returncode == 0, part.stderr
    return out


def _run(work: Path, shards: Path, groups: list[list[int]]) -> Path:
    """Server + one genfl-client process per group of shard indices, to completion; returns the run folder."""
    work.mkdir()
    out, address = work / "run", f"127.0.0.1:{free_port()}"
    with open(work / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", *SERVER_ARGS,
                                   "--address", address, "--out", str(out)],
                                  stdout=server_log, stderr=subprocess.STDOUT, env=_env())
    clients = []
    for n, group in enumerate(groups):
        shard_args = [a for i in group for a in ("--shard", str(shards / f"client-{i:03d}.npz"))]
        with open(work / f"client-{n}.log", "w") as client_log:
            clients.append(subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", address,
                                             *shard_args, "--threads", "1"],
                                            stdout=client_log, stderr=subprocess.STDOUT, env=_env()))
    try:
        assert server.wait(300) == 0, log_tail(work / "server.log")
        for n, client in enumerate(clients):
            assert client.wait(60) == 0, log_tail(work / f"client-{n}.log")
    finally:
        kill_all([server, *clients])
    return out


@pytest.mark.system
def test_a_host_process_computes_exactly_what_separate_processes_do(tmp_path, shards):
    separate = _run(tmp_path / "separate", shards, [[i] for i in range(CLIENTS)])
    hosted = _run(tmp_path / "hosted", shards, [list(range(CLIENTS))])

    for name, model in CHECKPOINTS.items():
        a, b = load_checkpoint(separate / name, model), load_checkpoint(hosted / name, model)
        assert a.keys() == b.keys(), name
        unequal = [key for key in a if not torch.equal(a[key], b[key])]
        assert not unequal, f"{name}: tensors differ: {unequal}"
    events = numbers(read_events(separate / METRICS_JSONL))
    assert [e for e in events if e.get("event") == "round"], "the run recorded no rounds"
    assert numbers(read_events(hosted / METRICS_JSONL)) == events
    # One process really served all three clients, each registered on its own.
    log_text = (tmp_path / "hosted" / "client-0.log").read_text()
    for i in range(CLIENTS):
        assert f"client client-{i:03d} registered with" in log_text


@pytest.mark.system
def test_launch_with_clients_per_process_starts_fewer_client_processes(tmp_path):
    out = tmp_path / "launch"
    result = subprocess.run([sys.executable, "-m", "genfl_experiments.launch", "--data-root", str(dataset_dir("mnist")),
                             "--out", str(out), "--iid", "--clients", "3", "--clients-per-process", "2",
                             "--train-subset", "300", "--cvae-rounds", "1", "--classifier-rounds", "1",
                             "--local-epochs", "1", "--synthetic-samples", "100", "--cas-epochs", "0",
                             "--pretrain-epochs", "1", "--seed", "1"],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    # Two client processes for three clients: a host of two, then one alone (one log per process).
    logs = sorted(p.name for p in (out / "logs").glob("client-*.log"))
    assert logs == ["client-000_to_client-001.log", "client-002.log"], logs
    host_log = (out / "logs" / "client-000_to_client-001.log").read_text()
    assert "client client-000 registered with" in host_log and "client client-001 registered with" in host_log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clients"] == 3 and [r["phase"] for r in summary["rounds"]] == ["cvae", "classifier"]


@pytest.mark.integration
def test_a_refused_client_of_a_host_is_named_and_fails_the_process_after_the_others(tmp_path, shards):
    # The server wants one client; the host brings two: whichever registers second is refused
    # (run full, a fatal refusal) while the other one completes the run. (Should the second one
    # only reach the server after the run, it finds no server and gives up after
    # --max-reconnect-seconds: as fatal, and named just the same.)
    out, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    with open(tmp_path / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", "--phase", "cvae", "--clients", "1",
                                   "--cvae-rounds", "2", "--local-epochs", "1", "--threads", "1", "--dataset",
                                   "mnist", "--address", address, "--out", str(out)],
                                  stdout=server_log, stderr=subprocess.STDOUT, env=_env())
    try:
        host = subprocess.run([sys.executable, "-m", "genfl_client.cli", "--server", address, "--threads", "1",
                               "--max-reconnect-seconds", "5",
                               "--shard", str(shards / "client-000.npz"), "--shard", str(shards / "client-001.npz")],
                              capture_output=True, text=True, timeout=120, env=_env())
        assert server.wait(60) == 0, log_tail(tmp_path / "server.log")
    finally:
        kill_all([server])
    assert host.returncode == 3, host.stderr
    refused = [cid for cid in ("client-000", "client-001")
               if f"client {cid}: server {address} refused this client: RESOURCE_EXHAUSTED" in host.stderr
               or f"client {cid}: server {address} unreachable for" in host.stderr]
    assert len(refused) == 1, host.stderr
    assert "server ended run" in host.stderr and "completed" in host.stderr
    assert f"1 of 2 hosted clients did not complete: {refused[0]} (exit 3)" in host.stderr


@pytest.mark.integration
def test_a_host_sends_each_clients_own_token_from_token_dir(tmp_path, shards):
    from genfl_shared.security import make_tokens
    secrets = tmp_path / "secrets"
    make_tokens(secrets, ["client-000", "client-001"])  # tokens.json for the server, <id>.token each
    out, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    with open(tmp_path / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", "--phase", "cvae", "--clients", "2",
                                   "--cvae-rounds", "1", "--local-epochs", "1", "--threads", "1", "--dataset",
                                   "mnist", "--tokens-file", str(secrets / "tokens.json"), "--address", address,
                                   "--out", str(out)], stdout=server_log, stderr=subprocess.STDOUT, env=_env())
    host_args = [sys.executable, "-m", "genfl_client.cli", "--server", address, "--threads", "1",
                 "--shard", str(shards / "client-000.npz"), "--shard", str(shards / "client-001.npz")]
    try:
        # One client's token for two clients is a usage error, before anything is sent.
        mixed = subprocess.run([*host_args, "--token-file", str(secrets / "client-000.token")],
                               capture_output=True, text=True, timeout=60, env=_env())
        assert mixed.returncode == 2 and "with several --shard give --token-dir" in mixed.stderr, mixed.stderr
        host = subprocess.run([*host_args, "--token-dir", str(secrets)], capture_output=True, text=True,
                              timeout=120, env=_env())
        assert server.wait(60) == 0, log_tail(tmp_path / "server.log")
    finally:
        kill_all([server])
    assert host.returncode == 0, host.stderr
    assert json.loads((out / "summary.json").read_text())["clients"] == 2
