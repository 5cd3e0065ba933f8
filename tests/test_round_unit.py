"""The round logic through the coordinator's interface, with in-process clients (tests/inprocess.py):
what each round asks of the clients, what it folds, what it records. No sockets, no processes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch

from genfl_server.engine import RoundFailed, RoundModels
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


def shards(client_ids=CLIENTS, train: int = 16):
    """One tiny shard per client, each of another size (so sample weights matter)."""
    return [tiny_shard(cid, seed, train=train + 4 * seed) for seed, cid in enumerate(client_ids)]


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
        final = fed.engine.run_rounds("cvae", initial_state("cvae", 0), rounds=2, train_task=CVAE_TRAIN,
                                      eval_task=CVAE_EVAL,
                                      on_round_end=lambda rnd, state: aggregates.setdefault(rnd, state))
        records = run_rounds(tmp_path)
        # Every round's aggregate is the FedAvg of what the clients sent in it.
        for rnd in (1, 2):
            sent = [u for c in fed.clients.values() for u in c.updates("cvae", rnd)]
            assert len(sent) == 3
            assert_states_close(aggregates[rnd], fedavg([(u.num_samples, u.weights) for u in sent]))
        # One download per client per round: round r's evaluation rode on round r + 1's TRAIN task,
        # only the last round's aggregate got an EVALUATE task of its own.
        for client in fed.clients.values():
            kinds = [(t.round, t.is_train, getattr(t.settings, "evaluate_first", None)) for t in client.received]
            assert kinds == [(1, True, False), (2, True, True), (2, False, None)]
            for task in client.tasks(train=True)[1:]:  # it evaluated the model it trained from
                assert all(torch.equal(task.weights[k], aggregates[task.round - 1][k]) for k in task.weights)
        assert [r["round"] for r in records] == [1, 2]
        # Each record's evaluation is what a separate EVALUATE step of that round's aggregate reports.
        for record in records:
            alone = fed.engine.evaluate("cvae", record["round"], aggregates[record["round"]], CVAE_EVAL)
            assert record["per_client"] == alone.per_client
            assert record["weighted_client_loss"] == alone.weighted_loss
            assert record["clients"] == 3 and record["per_client"]["bob"]["samples"] == 16
        assert all(torch.equal(final[k], aggregates[2][k]) for k in final)


def distance(a, b) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b if b[k].is_floating_point()) ** 0.5)


def scaled_step(factor: float):
    """A hostile client's change: its step from the model it received, multiplied by ``factor``."""
    def tamper(task, trained):
        return {k: task.weights[k] + factor * (v - task.weights[k]) for k, v in trained.items()}
    return tamper


@dataclass
class RecordingStep:
    """A post-aggregation step that records what the engine hands it and nudges the aggregate."""

    keeps_updates: bool
    shift: float = 1e-3
    seen: list[tuple[int, RoundModels]] = field(default_factory=list)

    def __call__(self, rnd, aggregate, models):
        self.seen.append((rnd, models))
        return {k: v + self.shift for k, v in aggregate.items()}, {"kind": "recording", "shift": self.shift}


@dataclass(frozen=True)
class RecordingGuard(UpdateGuard):
    """The run's update bounds, keeping each round's RoundGuard to look at its measurements."""

    rounds: list = field(default_factory=list, compare=False)

    def round(self, global_state, sample_counts):
        guard = super().round(global_state, sample_counts)
        self.rounds.append(guard)
        return guard


