"""The typed task contract (genfl_shared.tasks) and what happens to a task a client cannot execute.

Parsing is strict: every kind of bad input is refused with a TaskSettingsError naming the key.
End to end over real gRPC on loopback: a real round engine whose training task carries a misspelt
key, and a real client (ClientRunner + TaskExecutor in a thread): the client reports the error, the
server logs it, counts it in genfl_client_updates_rejected_total{reason="task_error"} and fails
the round at once with the client's message; the client keeps serving the next (good) task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from genfl_client.executor import TaskExecutor
from genfl_client.metrics import ClientMetrics
from genfl_client.runner import ClientRunner
from genfl_server.coordinator import Coordinator
from genfl_server.engine import RoundEngine, RoundFailed
from genfl_server.metrics import ServerMetrics
from genfl_server.phases import eval_task, train_task
from genfl_server.results import RunRecorder
from genfl_server.logsafe import MAX_SHOWN_CHARS
from genfl_shared.codec import encode_state_dict
from genfl_shared.config import PRESETS
from genfl_shared.models import initial_state
from genfl_shared.partition import Shard
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask, TaskSettingsError, TrainTask, from_json
from helpers import loopback_server, wait_until

TRAIN = dict(model="classifier", epochs=2, batch_size=16, optimizer="sgd", lr=0.01, sgd_momentum=0.5,
             binarize=False, prox_mu=0.1, deterministic=True, evaluate_first=False, evaluate_seed=0, seed=12345)
EVALUATE = dict(model="cvae", binarize=True, seed=7)


def wire(**changes) -> str:
    """TRAIN's wire JSON with keys changed (a value of ... deletes the key)."""
    data = dict(TRAIN)
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


def refused(text: str, kind: str = "train") -> TaskSettingsError:
    with pytest.raises(TaskSettingsError) as caught:
        from_json(text, kind)
    return caught.value


# -- the contract -----------------------------------------------------------------------------------

def test_round_trip_keeps_every_value_exactly():
    train = TrainTask(**TRAIN)
    evaluate = EvaluateTask(**EVALUATE)
    assert from_json(train.to_json(), "train") == train
    assert from_json(evaluate.to_json(), "evaluate") == evaluate
    assert json.loads(train.to_json()) == TRAIN  # the wire carries the fields by their names
    awkward = dataclasses.replace(train, lr=0.1 + 0.2, seed=2**31 - 1)  # a float with no short decimal
    assert from_json(awkward.to_json(), "train").lr == 0.1 + 0.2


def test_an_int_is_a_float_but_a_bool_is_not_an_int():
    task = from_json(wire(lr=1, prox_mu=0), "train")
    assert task.lr == 1.0 and isinstance(task.lr, float) and isinstance(task.prox_mu, float)
    for key in ("epochs", "batch_size", "seed"):
        assert refused(wire(**{key: True})).key == key
    assert refused(wire(lr=True)).key == "lr"
    assert refused(wire(epochs=2.0)).key == "epochs"  # an int field takes no float, however round
    assert refused(wire(binarize=1)).key == "binarize"
    assert refused(wire(model=1)).key == "model"
    assert refused(wire(seed=None)).key == "seed"


def test_unknown_and_misspelt_keys_are_refused_by_name():
    error = refused(wire(lr=..., learning_rate=0.01))
    assert error.key == "learning_rate" and "unknown setting" in str(error) and "lr" in str(error)
    assert refused(wire(momentum=0.5)).key == "momentum"  # the old wire name is not quietly taken
    assert refused(json.dumps(dict(EVALUATE, epochs=1)), "evaluate").key == "epochs"


def test_missing_required_keys_are_refused_and_only_off_switches_are_optional():
    for key in ("model", "epochs", "batch_size", "optimizer", "lr", "sgd_momentum", "binarize", "seed"):
        error = refused(wire(**{key: ...}))
        assert error.key == key and "missing" in str(error)
    for key in ("model", "binarize", "seed"):
        assert refused(json.dumps({k: v for k, v in EVALUATE.items() if k != key}), "evaluate").key == key
    lenient = from_json(wire(prox_mu=..., deterministic=..., evaluate_first=..., evaluate_seed=...), "train")
    assert (lenient.prox_mu, lenient.deterministic, lenient.evaluate_first, lenient.evaluate_seed) == (
        0.0, False, False, 0)


@pytest.mark.parametrize("key, value", [
    ("epochs", -1), ("batch_size", 0), ("lr", 0), ("lr", -0.1), ("model", "resnet"), ("optimizer", "rmsprop"),
    ("sgd_momentum", -0.1), ("sgd_momentum", 1.0), ("prox_mu", -0.01), ("seed", -1), ("seed", 2**63),
    ("lr", 10**400), ("evaluate_seed", -1), ("evaluate_seed", 2**63),
])
def test_out_of_range_values_are_refused(key, value):
    error = refused(wire(**{key: value}))
    assert error.key == key, error


