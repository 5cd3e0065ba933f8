"""Issue 14's mitigations of extreme label skew, end to end: real server and client processes over
gRPC on loopback, on real MNIST shards (--local-loss balanced, --server-finetune-steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from genfl_shared.runfiles import METRICS_JSONL, read_events
from helpers import log_tail, run_rounds, start_server

CLIENTS = 2


def _shards(tmp_path: Path, data_root, alpha: str = "0.1") -> Path:
    shards = tmp_path / "shards"
    part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist", "--data-root",
                           str(data_root("mnist")), "--clients", str(CLIENTS), "--alpha", alpha, "--train-subset",
                           "400", "--seed", "0", "--out", str(shards)], capture_output=True, text=True, timeout=120)
    assert part.returncode == 0, part.stderr
    return shards


def _run(out: Path, shards: Path, *server_args: str) -> dict:
    """A server with CLIENTS client processes, to the end; returns its summary.json."""
    log = out.parent / f"{out.name}-server.log"
    server, endpoint = start_server(out, "--clients", str(CLIENTS), "--address", "127.0.0.1:0", *server_args, log=log)
    clients = []
    try:
        clients = [subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", endpoint["address"],
                                     "--shard", str(shards / f"client-00{i}.npz"), "--threads", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for i in range(CLIENTS)]
        assert server.wait(240) == 0, log_tail(log)
        assert [c.wait(60) for c in clients] == [0] * CLIENTS
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return json.loads((out / "summary.json").read_text())


def test_a_classifier_run_with_the_balanced_local_loss_completes(tmp_path, data_root):
    summary = _run(tmp_path / "balanced", _shards(tmp_path, data_root), "--phase", "classifier", "--no-pretrain",
                   "--rounds", "2", "--local-loss", "balanced", "--seed", "0")
    assert summary["config"]["local_loss"] == "balanced"
    records = run_rounds(tmp_path / "balanced")
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["train_loss"] > 0 and r["weighted_client_accuracy"] is not None for r in records)