def test_the_guard_refuses_a_scaled_update_and_the_round_is_redone_without_it(tmp_path):
    start = initial_state("cvae", 0)
    step = RecordingStep(keeps_updates=True)
    with federation(tmp_path, shards(("alice", "bob", "carol", "mallory")),
                    tamper={"mallory": scaled_step(50.0)}) as fed:
        final = fed.engine.run_rounds("cvae", start, rounds=1, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                                      post_aggregation=step)
        honest = [fed.clients[cid] for cid in ("alice", "bob", "carol")]
        mallory = fed.clients["mallory"]
        assert fed.metrics.updates_rejected.labels("update_norm_adaptive")._value.get() == 1
        # Mallory trained once; the honest clients twice, the redo sending exactly what the first try did.
        assert len(mallory.tasks("cvae", train=True)) == 1
        for client in honest:
            first, redo = client.updates("cvae", 1)
            assert all(torch.equal(first.weights[k], redo.weights[k]) for k in start)
        # The aggregate is FedAvg of the honest updates alone (the step then shifted it).
        expected = fedavg([(c.updates("cvae", 1)[-1].num_samples, c.updates("cvae", 1)[-1].weights) for c in honest])
        ((rnd, models),) = step.seen
        assert rnd == 1 and sorted(models.accepted) == ["alice", "bob", "carol"]
        for client in honest:  # the step sees each accepted update as the client sent it
            sent = client.updates("cvae", 1)[-1].weights
            assert all(torch.equal(models.accepted[client.client_id][k], sent[k]) for k in start)
        assert all(torch.equal(models.previous[k], start[k]) for k in start)
        assert_states_close(final, {k: v + step.shift for k, v in expected.items()})
        # The model every client evaluates (Mallory too) is the corrected one, and the record says so.
        for client in fed.clients.values():
            (evaluation,) = client.tasks("cvae", train=False)
            assert all(torch.equal(evaluation.weights[k], final[k]) for k in final)
        (record,) = run_rounds(tmp_path)
        assert record["post_aggregation"] == {"kind": "recording", "shift": step.shift, "accepted": True,
                                              "seconds": record["post_aggregation"]["seconds"]}
        assert record["clients"] == 4


def test_a_post_aggregation_step_without_keeps_updates_gets_none_of_them(tmp_path):
    step = RecordingStep(keeps_updates=False)
    with federation(tmp_path, shards(("alice", "bob"))) as fed:
        fed.engine.run_rounds("cvae", initial_state("cvae", 0), rounds=1, train_task=CVAE_TRAIN,
                              eval_task=CVAE_EVAL, post_aggregation=step)
    ((_rnd, models),) = step.seen
    assert dict(models.accepted) == {}


def test_fedprox_mu_reaches_every_training_task_and_pulls_the_update_towards_the_global_model(tmp_path):
    start = initial_state("cvae", 0)
    train = replace(CVAE_TRAIN, batch_size=4)  # 4 local steps: the proximal term acts from the second on
    with federation(tmp_path, shards(("alice", "bob"))) as fed:
        fed.engine.run_rounds("cvae", start, rounds=1, train_task=train, eval_task=CVAE_EVAL, strategy=FedAvg())
        fed.engine.run_rounds("cvae", start, rounds=1, train_task=train, eval_task=CVAE_EVAL,
                              strategy=FedProx(prox_mu=100.0))
        for client in fed.clients.values():
            plain, proximal = client.tasks("cvae", train=True)
            assert (plain.settings.prox_mu, proximal.settings.prox_mu) == (0.0, 100.0)
            assert plain.settings.seed == proximal.settings.seed  # the same task but for mu
            assert not any(hasattr(t.settings, "prox_mu") for t in client.tasks("cvae", train=False))
            plain_update, proximal_update = (sent.weights for sent in client.updates("cvae", 1))
            assert distance(proximal_update, start) < 0.5 * distance(plain_update, start)


class OwnStartModel(FedAvg):
    """FedAvg that gives one client a start model of its own (as per-client generators would)."""

    def __init__(self, client_id: str, model):
        super().__init__()
        self.client_id, self.model = client_id, model

    def configure_train(self, rnd, model, tasks):
        instructions = super().configure_train(rnd, model, tasks)
        if self.client_id in instructions:  # not when a redo leaves the client out
            own = instructions[self.client_id]
            instructions[self.client_id] = Instruction(own.task, self.model)
        return instructions


def test_a_client_given_its_own_start_model_trains_from_it_and_the_others_share_one_download(tmp_path):
    shared, own = initial_state("cvae", 0), initial_state("cvae", 1)
    with federation(tmp_path, shards()) as fed:
        fed.engine.run_rounds("cvae", shared, rounds=1, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                              strategy=OwnStartModel("bob", own))
        (alice_task,), (bob_task,), (carol_task,) = (fed.clients[c].tasks("cvae", train=True) for c in CLIENTS)
        assert all(torch.equal(bob_task.weights[k], own[k]) for k in own)
        assert all(torch.equal(alice_task.weights[k], shared[k]) for k in shared)
        assert alice_task.payload is carol_task.payload is not bob_task.payload  # the shared model encoded once
        # Bob's update is what training from its own model gives: it stayed near that model.
        (bob_update,) = fed.clients["bob"].updates("cvae", 1)
        assert distance(bob_update.weights, own) < 0.1 * distance(bob_update.weights, shared)