def test_values_that_do_not_fit_together_are_refused():
    # train_cvae always uses Adam: a CVAE task asking for SGD would be quietly ignored otherwise.
    assert refused(wire(model="cvae")).key == "optimizer"
    assert refused(wire(optimizer="adam")).key == "sgd_momentum"  # momentum means nothing to Adam
    assert from_json(wire(model="cvae", optimizer="adam", sgd_momentum=0), "train").model == "cvae"
    # A seed for an evaluation nobody asked for is a sender's mistake, not something to ignore.
    assert refused(wire(evaluate_seed=5)).key == "evaluate_seed"
    assert refused(wire(evaluate_first=1)).key == "evaluate_first"


def test_local_loss_is_a_checked_classifier_setting_left_off_the_wire_when_plain():
    balanced = from_json(wire(local_loss="balanced"), "train")
    assert balanced.local_loss == "balanced"
    assert json.loads(balanced.to_json())["local_loss"] == "balanced"
    assert from_json(wire(), "train").local_loss == "ce"  # a sender that predates the field
    assert "local_loss" not in json.loads(TrainTask(**TRAIN, local_loss="ce").to_json())
    assert refused(wire(local_loss="focal")).key == "local_loss"
    assert refused(wire(local_loss=1)).key == "local_loss"
    # The CVAE has no classes to balance: asking for it is a sender's mistake.
    assert refused(wire(model="cvae", optimizer="adam", sgd_momentum=0, local_loss="balanced")).key == "local_loss"
    assert train_task(PRESETS["quick"], "classifier").local_loss == "ce"
    balanced_config = PRESETS["quick"].override(local_loss="balanced")
    assert train_task(balanced_config, "classifier").local_loss == "balanced"
    assert train_task(balanced_config, "cvae").local_loss == "ce"


def test_evaluate_first_names_the_evaluation_it_stands_for():
    train = from_json(wire(evaluate_first=True, evaluate_seed=77), "train")
    assert train.first_evaluation() == EvaluateTask(model="classifier", binarize=False, seed=77)
    assert TrainTask(**TRAIN).first_evaluation() is None


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '"text"', "null", '{"model": "cvae", "model": "cvae"}'])
def test_malformed_documents_are_refused(text):
    error = refused(text)
    assert str(error)


def test_non_finite_floats_are_refused_by_name():
    assert refused(wire(lr=float("inf"))).key == "lr"
    assert refused(wire(prox_mu=float("nan"))).key == "prox_mu"


def test_unknown_kind_is_refused():
    with pytest.raises(TaskSettingsError, match="unknown task kind"):
        from_json(TrainTask(**TRAIN).to_json(), "shutdown")


def test_construction_checks_too_and_an_unseeded_task_does_not_go_out():
    with pytest.raises(TaskSettingsError) as caught:
        TrainTask(**dict(TRAIN, batch_size=0))
    assert caught.value.key == "batch_size"
    template = TrainTask(**dict(TRAIN, seed=None))  # what a phase builds; the engine seeds it per client
    with pytest.raises(TaskSettingsError, match="round engine") as caught:
        template.to_json()
    assert caught.value.key == "seed"


def test_phase_settings_carry_the_run_config():
    cfg = PRESETS["quick"]
    cvae, classifier = train_task(cfg, "cvae"), train_task(cfg, "classifier")
    assert (cvae.optimizer, cvae.lr, cvae.sgd_momentum) == ("adam", cfg.training.cvae_lr, 0.0)
    assert (classifier.optimizer, classifier.lr, classifier.sgd_momentum) == (
        "sgd", cfg.training.classifier_lr, cfg.training.sgd_momentum)
    for task in (cvae, classifier):
        assert (task.epochs, task.batch_size, task.binarize, task.seed) == (
            cfg.training.local_epochs, cfg.training.batch_size, cfg.data.binarize, None)
    assert eval_task(cfg, "classifier") == EvaluateTask(model="classifier", binarize=cfg.data.binarize)


# -- a real server and a real client -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MisspeltTrainTask(TrainTask):
    """A training task whose wire form says "learning_rate" for "lr" (a sender-side typo)."""

    def to_json(self) -> str:
        data = json.loads(super().to_json())
        data["learning_rate"] = data.pop("lr")
        return json.dumps(data)


def _shard(client_id: str, train: int = 48, heldout: int = 16) -> Shard:
    rng = np.random.default_rng(0)
    return Shard(client_id, 0, "mnist",
                 rng.integers(0, 256, (train, 28, 28), dtype=np.uint8), rng.integers(0, 10, train).astype(np.int64),
                 rng.integers(0, 256, (heldout, 28, 28), dtype=np.uint8), rng.integers(0, 10, heldout).astype(np.int64))


