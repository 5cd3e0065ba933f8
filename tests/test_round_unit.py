"""The round logic through the coordinator's interface, with in-process clients (tests/inprocess.py):
what each round asks of the clients, what it folds, what it records. No sockets, no processes."""

from __future__ import annotations

import pytest
import torch

from genfl_server.engine import RoundModels
from genfl_server.guard import UpdateGuard
from genfl_server.strategy import FedAvg, FedProx, Instruction
from genfl_shared.models import initial_state
from genfl_shared.tasks import EvaluateTask, TrainTask
from helpers import run_rounds
from inprocess import federation, tiny_shard

pytestmark = pytest.mark.unit

CLASSIFIER_TRAIN = TrainTask(model="classifier", epochs=1, batch_size=16, optimizer="sgd", lr=0.05,
                             sgd_momentum=0.0, binarize=False)
CLASSIFIER_EVAL = EvaluateTask(model="classifier", binarize=False)
CVAE_TRAIN = TrainTask(model="cvae", epochs=1, batch_size=16, optimizer="adam", lr=1e-3, sgd_momentum=0.0,
                       binarize=True)
CVAE_EVAL = EvaluateTask(model="cvae", binarize=True)
CLIENTS = ("alice", "bob", "carol")


def shards(client_ids=CLIENTS, train: int = 32):
    return [tiny_shard(cid, seed, train=train + 8 * seed) for seed, cid in enumerate(client_ids)]


def fedavg(updates: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of (num_samples, state) pairs, integers rounded back."""
    total = sum(n for n, _ in updates)
    mean = {}
    for name, first in updates[0][1].items():
        acc = sum(n * state[name].to(torch.float64) for n, state in updates) / total
        mean[name] = (acc if first.is_floating_point() else acc.round()).to(first.dtype)
    return mean


def assert_states_close(actual, expected, atol=1e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name].double(), expected[name].double(), atol=atol, rtol=0), name


def test_rounds_record_each_aggregate_evaluated_by_the_next_rounds_training(tmp_path):
    with federation(tmp_path, shards()) as fed:
        aggregates = {}
        final = fed.engine.run_rounds("cvae", initial_state("cvae", 0), rounds=3, train_task=CVAE_TRAIN,
                                      eval_task=CVAE_EVAL,
                                      on_round_end=lambda rnd, state: aggregates.setdefault(rnd, state))
        records = run_rounds(tmp_path)
        # Every round's aggregate is the FedAvg of what the clients sent in it.
        for rnd in (1, 2, 3):
            sent = [u for c in fed.clients.values() for u in c.updates("cvae", rnd)]
            assert len(sent) == 3
            assert_states_close(aggregates[rnd], fedavg([(u.num_samples, u.weights) for u in sent]))
        # One download per client per round: round r's evaluation rode on round r + 1's TRAIN task,
        # only the last round's aggregate got an EVALUATE task of its own.
        for client in fed.clients.values():
            kinds = [(t.round, t.is_train, getattr(t.settings, "evaluate_first", None)) for t in client.received]
            assert kinds == [(1, True, False), (2, True, True), (3, True, True), (3, False, None)]
            for task in client.tasks(train=True)[1:]:  # it evaluated the model it trained from
                assert all(torch.equal(task.weights[k], aggregates[task.round - 1][k]) for k in task.weights)
        assert [r["round"] for r in records] == [1, 2, 3]
        # Each record's evaluation is what a separate EVALUATE step of that round's aggregate reports.
        for record in records:
            alone = fed.engine.evaluate("cvae", record["round"], aggregates[record["round"]], CVAE_EVAL)
            assert record["per_client"] == alone.per_client
            assert record["weighted_client_loss"] == alone.weighted_loss
            assert record["clients"] == 3 and record["per_client"]["bob"]["samples"] == 16
        assert all(torch.equal(final[k], aggregates[3][k]) for k in final)