def test_the_guard_measures_a_per_client_start_models_update_from_that_model(tmp_path):
    shared, own = initial_state("cvae", 0), initial_state("cvae", 1)
    guard = RecordingGuard()
    with federation(tmp_path, shards(), guard=guard) as fed:
        fed.engine.run_rounds("cvae", shared, rounds=1, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                              strategy=OwnStartModel("bob", own))
        assert fed.metrics.updates_rejected.labels("update_norm_adaptive")._value.get() == 0
        (bob_update,) = fed.clients["bob"].updates("cvae", 1)
        assert guard.rounds[0].distances["bob"] == pytest.approx(distance(bob_update.weights, own), rel=1e-5)


def test_an_update_beyond_max_update_norm_is_clipped_into_the_aggregate_and_kept_from_the_step(tmp_path):
    start, bound = initial_state("cvae", 0), 5.0
    step = RecordingStep(keeps_updates=True, shift=0.0)
    with federation(tmp_path, shards(("alice", "bob", "mallory")), tamper={"mallory": scaled_step(50.0)},
                    guard=UpdateGuard(max_update_norm=bound, clip=True, norm_factor=None)) as fed:
        final = fed.engine.run_rounds("cvae", start, rounds=1, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                                      post_aggregation=step)
        sent = {cid: client.updates("cvae", 1) for cid, client in fed.clients.items()}
    assert all(len(updates) == 1 for updates in sent.values())  # clipped, not refused: no redo
    (alice, bob, mallory) = (sent[cid][0] for cid in ("alice", "bob", "mallory"))
    assert distance(alice.weights, start) < bound < distance(mallory.weights, start)
    factor = bound / distance(mallory.weights, start)
    clipped = {k: start[k] + factor * (mallory.weights[k] - start[k]) for k in start}
    assert_states_close(final, fedavg([(alice.num_samples, alice.weights), (bob.num_samples, bob.weights),
                                       (mallory.num_samples, clipped)]))
    ((_rnd, models),) = step.seen
    assert sorted(models.accepted) == ["alice", "bob"]


def carol_gets_a_misfit_model() -> OwnStartModel:
    """FedAvg sending Carol weights that do not fit the task's model: she cannot run her task."""
    return OwnStartModel("carol", initial_state("classifier", 0))


def test_a_client_that_cannot_run_its_task_fails_the_round_with_its_error(tmp_path):
    with federation(tmp_path, shards()) as fed:
        with pytest.raises(RoundFailed, match="client carol could not execute its task: .*do not fit a cvae model"):
            fed.engine.run_rounds("cvae", initial_state("cvae", 0), rounds=1, train_task=CVAE_TRAIN,
                                  eval_task=CVAE_EVAL, strategy=carol_gets_a_misfit_model())
        assert len(fed.clients["carol"].tasks("cvae", train=True)) == 1  # not retried: the same task would fail
        assert fed.clients["carol"].updates("cvae", 1) == []


def test_with_min_clients_a_round_goes_on_without_a_client_that_cannot_run_its_task(tmp_path):
    with federation(tmp_path, shards(), min_clients=2) as fed:
        final = fed.engine.run_rounds("cvae", initial_state("cvae", 0), rounds=1, train_task=CVAE_TRAIN,
                                      eval_task=CVAE_EVAL, strategy=carol_gets_a_misfit_model())
        alice, bob = (fed.clients[cid].updates("cvae", 1)[0] for cid in ("alice", "bob"))
    assert_states_close(final, fedavg([(alice.num_samples, alice.weights), (bob.num_samples, bob.weights)]))
    (record,) = run_rounds(tmp_path)
    assert record["train_loss"] == pytest.approx(
        (alice.metrics["loss"] * alice.num_samples + bob.metrics["loss"] * bob.num_samples)
        / (alice.num_samples + bob.num_samples))


def test_the_median_strategy_outvotes_a_hostile_update_the_guard_lets_through(tmp_path):
    start = initial_state("cvae", 0)
    with federation(tmp_path, shards(("alice", "bob", "mallory")), tamper={"mallory": scaled_step(50.0)},
                    guard=UpdateGuard(norm_factor=None)) as fed:
        final = fed.engine.run_rounds("cvae", start, rounds=1, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                                      strategy="median")
        sent = [fed.clients[cid].updates("cvae", 1)[0].weights for cid in ("alice", "bob", "mallory")]
    for name in start:  # each weight the middle one of the three clients' values
        assert torch.equal(final[name], torch.stack([s[name] for s in sent]).median(dim=0).values), name
    assert distance(final, start) < 2 * max(distance(s, start) for s in sent[:2])
