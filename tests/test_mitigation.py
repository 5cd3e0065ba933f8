"""Issue 14's mitigations of extreme label skew, end to end: real server and client processes over
gRPC on loopback, on real MNIST shards (--local-loss balanced, --server-finetune-steps)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from genfl_server.finetune import class_balanced_batches, finetune_classifier
from genfl_shared.checkpoint import save_checkpoint
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.runfiles import METRICS_JSONL, read_events
from genfl_shared.training import evaluate_classifier, train_classifier, train_cvae
from helpers import log_tail, run_rounds, start_server
from test_rounds import CVAE_EVAL, CVAE_TRAIN, federation

CLIENTS = 2
CPU = torch.device("cpu")


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


# -- server-side synthetic fine-tuning (--server-finetune-steps) ----------------------------------

def _balanced(images, labels, per_class: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                            generator=generator)[:per_class]]
                        for c in range(10)])
    return to_float_images(images[chosen]), labels[chosen]


def test_class_balanced_batches_hold_every_class_equally_and_repeat_for_a_seed():
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 12)
    batches = list(class_balanced_batches(labels, 7, 20, seed=3))  # ceil(7 / 3) = 3 of each class
    for idx in batches:
        assert torch.bincount(labels[idx], minlength=3).tolist() == [3, 3, 3]
    # A class's pool is used up before any of its images is drawn again.
    assert len(set(torch.cat(batches[:10])[labels[torch.cat(batches[:10])] == 0].tolist())) == 30
    assert all(torch.equal(a, b) for a, b in zip(batches, class_balanced_batches(labels, 7, 20, seed=3)))


def test_finetuning_a_one_class_model_on_a_class_balanced_set_raises_its_balanced_accuracy(data_root):
    """benchmarks/bench_server_finetune.py measured this setting (lr 0.01, batch 50, 100 images per
    class) at +58 to +67 pp with 100 steps over 2 seeds (200 steps: +74 to +77 pp; 25 steps: +0 to
    +12 pp); 100 steps keep the test near a minute, and the margin asserted is well inside that."""
    train_x, train_y = load_dataset("mnist", data_root("mnist"), "train")
    test_x, test_y = load_dataset("mnist", data_root("mnist"), "test")
    only = train_y == 0
    skewed = model_from_state("classifier", initial_state("classifier", 0), CPU)
    train_classifier(skewed, to_float_images(train_x[only][:300]), train_y[only][:300], epochs=1, batch_size=32,
                     optimizer="sgd", lr=0.01, momentum=0.5, seed=0, device=CPU)
    skewed_state = {k: v.detach().clone() for k, v in skewed.state_dict().items()}
    eval_x, eval_y = _balanced(test_x, test_y, 100, seed=0)
    before = evaluate_classifier(skewed, eval_x, eval_y, device=CPU)["accuracy"]
    assert before < 0.15  # it predicts its one class

    tune_x, tune_y = _balanced(train_x, train_y, 100, seed=0)
    tuned, info = finetune_classifier(skewed_state, tune_x, tune_y, steps=100, lr=0.01, batch_size=50, seed=0,
                                      device=CPU)
    after = evaluate_classifier(model_from_state("classifier", tuned, CPU), eval_x, eval_y, device=CPU)["accuracy"]
    assert after - before > 0.35, (before, after)
    assert info["steps"] == 100 and info["seconds"] > 0 and math.isfinite(info["loss"])
    assert all(torch.equal(skewed_state[k], v) for k, v in skewed.state_dict().items())  # input untouched


def test_a_classifier_run_with_server_finetuning_records_it_in_every_round(tmp_path, data_root):
    """A real run: each aggregate is fine-tuned on the synthetic set of the given CVAE (one epoch on
    400 real images: rough digits. An untrained CVAE's images are all ones after the per-image max
    normalisation, on which BatchNorm's gradients blow the first convolutions up.)"""
    images, labels = load_dataset("mnist", data_root("mnist"), "train")
    cvae_model = model_from_state("cvae", initial_state("cvae", 0), CPU)
    train_cvae(cvae_model, to_float_images(images[:400]), labels[:400], epochs=1, batch_size=32, lr=1e-3, seed=0,
               device=CPU)
    cvae = save_checkpoint(tmp_path / "cvae.pt", "cvae", cvae_model.state_dict())
    out = tmp_path / "finetune"
    summary = _run(out, _shards(tmp_path, data_root), "--phase", "classifier", "--no-pretrain", "--cvae-checkpoint",
                   str(cvae), "--rounds", "2", "--server-finetune-steps", "5", "--server-finetune-batch-size", "20",
                   "--synthetic-samples", "200", "--seed", "0")
    assert summary["config"]["server_finetune_steps"] == 5
    records = run_rounds(out)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        step = record["post_aggregation"]
        assert step["kind"] == "server_finetune" and step["steps"] == 5 and step["accepted"] is True
        assert step["seconds"] > 0 and record["weighted_client_accuracy"] is not None
    assert [e["samples"] for e in read_events(out / METRICS_JSONL) if e["event"] == "synthetic"] == [200]


def test_the_engine_broadcasts_a_post_aggregation_model_only_when_it_passes_the_aggregate_checks(tmp_path):
    """The round engine's hook is generic (a CVAE phase here), over real gRPC with real clients: a
    sane result is what the next round trains from, a non-finite one is refused (counted, logged,
    recorded) and the aggregate itself is broadcast."""
    seen: dict[int, dict] = {}
    broadcast: dict[int, dict] = {}

    def nudge_then_break(rnd, aggregate):
        seen[rnd] = aggregate
        if rnd == 1:
            return {k: v + 1e-3 if v.is_floating_point() else v for k, v in aggregate.items()}, {"kind": "nudge"}
        return {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in aggregate.items()}, \
            {"kind": "break"}

    with federation(tmp_path, ("alice",)) as (engine, metrics, _runners):
        engine.run_rounds("cvae", initial_state("cvae", 0), rounds=2, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                          post_aggregation=nudge_then_break,
                          on_round_end=lambda rnd, state: broadcast.setdefault(rnd, state))
    first = next(k for k, v in seen[1].items() if v.is_floating_point())
    assert torch.allclose(broadcast[1][first], seen[1][first] + 1e-3)
    assert all(torch.equal(broadcast[2][k], seen[2][k]) for k in seen[2])  # refused: the aggregate itself
    records = run_rounds(tmp_path)
    assert records[0]["post_aggregation"] == {"kind": "nudge", "accepted": True,
                                              "seconds": records[0]["post_aggregation"]["seconds"]}
    assert records[1]["post_aggregation"]["accepted"] is False
    assert "NaN" in records[1]["post_aggregation"]["refused"]
    assert metrics.registry.get_sample_value("genfl_post_aggregation_refused_total", {"phase": "cvae"}) == 1


def test_server_finetuning_without_a_cvae_to_sample_from_is_a_usage_error(tmp_path):
    pretrained = save_checkpoint(tmp_path / "pretrained.pt", "classifier", initial_state("classifier", 0))
    cvae = save_checkpoint(tmp_path / "cvae.pt", "cvae", initial_state("cvae", 0))
    base = [sys.executable, "-m", "genfl_server.cli", "--phase", "classifier", "--clients", "1", "--address",
            "127.0.0.1:0", "--register-timeout", "1"]
    no_cvae = subprocess.run([*base, "--out", str(tmp_path / "a"), "--pretrained-checkpoint", str(pretrained),
                              "--server-finetune-steps", "10"], capture_output=True, text=True, timeout=120)
    assert no_cvae.returncode == 2 and "--server-finetune-steps with --phase classifier needs --cvae-checkpoint" \
        in no_cvae.stderr, no_cvae.stderr
    # Without fine-tuning, a CVAE next to a pre-trained start has no use: refused as before.
    both = subprocess.run([*base, "--out", str(tmp_path / "b"), "--pretrained-checkpoint", str(pretrained),
                           "--cvae-checkpoint", str(cvae)], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "without --cvae-checkpoint" in both.stderr, both.stderr
