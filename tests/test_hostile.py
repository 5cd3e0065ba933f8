"""Hostile clients cannot poison the global model (the update guard and the result checks).

A real server stack runs in-process: Coordinator, gRPC service on loopback, and the RoundEngine
with its UpdateGuard driving the rounds and writing metrics.jsonl / summary.json. Hand-made clients
talk to it over real gRPC: honest ones send the global model plus small seeded noise (the same
for a redone round, so the expected aggregate is known exactly), hostile ones send what the
findings describe.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import pytest
import torch

from genfl_server.coordinator import Coordinator
from genfl_server.engine import RoundEngine
from genfl_server.guard import DEFAULT_MAX_CLIENT_SAMPLES, UpdateGuard, capped_weights
from genfl_server.metrics import ServerMetrics
from genfl_server.results import RunRecorder
from genfl_server.service import FederatedLearningService, start_grpc_server
from genfl_shared.codec import MAX_MESSAGE_BYTES, decode_payload, encode_state_dict
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.runfiles import write_json_atomic
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask, TrainTask

RUN_ID = "run-hostile"
DATASET = "mnist"
RPC_TIMEOUT = 20.0
HONEST_SAMPLES = 270  # the finding's client size
STEP = 0.01  # honest clients move each weight by about this much per round


def template() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(64, 32, generator=gen), "layer.bias": torch.randn(64, generator=gen),
            "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64)}


def honest_update(weights, client_id: str, rnd: int):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{client_id}-{rnd}".encode()))
    return {k: v + STEP * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 10
            for k, v in weights.items()}


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


TrainFn = Callable[[dict, pb.TaskHeader], tuple[int, dict]]


@dataclass
class Bot:
    """A hand-made client: registers, then answers tasks until the run shuts down."""

    client_id: str
    train: TrainFn
    # Metrics tried in order for each evaluation: the refused ones, then one that is accepted.
    evaluations: list[dict] = field(default_factory=lambda: [])
    samples: int = HONEST_SAMPLES
    refusals: list[grpc.RpcError] = field(default_factory=list)
    error: BaseException | None = None
    session_secret: str = ""  # from its Register reply

    def run(self, stub) -> None:
        try:
            self.session_secret = stub.Register(pb.RegisterRequest(
                client_id=self.client_id, num_train_samples=self.samples, num_heldout_samples=30,
                dataset=DATASET), timeout=RPC_TIMEOUT).session_secret
            while True:
                messages = list(stub.FetchTask(pb.FetchTaskRequest(run_id=RUN_ID, client_id=self.client_id,
                                                                   session_secret=self.session_secret),
                                               timeout=RPC_TIMEOUT))
                task = messages[0].header
                if task.type == pb.TASK_TYPE_SHUTDOWN:
                    return
                if task.type == pb.TASK_TYPE_IDLE:
                    continue
                weights = decode_payload(task.manifest, [m.chunk for m in messages[1:]], max_bytes=1 << 30)
                if task.type == pb.TASK_TYPE_TRAIN:
                    metrics = {"loss": 0.5, "steps": 9.0}
                    if task.train.evaluate_first:  # the previous round's evaluation
                        metrics.update({f"eval_{k}": v for k, v in honest_evaluation(weights).items()},
                                       eval_samples=30.0)
                    num_samples, update = self.train(weights, task)
                    self._submit(stub, task, num_samples, metrics, update)
                else:
                    for metrics in [*self.evaluations, honest_evaluation(weights)]:
                        try:
                            self._submit(stub, task, 30, metrics, None)
                            break
                        except grpc.RpcError as error:
                            self.refusals.append(error)
        except BaseException as error:  # reported by the test thread
            self.error = error

    def _submit(self, stub, task, num_samples, metrics, update):
        header = pb.ResultHeader(run_id=task.run_id, task_id=task.task_id, client_id=self.client_id,
                                 session_secret=self.session_secret,
                                 phase=task.phase, round=task.round, type=task.type, num_samples=num_samples,
                                 metrics=metrics)
        chunks = ()
        if update is not None:
            payload = encode_state_dict(update)
            header.manifest.CopyFrom(payload.manifest)
            chunks = payload.chunks
        messages = [pb.ResultMessage(header=header)] + [pb.ResultMessage(chunk=pb.Chunk(index=i, data=d))
                                                       for i, d in enumerate(chunks)]
        assert stub.SubmitResult(iter(messages), timeout=RPC_TIMEOUT).accepted


def honest_evaluation(weights) -> dict:
    """What the bots report for evaluating ``weights`` (a loss that follows the weights)."""
    finite = all(bool(torch.isfinite(v).all()) for v in weights.values())
    return {"loss": float(weights["layer.weight"].abs().mean()) if finite else math.nan, "accuracy": 0.8}


def honest(client_id: str) -> Bot:
    return Bot(client_id, lambda weights, task: (HONEST_SAMPLES, honest_update(weights, client_id, task.round)))


@dataclass
class Outcome:
    state: dict[str, torch.Tensor]
    metrics: ServerMetrics
    out: Path
    bots: list[Bot]

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("genfl_client_updates_rejected_total",
                                                      {"reason": reason}) or 0.0

    def rounds(self) -> list[dict]:
        return [strict_json(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]


# The bots ignore their task settings; the server still sends well-formed ones.
BOT_TRAIN_TASK = TrainTask(model="classifier", epochs=1, batch_size=32, optimizer="sgd", lr=0.01, sgd_momentum=0.0,
                           binarize=True)
BOT_EVAL_TASK = EvaluateTask(model="classifier", binarize=True)


def run_federation(tmp_path: Path, bots: list[Bot], *, guard: UpdateGuard | None = None, rounds: int = 1,
                   max_client_samples: int | None = DEFAULT_MAX_CLIENT_SAMPLES, strategy: str = "fedavg",
                   post_aggregation=None) -> Outcome:
    """One federated phase of ``rounds`` rounds over the bots; the final global state."""
    coordinator = Coordinator(RUN_ID, expected_clients=len(bots), dataset=DATASET, poll_timeout=2.0,
                              max_client_samples=max_client_samples)
    metrics = ServerMetrics()
    server, port, _health = start_grpc_server(FederatedLearningService(coordinator, metrics), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    out = tmp_path / "run"
    recorder = RunRecorder(out, run_id=RUN_ID)
    engine = RoundEngine(coordinator, metrics, recorder, seed=0, round_timeout=60, guard=guard)
    stub = pb_grpc.FederatedLearningStub(channel)
    threads = [threading.Thread(target=bot.run, args=(stub,), daemon=True) for bot in bots]
    try:
        for thread in threads:
            thread.start()
        engine.wait_for_clients(timeout=30)
        state = engine.run_rounds("classifier", template(), rounds=rounds, train_task=BOT_TRAIN_TASK,
                                  eval_task=BOT_EVAL_TASK, strategy=strategy, post_aggregation=post_aggregation)
        recorder.write_summary()
    finally:
        coordinator.shutdown(reason="test over")
        for thread in threads:
            thread.join(timeout=30)
        channel.close()
        server.stop(grace=1).wait(5)
    for bot in bots:
        assert bot.error is None, f"{bot.client_id}: {bot.error!r}"
    return Outcome(state, metrics, out, bots)


def fedavg(updates: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    return {k: sum(u[k].double() * w for u, w in zip(updates, weights)).div(total).to(v.dtype)
            if v.is_floating_point() else v + 10 for k, v in template().items()}


def expected_honest_round(client_ids, weights=None) -> dict:
    updates = [honest_update(template(), cid, 1) for cid in client_ids]
    return fedavg(updates, weights or [HONEST_SAMPLES] * len(updates))


HONEST = ["alice", "bob", "carol"]


# -- finding 1: finite but huge weights -----------------------------------------------------------

def huge(weights, task):
    return HONEST_SAMPLES, {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in weights.items()}


@pytest.mark.integration
def test_huge_finite_update_is_rejected_and_the_round_redone_without_it(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="genfl_server")
    outcome = run_federation(tmp_path, [*map(honest, HONEST), Bot("mallory", huge)])
    for name, value in outcome.state.items():
        assert bool(torch.isfinite(value).all()), f"{name} is not finite"
        torch.testing.assert_close(value, expected_honest_round(HONEST)[name])  # as if mallory never sent
    assert outcome.rejected("update_norm_adaptive") == 1
    assert any("mallory" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
    (round_record,) = [r for r in outcome.rounds() if r["event"] == "round"]
    assert math.isfinite(round_record["weighted_client_loss"])


@pytest.mark.integration
def test_huge_update_without_norm_bounds_is_caught_by_the_aggregate_check(tmp_path):
    outcome = run_federation(tmp_path, [*map(honest, HONEST), Bot("mallory", huge)],
                             guard=UpdateGuard(norm_factor=None, max_weight_share=None))
    assert outcome.rejected("bad_aggregate") == 1
    for name, value in outcome.state.items():
        torch.testing.assert_close(value, expected_honest_round(HONEST)[name])


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum"])
@pytest.mark.parametrize("bounds", ["off", "default"])
def test_robust_strategies_over_grpc_keep_the_model_near_the_honest_updates(tmp_path, strategy, bounds):
    # Bounds off: the strategy alone must resist. Default bounds: mallory is dropped first and Krum
    # runs on the 4 updates left.
    guard = UpdateGuard(norm_factor=None, max_weight_share=None) if bounds == "off" else None
    outcome = run_federation(tmp_path, [*map(honest, ["alice", "bob", "carol", "dave"]), Bot("mallory", huge)],
                             guard=guard, strategy=strategy)
    start = template()
    for name in ("layer.weight", "layer.bias"):
        assert float((outcome.state[name] - start[name]).abs().max()) < 5 * STEP, name
    assert outcome.rejected("update_norm_adaptive") == (0 if bounds == "off" else 1)


def _boosted(weights, task):  # model replacement: the honest step scaled a thousandfold
    step = honest_update(weights, "mallory", task.round)
    return HONEST_SAMPLES, {k: v + 1000 * (step[k] - v) if v.is_floating_point() else step[k]
                            for k, v in weights.items()}


@pytest.mark.integration
def test_explicit_max_update_norm_rejects_or_clips(tmp_path):
    bound = 5 * STEP * math.sqrt(64 * 32 + 64)  # five honest steps
    rejected = run_federation(tmp_path / "reject", [*map(honest, HONEST), Bot("mallory", _boosted)],
                              guard=UpdateGuard(max_update_norm=bound, norm_factor=None))
    assert rejected.rejected("update_norm") == 1
    torch.testing.assert_close(rejected.state["layer.weight"], expected_honest_round(HONEST)["layer.weight"])

    clipped = run_federation(tmp_path / "clip", [*map(honest, HONEST), Bot("mallory", _boosted)],
                             guard=UpdateGuard(max_update_norm=bound, norm_factor=None, clip=True))
    assert clipped.rejected("update_norm") == 0
    boosted = _boosted(template(), pb.TaskHeader(round=1))[1]
    start = template()
    distance = math.sqrt(sum(float(((boosted[k] - start[k]).double() ** 2).sum()) for k in ("layer.weight", "layer.bias")))
    clip = {k: (start[k].double() + (boosted[k].double() - start[k].double()) * (bound / distance)).float()
            for k in ("layer.weight", "layer.bias")}
    expected = fedavg([*(honest_update(template(), c, 1) for c in HONEST), clip], [HONEST_SAMPLES] * 4)
    torch.testing.assert_close(clipped.state["layer.weight"], expected["layer.weight"])


# -- finding 2: the sample count as a weapon --------------------------------------------------------

def zeros(weights, task):
    return task_samples(task), {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in weights.items()}


def task_samples(task) -> int:
    return DEFAULT_MAX_CLIENT_SAMPLES


@pytest.mark.integration
def test_absurd_sample_count_is_refused_at_registration(tmp_path):
    coordinator = Coordinator(RUN_ID, expected_clients=2, dataset=DATASET, max_client_samples=DEFAULT_MAX_CLIENT_SAMPLES)
    metrics = ServerMetrics()
    server, port, _health = start_grpc_server(FederatedLearningService(coordinator, metrics), "127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FederatedLearningStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(pb.RegisterRequest(client_id="mallory", num_train_samples=10**12, num_heldout_samples=1,
                                             dataset=DATASET), timeout=RPC_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max-client-samples" in info.value.details()
        assert metrics.registry.get_sample_value("genfl_client_updates_rejected_total",
                                                 {"reason": "bad_sample_count"}) == 1
        assert "mallory" not in coordinator.clients
        stub.Register(pb.RegisterRequest(client_id="mallory", num_train_samples=DEFAULT_MAX_CLIENT_SAMPLES,
                                         num_heldout_samples=1, dataset=DATASET), timeout=RPC_TIMEOUT)
        assert coordinator.clients["mallory"].num_train_samples == DEFAULT_MAX_CLIENT_SAMPLES
    server.stop(grace=1).wait(5)


@pytest.mark.integration
@pytest.mark.parametrize("counts, why", [([30] * 9, "for 9 classes"), ([27] * 9 + [28], "summing to 271"),
                                         ([0] * 11, "for 11 classes"), ([1] * 100_000, "for 100000 classes")])
def test_a_bad_label_histogram_is_refused_at_registration(tmp_path, counts, why):
    """The label counts a client reports are untrusted: one per class, summing to its registered
    train samples, or the registration is refused (INVALID_ARGUMENT, counted by reason)."""
    coordinator = Coordinator(RUN_ID, expected_clients=2, dataset=DATASET)
    metrics = ServerMetrics()
    server, port, _health = start_grpc_server(FederatedLearningService(coordinator, metrics), "127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FederatedLearningStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(pb.RegisterRequest(client_id="mallory", num_train_samples=270, num_heldout_samples=30,
                                             dataset=DATASET, label_counts=counts), timeout=RPC_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in info.value.details()
        assert metrics.registry.get_sample_value("genfl_client_updates_rejected_total",
                                                 {"reason": "bad_label_counts"}) == 1
        assert "mallory" not in coordinator.clients
        honest_counts = [27] * 10
        stub.Register(pb.RegisterRequest(client_id="mallory", num_train_samples=270, num_heldout_samples=30,
                                         dataset=DATASET, label_counts=honest_counts), timeout=RPC_TIMEOUT)
        assert coordinator.clients["mallory"].label_counts == tuple(honest_counts)
        stub.Register(pb.RegisterRequest(client_id="alice", num_train_samples=270, num_heldout_samples=30,
                                         dataset=DATASET), timeout=RPC_TIMEOUT)
        assert coordinator.clients["alice"].label_counts is None  # sharing them is the client's choice
    server.stop(grace=1).wait(5)


@pytest.mark.integration
def test_zero_update_with_a_huge_sample_count_cannot_replace_the_model(tmp_path):
    # Default guard: the zeroed model is far beyond the honest steps, so the round is redone without it.
    outcome = run_federation(tmp_path / "default", [*map(honest, HONEST), Bot("mallory", zeros,
                                                                              samples=DEFAULT_MAX_CLIENT_SAMPLES)])
    assert outcome.rejected("update_norm_adaptive") == 1
    torch.testing.assert_close(outcome.state["layer.weight"], expected_honest_round(HONEST)["layer.weight"])

    # Without norm bounds, the weight-share cap alone keeps mallory at half of the FedAvg weight.
    capped = run_federation(tmp_path / "share", [*map(honest, HONEST), Bot("mallory", zeros,
                                                                           samples=DEFAULT_MAX_CLIENT_SAMPLES)],
                            guard=UpdateGuard(norm_factor=None))
    counts = {**{c: HONEST_SAMPLES for c in HONEST}, "mallory": DEFAULT_MAX_CLIENT_SAMPLES}
    weights = capped_weights(counts, 0.5)
    assert weights["mallory"] == pytest.approx(3 * HONEST_SAMPLES)
    expected = fedavg([*(honest_update(template(), c, 1) for c in HONEST), zeros(template(), None)[1]],
                      [weights[c] for c in [*HONEST, "mallory"]])
    torch.testing.assert_close(capped.state["layer.weight"], expected["layer.weight"])
    assert float(capped.state["layer.weight"].abs().mean()) > 0.4 * float(template()["layer.weight"].abs().mean())


# -- finding 3: metrics ---------------------------------------------------------------------------

HOSTILE_METRICS = [{"loss": math.nan, "accuracy": 0.5}, {"loss": 1.0, "accuracy": 1e300},
                   {"loss": 1.0, "accuracy": -1e9}, {"x" * 1_000_000: 1.0}, {"loss": -3.0},
                   {"loss": 1.0, "accuracy": 0.5, "precision": 0.5}]


@pytest.mark.integration
def test_invalid_metrics_are_refused_and_run_files_stay_strict_json(tmp_path):
    liar = Bot("mallory", lambda weights, task: (HONEST_SAMPLES, honest_update(weights, "mallory", task.round)),
               evaluations=list(HOSTILE_METRICS))
    outcome = run_federation(tmp_path, [*map(honest, HONEST), liar])
    assert len(liar.refusals) == len(HOSTILE_METRICS)
    for error in liar.refusals:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert outcome.rejected("bad_metrics") == len(HOSTILE_METRICS)
    (round_record,) = [r for r in outcome.rounds() if r["event"] == "round"]
    assert math.isfinite(round_record["weighted_client_loss"])
    assert round_record["weighted_client_accuracy"] == pytest.approx(0.8)
    summary = strict_json((outcome.out / "summary.json").read_text())
    assert 0 <= summary["final"]["weighted_client_accuracy"] <= 1


@pytest.mark.unit
def test_run_files_stay_strict_json_when_the_server_measures_a_diverged_model(tmp_path, caplog):
    # Client metrics are refused above; the server's own numbers (the test loss of a model that
    # diverged honestly, e.g. FedAvgM) are recorded as null, with a warning, and the run goes on.
    recorder = RunRecorder(tmp_path, run_id=RUN_ID)
    recorder.record_event("cas", cas=math.nan)
    recorder.record_round({"phase": "classifier", "round": 1, "weighted_client_accuracy": 0.5,
                           "test_accuracy": 0.1, "test_loss": math.inf, "per_client": {"a": {"loss": math.nan}}})
    recorder.set(cas=math.inf)
    recorder.write_summary()
    events = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["cas"] is None and events[1]["test_loss"] is None
    assert events[1]["per_client"]["a"]["loss"] is None
    summary = strict_json((tmp_path / "summary.json").read_text())
    assert summary["cas"] is None and summary["rounds"][0]["test_loss"] is None
    assert sum("recorded as null" in r.getMessage() for r in caplog.records) == 4
    with pytest.raises(ValueError):  # the writer itself never writes NaN
        write_json_atomic(tmp_path / "x.json", {"x": math.nan})
    assert not (tmp_path / "x.json").exists()
