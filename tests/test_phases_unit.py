"""The method end to end at a tiny size, with in-process clients (tests/inprocess.py): the federated
CVAE, the server's synthetic pre-training from it, and the federated classifier from that."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genfl_server.phases import PhaseContext, run_method
from genfl_server.runstate import RunState
from genfl_shared.checkpoint import load_checkpoint
from genfl_shared.config import RunConfig
from genfl_shared.data import to_float_images
from genfl_shared.models import initial_state
from helpers import run_rounds
from inprocess import federation, tiny_shard

pytestmark = pytest.mark.unit

TINY = RunConfig().override(cvae_rounds=1, classifier_rounds=1, local_epochs=1, batch_size=16, synthetic_samples=20,
                 cas_epochs=1, pretrain_epochs=1, seed=5)


def tiny_test_set(binarize: bool, size: int = 20):
    rng = np.random.default_rng(99)
    images = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
    return to_float_images(images, binarize=binarize), torch.as_tensor(rng.integers(0, 10, size), dtype=torch.int64)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_method_runs_cvae_then_synthetic_pretraining_then_the_classifier_from_it(tmp_path):
    shards = [tiny_shard(cid, seed) for seed, cid in enumerate(("alice", "bob"))]
    with federation(tmp_path, shards, seed=TINY.reproducibility.seed) as fed:
        ctx = PhaseContext(fed.engine, fed.recorder, fed.metrics, TINY, tmp_path, torch.device("cpu"),
                           tiny_test_set(TINY.data.binarize), RunState.in_dir(tmp_path))
        final = run_method(ctx, "all")
        alice = fed.clients["alice"]

    cvae, cas, pretrained = (load_checkpoint(tmp_path / f"{name}.pt", model) for name, model in (
        ("cvae", "cvae"), ("cas_classifier", "classifier"), ("pretrained_classifier", "classifier")))
    assert same(load_checkpoint(tmp_path / "classifier.pt", "classifier"), final)
    # The CVAE phase trained from the run's seeded start; its model was evaluated as the last round's.
    (cvae_train,) = alice.tasks("cvae", train=True)
    (cvae_eval,) = alice.tasks("cvae", train=False)
    assert same(cvae_train.weights, initial_state("cvae", TINY.reproducibility.seed)) and same(cvae_eval.weights, cvae)
    # The server sampled the class-balanced synthetic set from that CVAE and trained on it alone;
    # the clients evaluated the CAS classifier (federated CAS, "round 0").
    images, labels = ctx.synthetic
    assert len(labels) == TINY.pretraining.synthetic_samples and torch.equal(
        torch.bincount(torch.as_tensor(labels), minlength=10), torch.full((10,), 2))
    cas_eval, classifier_eval = alice.tasks("classifier", train=False)
    assert cas_eval.round == 0 and same(cas_eval.weights, cas)
    assert not same(pretrained, initial_state("classifier", TINY.reproducibility.seed))
    # The classifier phase started from the pre-trained model and ended with the returned one.
    (classifier_train,) = alice.tasks("classifier", train=True)
    assert same(classifier_train.weights, pretrained) and same(classifier_eval.weights, final)

    records = run_rounds(tmp_path)
    assert [(r["phase"], r["round"], r["clients"]) for r in records] == [("cvae", 1, 2), ("classifier", 1, 2)]
    assert 0.0 <= records[1]["test_accuracy"] <= 1.0 and records[0]["test_loss"] > 0
    cas_results = [sent for c in fed.clients.values() for sent in c.sent
                   if (sent.task.phase, sent.task.round) == ("classifier", 0)]
    assert len(cas_results) == 2 and fed.recorder.summary["cas_federated"] == pytest.approx(
        sum(r.metrics["accuracy"] * r.num_samples for r in cas_results) / sum(r.num_samples for r in cas_results))
    assert ctx.run_state.progress["completed_rounds"] == {"cvae": 1, "classifier": 1}
