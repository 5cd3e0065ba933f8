"""Crash resume: SIGKILL the server mid-run, restart it with only --resume --address --out; the
clients reconnect by themselves and the run ends with bit-identical weights to an uninterrupted run
(also with FedAvgM, whose server momentum must survive the crash), with its test set and thread
count reused from the saved run state; a resume that would change a setting is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import dataset_dir
from helpers import free_port, run_rounds, wait_until

pytestmark = pytest.mark.system

CLIENTS = 2
SERVER_ARGS = ["--phase", "all", "--clients", str(CLIENTS), "--cvae-rounds", "2", "--classifier-rounds", "3",
               "--synthetic-samples", "500", "--cas-epochs", "1", "--pretrain-epochs", "1", "--seed", "3",
               "--deterministic", "--threads", "1", "--dataset", "mnist"]


def _rounds(out):
    return [(e["phase"], e["round"]) for e in run_rounds(out)]


def _numbers(record):
    """A round's record without its wall times (also those of the server's post-aggregation steps)."""
    def without_seconds(value):
        if not isinstance(value, dict):
            return value
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    numbers = {k: v for k, v in record.items() if k != "seconds"}
    if "post_aggregation" in numbers:
        numbers["post_aggregation"] = without_seconds(numbers["post_aggregation"])
    return numbers


def _spawn(log, *args):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "a"), stderr=subprocess.STDOUT)


def _run(tmp_path, name, shards, *, strategy="fedavg", kill_after=None, extra=()):
    out, port = tmp_path / name, free_port()
    address = f"127.0.0.1:{port}"
    server_cmd = ["genfl_server.cli", *SERVER_ARGS, "--test-data", str(dataset_dir("mnist")), "--strategy", strategy,
                  *extra, "--address", address, "--out", str(out)]
    server = _spawn(tmp_path / f"{name}-server.log", *server_cmd)
    clients = [_spawn(tmp_path / f"{name}-client-{i}.log", "genfl_client.cli", "--server", address, "--shard",
                      str(shards / f"client-00{i}.npz"), "--threads", "1",
                      *(["--share-label-counts"] if "--cvae-aggregation" in extra else [])) for i in range(CLIENTS)]
    procs = [server, *clients]
    try:
        if kill_after is not None:
            wait_until(lambda: kill_after in _rounds(out) or server.poll() is not None, 240,
                       f"{kill_after} to be recorded")
            assert server.poll() is None, "the server exited before the run got far enough"
            server.send_signal(signal.SIGKILL)
            server.wait()
            time.sleep(1.0)  # the clients notice and start retrying
            assert all(c.poll() is None for c in clients), "clients must survive a server crash"
            refused = subprocess.run([sys.executable, "-m", "genfl_server.cli", "--resume", "--address", address,
                                      "--out", str(out), "--threads", "2"], capture_output=True, text=True,
                                     timeout=120)
            assert refused.returncode == 2 and "--threads 2 differs from the run being resumed (1)" in refused.stderr
            # Only where to listen and where the run is: every other setting comes from its saved state.
            server = _spawn(tmp_path / f"{name}-server.log", "genfl_server.cli", "--resume", "--address", address,
                            "--out", str(out))
            procs.append(server)
        assert server.wait(300) == 0, (tmp_path / f"{name}-server.log").read_text()[-3000:]
        assert [c.wait(60) for c in clients] == [0] * CLIENTS
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


# A round is recorded once the next round's training (which brings its evaluation) returns, so
# the kill lands after the aggregate of the round after it, with the record of that one pending in
# the run state (or just before that round's checkpoint). Killed once CVAE round 1 is recorded, the
# resumed server still has to finish the CVAE phase, sample, score CAS on the test set and
# pre-train (with the saved thread count); killed once classifier round 1 is recorded, FedAvgM's
# velocity is non-zero and round 3 (at least) runs on the resumed server and needs it. That run also
# distils each aggregate towards the round's client models and then fine-tunes it on the server (a
# few seconds more, not a third pair of runs): the resumed server samples the synthetic set again
# (the same, from the saved CVAE and the run's seed) and distils and fine-tunes the aggregates of
# the rounds it runs exactly as the first server would have.
@pytest.mark.parametrize("strategy, kill_after, extra", [
    ("fedavg", ("cvae", 1), ()),
    ("fedavgm", ("classifier", 1), ("--server-finetune-steps", "5", "--server-finetune-batch-size", "20",
                                    "--server-distill", "--server-distill-steps", "4",
                                    "--server-distill-batch-size", "20")),
    # Each client's own CVAE carried through the restart (the strategy's state), then sampled as one ensemble.
    ("fedavg", ("cvae", 1), ("--cvae-aggregation", "ensemble")),
], ids=["fedavg", "fedavgm-server-distill-finetune", "ensemble"])
def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path, strategy, kill_after, extra):
    shards = tmp_path / "shards"
    part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                           "--data-root", str(dataset_dir("mnist")), "--clients", str(CLIENTS), "--alpha", "0.5",
                           "--train-subset", "600", "--seed", "0", "--out", str(shards)],
                          capture_output=True, text=True, timeout=120)
    assert part.returncode == 0, part.stderr
    reference = _run(tmp_path, "reference", shards, strategy=strategy, extra=extra)
    resumed = _run(tmp_path, "resumed", shards, strategy=strategy, kill_after=kill_after, extra=extra)

    for name in ("cvae.pt", "pretrained_classifier.pt", "classifier.pt"):
        a = torch.load(reference / name, weights_only=True)["state_dict"]
        b = torch.load(resumed / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    expected = [("cvae", 1), ("cvae", 2), ("classifier", 1), ("classifier", 2), ("classifier", 3)]
    assert _rounds(resumed) == expected
    summary = json.loads((resumed / "summary.json").read_text())
    assert [(r["phase"], r["round"]) for r in summary["rounds"]] == expected
    ref_summary = json.loads((reference / "summary.json").read_text())
    # Every round's numbers, its client evaluation included, as if nothing had happened.
    assert [_numbers(r) for r in run_rounds(resumed)] == [_numbers(r) for r in run_rounds(reference)]
    assert summary["final"] == ref_summary["final"] and summary["cas"] == ref_summary["cas"]
    assert summary["cas"] is not None and summary["final"]["test_accuracy"] is not None  # the test set was reused
    assert "resuming run" in (tmp_path / "resumed-server.log").read_text()
    if "--cvae-aggregation" in extra:
        assert "class_weights" in torch.load(resumed / "cvae.pt", weights_only=True)["state_dict"]
        assert all(r["post_aggregation"]["kind"] == "ensemble" for r in summary["rounds"] if r["phase"] == "cvae")
    if "--server-distill" in extra:
        # Both steps were tried in every round (accepted or not: this 2-round CVAE's near-constant images
        # drive the classifier's outputs on them to NaN from round 2 on, and the engine then
        # broadcasts the aggregate; the same in both runs, which is what this test checks).
        steps = [r["post_aggregation"] for r in summary["rounds"] if r["phase"] == "classifier"]
        assert all(s["kind"] == "server_distill+server_finetune" for s in steps) and steps[0]["accepted"]
        # From round 2 on the clients' models give NaN on those images too: distillation then has no
        # teacher left and skips (the aggregate stands); fine-tuning still runs.
        assert steps[0]["server_distill"]["steps"] == 4
        assert all((s["server_distill"].get("steps") == 4 or "non-finite logits" in s["server_distill"]["skipped"])
                   and s["server_finetune"]["steps"] == 5 for s in steps)
        assert summary["config"]["server_finetune_steps"] == 5 and summary["config"]["server_distill"] is True