@pytest.fixture
def live(tmp_path):
    """A real gRPC server with a round engine, and one real client serving tasks in a thread."""
    coordinator = Coordinator("run-tasks", expected_clients=1, dataset="mnist", poll_timeout=5.0)
    metrics = ServerMetrics()
    engine = RoundEngine(coordinator, metrics, RunRecorder(tmp_path, run_id="run-tasks"), seed=3,
                         round_timeout=120.0, round_retries=2)
    shard = _shard("alice")
    outcome: dict = {}
    with loopback_server(coordinator, metrics) as (_channel, port):
        runner = ClientRunner(f"127.0.0.1:{port}", "alice", TaskExecutor(shard, torch.device("cpu")),
                              ClientMetrics("alice"), dataset="mnist")

        def serve():
            try:
                outcome["exit_code"] = runner.run()
            except BaseException as error:  # surfaced by the test, not lost in the thread
                outcome["error"] = error

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            engine.wait_for_clients(timeout=30)
            yield engine, metrics, shard, thread, outcome
        finally:
            coordinator.shutdown(failed=True, reason="test over")
            thread.join(30)
            runner.close()


def _task_errors(metrics: ServerMetrics) -> float:
    return metrics.registry.get_sample_value("genfl_client_updates_rejected_total", {"reason": "task_error"}) or 0.0


def test_client_reports_a_task_it_cannot_execute_and_the_round_fails_at_once(live, caplog):
    engine, metrics, shard, thread, outcome = live
    bad = MisspeltTrainTask(model="cvae", epochs=1, batch_size=16, optimizer="adam", lr=1e-3, sgd_momentum=0.0,
                            binarize=True)
    caplog.set_level(logging.WARNING, logger="genfl_server")
    started = time.monotonic()
    with pytest.raises(RoundFailed) as failed:
        engine.run_rounds("cvae", initial_state("cvae", 0), rounds=1, train_task=bad,
                          eval_task=EvaluateTask(model="cvae", binarize=True))
    seconds = time.monotonic() - started
    # Not the 120 s deadline, and no retry: the same settings would fail again.
    assert seconds < 60, f"the round waited {seconds:.0f} s for a client that had reported an error"
    message = str(failed.value)
    assert "cvae round 1: training got 0 results, 1 required" in message
    assert "client alice could not execute its task" in message and "'learning_rate'" in message
    assert _task_errors(metrics) == 1.0
    assert metrics.registry.get_sample_value("genfl_client_updates_accepted_total",
                                             {"phase": "cvae", "type": "TASK_TYPE_TRAIN"}) is None
    # The server logs the error just after recording it, so the engine may have woken first.
    logged = wait_until(lambda: [r.getMessage() for r in caplog.records if "could not execute task" in r.getMessage()],
                        5.0, "the server's log line of the task error")
    assert len(logged) == 1 and re.match(r"client alice could not execute task [0-9a-f]{32} \(", logged[0]), logged
    assert "cvae round 1" in logged[0] and "unknown setting" in logged[0] and "'learning_rate'" in logged[0]

    # The client kept polling: the next task, a good one, is served as usual.
    report = engine.evaluate("cvae", 1, initial_state("cvae", 0), EvaluateTask(model="cvae", binarize=True))
    assert report.per_client["alice"]["samples"] == shard.num_heldout and report.weighted_loss > 0

    # Weights that do not fit the model are reported the same way.
    with pytest.raises(RoundFailed, match="weights do not fit a cvae model"):
        engine.evaluate("cvae", 2, initial_state("classifier", 0), EvaluateTask(model="cvae", binarize=True))
    assert _task_errors(metrics) == 2.0
    assert thread.is_alive() and "error" not in outcome  # still serving, nothing raised


# -- the error result on the wire (hand-made client) --------------------------------------------------

SESSION: dict[str, str] = {}  # alice's session secret in the current `bare` server


@pytest.fixture
def bare(tmp_path):
    coordinator = Coordinator("run-wire", expected_clients=1, dataset="mnist", poll_timeout=5.0)
    metrics = ServerMetrics()
    with loopback_server(coordinator, metrics) as (channel, _port):
        stub = pb_grpc.FederatedLearningStub(channel)
        reply = stub.Register(pb.RegisterRequest(client_id="alice", num_train_samples=40, num_heldout_samples=10,
                                                 dataset="mnist"), timeout=20)
        coordinator.wait_for_clients(timeout=5)
        SESSION["alice"] = reply.session_secret
        yield coordinator, metrics, stub


def _train_batch(coordinator):
    template = {"w": torch.zeros(3)}
    settings = TrainTask(**dict(TRAIN, model="cvae", optimizer="adam", sgd_momentum=0.0))
    task = coordinator.new_task("alice", pb.TASK_TYPE_TRAIN, "cvae", 1, settings, encode_state_dict(template))
    return task, coordinator.dispatch([task], template=template)


