"""--cvae-aggregation over real processes: a server and client processes over gRPC on loopback, on
real MNIST shards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from genfl_experiments.launch import _client_args_for
from genfl_shared.checkpoint import load_checkpoint
from genfl_shared.ensemble import ENSEMBLE_KIND, CVAEEnsemble
from genfl_shared.partition import load_shard
from helpers import log_tail, run_rounds, start_server, wait_until
from test_mitigation import CLIENTS, _run, _shards

pytestmark = pytest.mark.integration


def test_an_ensemble_cvae_phase_saves_every_clients_cvae_and_a_classifier_run_samples_from_it(tmp_path, data_root):
    shards = _shards(tmp_path, data_root, alpha="0.01")
    out = tmp_path / "cvae"
    summary = _run(out, shards, "--phase", "cvae", "--rounds", "2", "--cvae-aggregation", "ensemble", "--seed", "0",
                   "--test-data", str(data_root("mnist")), "--dataset", "mnist",
                   client_args=("--share-label-counts",))
    assert summary["config"]["cvae_aggregation"] == "ensemble"
    records = run_rounds(out)
    assert [r["round"] for r in records] == [1, 2] and all(r["test_loss"] > 0 for r in records)
    assert all(r["post_aggregation"]["kind"] == "ensemble" for r in records)
    ensemble = CVAEEnsemble.from_state(load_checkpoint(out / "cvae.pt", ENSEMBLE_KIND))
    assert len(ensemble.members) == CLIENTS
    for index in range(CLIENTS):  # each client draws the classes it holds (enough of), by its share
        labels = load_shard(shards / f"client-00{index}.npz").train_labels
        held = {c for c in range(10) if (labels == c).sum() >= 5}
        assert held and all(ensemble.class_weights[index, c] > 0 for c in held)

    classifier = tmp_path / "classifier"
    summary = _run(classifier, shards, "--phase", "classifier", "--cvae-checkpoint", str(out / "cvae.pt"),
                   "--rounds", "1", "--synthetic-samples", "200", "--cas-epochs", "1", "--pretrain-epochs", "1",
                   "--seed", "0", "--test-data", str(data_root("mnist")), "--dataset", "mnist")
    assert 0.0 <= summary["cas"] <= 1.0 and (classifier / "pretrained_classifier.pt").exists()


def test_a_run_whose_clients_share_no_label_counts_fails_with_what_to_do(tmp_path, data_root):
    shards = _shards(tmp_path, data_root)
    out = tmp_path / "silent"
    log = tmp_path / "silent-server.log"
    server, endpoint = start_server(out, "--clients", str(CLIENTS), "--address", "127.0.0.1:0", "--phase", "cvae",
                                    "--rounds", "1", "--cvae-aggregation", "classwise", log=log)
    clients = [subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", endpoint["address"],
                                 "--shard", str(shards / f"client-00{i}.npz"), "--threads", "1"],
                                stdout=(tmp_path / f"client-{i}.log").open("w"), stderr=subprocess.STDOUT)
               for i in range(CLIENTS)]
    try:
        assert server.wait(120) != 0
        # The run ends as the clients register: one may miss the news (the end-of-run issue), so the
        # test waits for the first to hear why, not for both to exit.
        heard = wait_until(lambda: [i for i in range(CLIENTS) if "--share-label-counts" in log_tail(
            tmp_path / f"client-{i}.log")], 60, "a client hears why the run failed")
        assert clients[heard[0]].wait(60) != 0
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "no client shares its label counts (run the clients with --share-label-counts)" in log_tail(log)


def test_genfl_launch_has_its_clients_share_label_counts_for_every_aggregation_but_fedavg():
    assert _client_args_for(["--phase", "all", "--cvae-aggregation", "ensemble"]) == ["--share-label-counts"]
    assert _client_args_for(["--phase", "all", "--cvae-aggregation", "fedavg"]) == []


def test_genfl_launch_compares_a_generator_beside_fedavgs_on_the_same_shards(tmp_path, data_root):
    out = tmp_path / "launch"
    launch = subprocess.run([sys.executable, "-m", "genfl_experiments.launch", "--dataset", "mnist", "--data-root",
                             str(data_root("mnist")), "--alpha", "0.01", "--clients", "2", "--train-subset", "400",
                             "--rounds", "1", "--synthetic-samples", "200", "--cas-epochs", "1", "--pretrain-epochs",
                             "1", "--compare", "--compare-generator", "ensemble", "--client-threads", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "pre-trained, ensemble client acc" in launch.stdout and "CAS with --cvae-aggregation ensemble" in launch.stdout
    assert "class_weights" in load_checkpoint(out / "cvae-ensemble" / "cvae.pt", ENSEMBLE_KIND)
    assert "class_weights" not in load_checkpoint(out / "cvae" / "cvae.pt", "cvae")
    assert (out / "pretrained-ensemble" / "summary.json").exists() and (out / "baseline" / "summary.json").exists()
