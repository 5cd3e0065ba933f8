"""With --partition-info the server admits only the partition's clients, with its counts.

A client's FedAvg weight is its registered training-sample count, so a hostile one would claim as
many as it may. partition.json records every client's counts: a real genfl-server given it refuses
a registration whose id is not in the partition or whose counts differ, while the honest clients
(real genfl-client processes on their shards) run the federation to its end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import grpc
import pytest

from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc

from helpers import free_port, run_rounds, start_server

pytestmark = pytest.mark.integration


def registration(client_id: str, train: int, heldout: int, label_counts=()) -> pb.RegisterRequest:
    return pb.RegisterRequest(client_id=client_id, num_train_samples=train, num_heldout_samples=heldout,
                              dataset="mnist", label_counts=label_counts)


def rejected_count(metrics_port: int, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("genfl_client_updates_rejected_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_registrations_must_match_the_partition(tmp_path, data_root):
    shards = tmp_path / "shards"
    part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist", "--data-root",
                           str(data_root("mnist")), "--clients", "2", "--alpha", "0.5", "--train-subset", "400",
                           "--seed", "0", "--out", str(shards)], capture_output=True, text=True, timeout=120)
    assert part.returncode == 0, part.stderr
    partition = json.loads((shards / "partition.json").read_text())
    first = partition["clients"][0]
    out = tmp_path / "run"
    metrics_port = free_port()
    server, endpoint = start_server(out, "--phase", "cvae", "--rounds", "1", "--clients", "2", "--address",
                                    "127.0.0.1:0", "--partition-info", str(shards / "partition.json"),
                                    "--metrics-port", str(metrics_port), log=tmp_path / "server.log")
    clients = []
    try:
        with grpc.insecure_channel(endpoint["address"]) as channel:
            stub = pb_grpc.FederatedLearningStub(channel)
            refusals = {
                "more samples than its shard": (registration(first["client_id"], first["num_train"] * 100,
                                                             first["num_heldout"]),
                                                grpc.StatusCode.FAILED_PRECONDITION, "partition_mismatch"),
                "other held-out count": (registration(first["client_id"], first["num_train"], first["num_heldout"] + 1),
                                         grpc.StatusCode.FAILED_PRECONDITION, "partition_mismatch"),
                "an id not in the partition": (registration("client-999", first["num_train"], first["num_heldout"]),
                                               grpc.StatusCode.PERMISSION_DENIED, "not_in_partition"),
                # The right total, but all of it claimed for one class (it would draw that class).
                "label counts other than its shard's": (
                    registration(first["client_id"], first["num_train"], first["num_heldout"],
                                 [first["num_train"]] + [0] * 9),
                    grpc.StatusCode.INVALID_ARGUMENT, "bad_label_counts"),
            }
            for what, (request, code, reason) in refusals.items():
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Register(request, timeout=20)
                assert refused.value.code() == code, what
                assert "partition" in refused.value.details(), (what, refused.value.details())
            assert rejected_count(metrics_port, "partition_mismatch") == 2
            assert rejected_count(metrics_port, "not_in_partition") == 1
            assert rejected_count(metrics_port, "bad_label_counts") == 1
        # The honest clients' counts are the partition's (label counts too): they register and the run completes.
        clients = [subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", endpoint["address"],
                                     "--shard", str(shards / entry["file"]), "--threads", "1",
                                     "--share-label-counts"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                   for entry in partition["clients"]]
        assert server.wait(180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert [c.wait(60) for c in clients] == [0, 0]
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rounds = run_rounds(out)
    assert [r["round"] for r in rounds] == [1]
    assert sorted(rounds[0]["per_client"]) == sorted(c["client_id"] for c in partition["clients"])


def test_a_partition_info_without_clients_is_refused_at_start(tmp_path):
    info = tmp_path / "partition.json"
    info.write_text(json.dumps({"dataset": "mnist", "alpha": 0.5}))
    result = subprocess.run([sys.executable, "-m", "genfl_server.cli", "--out", str(tmp_path / "run"), "--clients", "2",
                             "--address", "127.0.0.1:0", "--partition-info", str(info)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"Error: --partition-info {info} lists no clients" in result.stderr
    assert "Traceback" not in result.stderr