def _error_header(task, error: str) -> pb.ResultHeader:
    return pb.ResultHeader(run_id="run-wire", task_id=task.task_id, client_id="alice", phase=task.phase,
                           round=task.round, type=task.type, error=error, session_secret=SESSION["alice"])


def test_error_result_is_recorded_once_shortened_and_ends_the_wait(bare, caplog):
    coordinator, metrics, stub = bare
    task, batch = _train_batch(coordinator)
    caplog.set_level(logging.WARNING, logger="genfl_server")
    hostile = "bad settings\nFAKE LOG LINE " + "x" * 5000
    reply = stub.SubmitResult(iter([pb.ResultMessage(header=_error_header(task, hostile))]), timeout=20)
    assert not reply.accepted and task.task_id in reply.message
    assert batch.wait(timeout=0)  # answered: nobody waits for this client until the deadline
    recorded = batch.failures[task.task_id]
    # One printable line, cut like every client-controlled text (logsafe.shown), saying how much was cut.
    assert recorded.startswith("bad settings\\nFAKE LOG LINE x") and "\n" not in recorded
    assert len(recorded) <= MAX_SHOWN_CHARS + len("…(+5000 chars)") and recorded.endswith(" chars)")
    assert batch.results == {} and _task_errors(metrics) == 1.0
    assert all("\n" not in r.getMessage() for r in caplog.records)
    # The task is answered: it is not handed out again, and a second answer is a duplicate.
    assert coordinator.next_task("alice", timeout=0) is None
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitResult(iter([pb.ResultMessage(header=_error_header(task, "again"))]), timeout=20)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and _task_errors(metrics) == 1.0


def test_error_result_with_weights_or_samples_is_malformed(bare):
    coordinator, metrics, stub = bare
    task, batch = _train_batch(coordinator)
    with_weights = _error_header(task, "cannot")
    with_weights.manifest.CopyFrom(encode_state_dict({"w": torch.zeros(3)}).manifest)
    with_samples = _error_header(task, "cannot")
    with_samples.num_samples = 40
    for header in (with_weights, with_samples):
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitResult(iter([pb.ResultMessage(header=header)]), timeout=20)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no weights" in caught.value.details()
    assert batch.failures == {} and _task_errors(metrics) == 0.0
    assert metrics.registry.get_sample_value("genfl_client_updates_rejected_total", {"reason": "malformed"}) == 2


# -- synthetic images of missing classes (--client-synthetic-mix) -----------------------------------

def test_synthetic_images_round_trip_and_every_bad_buffer_is_refused_by_name():
    from genfl_shared.tasks import MAX_SYNTHETIC_IMAGES, MAX_SYNTHETIC_MIX, encode_synthetic

    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    pixels, labels = encode_synthetic(images, np.array([0, 7, 9]))
    task = from_json(wire(synthetic_mix=0.5, synthetic_images=pixels, synthetic_labels=labels), "train")
    got_images, got_labels = task.synthetic_set()
    assert np.array_equal(got_images, images) and got_labels.tolist() == [0, 7, 9]
    assert from_json(task.to_json(), "train") == task

    def refused_with(**changes):
        return refused(wire(**{"synthetic_mix": 0.5, "synthetic_images": pixels, "synthetic_labels": labels,
                               **changes})).key

    assert refused_with(synthetic_images="not base64!") == "synthetic_images"
    assert refused_with(synthetic_labels=encode_synthetic(images, np.array([0, 7]))[1]) == "synthetic_images"
    assert refused_with(synthetic_labels=encode_synthetic(images, np.array([0, 7, 10]))[1]) == "synthetic_labels"
    assert refused_with(synthetic_mix=0.0) == "synthetic_mix"  # images with nothing to mix them at
    for mix in (-0.1, MAX_SYNTHETIC_MIX + 0.1, 1e300):  # a mix that would make a client draw ~forever
        assert refused_with(synthetic_mix=mix) == "synthetic_mix"
    assert refused(wire(synthetic_mix=float("nan"))).key == "synthetic_mix"
    too_many = np.zeros((MAX_SYNTHETIC_IMAGES + 1, 28, 28), dtype=np.uint8)
    assert refused_with(**dict(zip(("synthetic_images", "synthetic_labels"),
                                   encode_synthetic(too_many, np.zeros(MAX_SYNTHETIC_IMAGES + 1))))) in (
        "synthetic_images", "synthetic_labels")
    cvae = json.dumps(dict(TRAIN, model="cvae", optimizer="adam", prox_mu=0.0, sgd_momentum=0.0, synthetic_mix=0.5, synthetic_images=pixels, synthetic_labels=labels))
    assert refused(cvae).key == "synthetic_images"  # synthetic images are for the classifier only
