"""The typed task contract (genfl_shared.tasks) and what happens to a task a client cannot execute.

The proto types the wire; the ranges are checked over it: every out-of-range, missing, unknown or
misplaced setting is refused with a TaskSettingsError naming the field.
End to end over real gRPC on loopback: a real round engine whose training task carries a field the
client does not know, and a real client (ClientRunner + TaskExecutor in a thread): the client
reports the error, the server logs it, counts it in genfl_client_updates_rejected_total{reason=
"task_error"} and fails the round at once with the client's message; the client keeps serving the
next (good) task.
"""

from __future__ import annotations

import dataclasses
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
from genfl_client.runner import ClientRunner, receive_synthetic
from genfl_server.coordinator import Coordinator
from genfl_server.engine import RoundEngine, RoundFailed
from genfl_server.metrics import ServerMetrics
from genfl_server.phases import eval_task, train_task
from genfl_server.results import RunRecorder
from genfl_server.logsafe import MAX_SHOWN_CHARS
from genfl_shared.codec import CodecError, decode_payload, encode_state_dict
from genfl_shared.config import PRESETS
from genfl_shared.models import initial_state
from genfl_shared.partition import Shard
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import (EvaluateTask, TaskSettingsError, TrainTask, encode_synthetic, from_header,
                                set_settings)
from helpers import loopback_server, wait_until

TRAIN = dict(model="classifier", epochs=2, batch_size=16, optimizer="sgd", lr=0.01, sgd_momentum=0.5,
             binarize=False, prox_mu=0.1, deterministic=True, evaluate_first=False, evaluate_seed=0, seed=12345)
EVALUATE = dict(model="cvae", binarize=True, seed=7)
# A field number neither task message uses: what a newer sender's extra setting looks like here.
UNKNOWN_FIELD = 99


def wire(**changes) -> pb.TrainTask:
    """TRAIN's wire message with fields changed (a value of ... leaves the field out)."""
    message = pb.TrainTask(**{key: value for key, value in TRAIN.items() if key not in changes})
    for key, value in changes.items():
        if value is not ...:
            setattr(message, key, value)
    return message


def with_unknown_field(message):
    """``message`` as a newer sender writes it: with a varint field this client does not know."""
    key = UNKNOWN_FIELD << 3  # wire type 0: varint
    tag = bytes([key & 0x7F | 0x80, key >> 7])  # the key as a two-byte varint (128 <= key < 16384)
    return type(message).FromString(message.SerializeToString() + tag + b"\x01")


def header_of(message, task_type: int | None = None) -> pb.TaskHeader:
    kind = "train" if isinstance(message, pb.TrainTask) else "evaluate"
    default_type = pb.TASK_TYPE_TRAIN if kind == "train" else pb.TASK_TYPE_EVALUATE
    header = pb.TaskHeader(task_id="t-1", type=default_type if task_type is None else task_type)
    getattr(header, kind).CopyFrom(message)
    return pb.TaskHeader.FromString(header.SerializeToString())  # as the client receives it


def refused(message) -> TaskSettingsError:
    with pytest.raises(TaskSettingsError) as caught:
        from_header(header_of(message))
    return caught.value


def refused_when_built(**changes) -> TaskSettingsError:
    with pytest.raises(TaskSettingsError) as caught:
        TrainTask(**{**TRAIN, **changes})
    return caught.value


# -- the contract -----------------------------------------------------------------------------------

@pytest.mark.unit
def test_round_trip_keeps_every_value_exactly():
    train = TrainTask(**TRAIN)
    evaluate = EvaluateTask(**EVALUATE)
    assert from_header(header_of(train.to_proto())) == train
    assert from_header(header_of(evaluate.to_proto())) == evaluate
    header = pb.TaskHeader(type=pb.TASK_TYPE_TRAIN)
    assert set_settings(header, train) is None and from_header(header) == train  # no synthetic payload
    # The wire carries the fields by their names; off switches at their defaults are left out.
    assert {field.name: value for field, value in train.to_proto().ListFields()} == {
        key: value for key, value in TRAIN.items() if key not in ("evaluate_first", "evaluate_seed")}
    awkward = dataclasses.replace(train, lr=0.1 + 0.2, seed=2**63 - 1)  # a float with no short decimal
    assert from_header(header_of(awkward.to_proto())).lr == 0.1 + 0.2


@pytest.mark.unit
def test_an_int_is_a_float_but_a_bool_is_not_an_int():
    task = TrainTask(**dict(TRAIN, lr=1, prox_mu=0))
    assert task.lr == 1.0 and isinstance(task.lr, float) and isinstance(task.prox_mu, float)
    for key in ("epochs", "batch_size", "seed"):
        assert refused_when_built(**{key: True}).key == key
    assert refused_when_built(lr=True).key == "lr"
    assert refused_when_built(epochs=2.0).key == "epochs"  # an int field takes no float, however round
    assert refused_when_built(binarize=1).key == "binarize"
    assert refused_when_built(model=1).key == "model"
    assert refused_when_built(evaluate_first=1).key == "evaluate_first"
    # On the wire the proto's types hold: such values cannot even be written.
    for key, value in (("epochs", True), ("epochs", 2.0), ("lr", "0.1"), ("model", 1)):
        with pytest.raises(TypeError):
            wire(**{key: value})


@pytest.mark.unit
def test_unknown_fields_are_refused_by_number():
    error = refused(with_unknown_field(wire()))
    assert error.key == f"#{UNKNOWN_FIELD}" and "unknown setting" in str(error) and "lr" in str(error)
    error = refused(with_unknown_field(EvaluateTask(**EVALUATE).to_proto()))
    assert error.key == f"#{UNKNOWN_FIELD}" and "evaluate task" in str(error)


@pytest.mark.unit
def test_missing_required_fields_are_refused_and_only_off_switches_are_optional():
    for key in ("model", "epochs", "batch_size", "optimizer", "lr", "sgd_momentum", "binarize", "seed"):
        error = refused(wire(**{key: ...}))
        assert error.key == key and "missing" in str(error)
    for key in ("model", "binarize", "seed"):
        message = pb.EvaluateTask(**EVALUATE)
        message.ClearField(key)
        assert refused(message).key == key
    lenient = from_header(header_of(wire(prox_mu=..., deterministic=..., evaluate_first=..., evaluate_seed=...)))
    assert (lenient.prox_mu, lenient.deterministic, lenient.evaluate_first, lenient.evaluate_seed) == (
        0.0, False, False, 0)


@pytest.mark.unit
@pytest.mark.parametrize("key, value", [
    ("epochs", -1), ("batch_size", 0), ("lr", 0), ("lr", -0.1), ("model", "resnet"), ("optimizer", "rmsprop"),
    ("sgd_momentum", -0.1), ("sgd_momentum", 1.0), ("prox_mu", -0.01), ("seed", -1), ("seed", 2**63),
    ("lr", 10**400), ("evaluate_seed", -1), ("evaluate_seed", 2**63),
])
def test_out_of_range_values_are_refused(key, value):
    assert refused_when_built(**{key: value}).key == key
    try:
        message = wire(**{key: value})
    except (ValueError, OverflowError):
        return  # beyond the wire type (int64, double): no sender can write it
    error = refused(message)
    assert error.key == key, error


@pytest.mark.unit
def test_values_that_do_not_fit_together_are_refused():
    # train_cvae always uses Adam: a CVAE task asking for SGD would be quietly ignored otherwise.
    assert refused(wire(model="cvae")).key == "optimizer"
    assert refused(wire(optimizer="adam")).key == "sgd_momentum"  # momentum means nothing to Adam
    assert from_header(header_of(wire(model="cvae", optimizer="adam", sgd_momentum=0))).model == "cvae"
    # A seed for an evaluation nobody asked for is a sender's mistake, not something to ignore.
    assert refused(wire(evaluate_seed=5)).key == "evaluate_seed"


@pytest.mark.unit
def test_local_loss_is_a_checked_classifier_setting_left_off_the_wire_when_plain():
    balanced = from_header(header_of(wire(local_loss="balanced")))
    assert balanced.local_loss == "balanced"
    assert balanced.to_proto().local_loss == "balanced"
    assert from_header(header_of(wire())).local_loss == "ce"  # left out: the default
    assert TrainTask(**TRAIN, local_loss="ce").to_proto().local_loss == ""  # left out
    assert refused(wire(local_loss="focal")).key == "local_loss"
    assert refused_when_built(local_loss=1).key == "local_loss"
    # The CVAE has no classes to balance: asking for it is a sender's mistake.
    assert refused(wire(model="cvae", optimizer="adam", sgd_momentum=0, local_loss="balanced")).key == "local_loss"
    assert train_task(PRESETS["quick"], "classifier").local_loss == "ce"
    balanced_config = PRESETS["quick"].override(local_loss="balanced")
    assert train_task(balanced_config, "classifier").local_loss == "balanced"
    assert train_task(balanced_config, "cvae").local_loss == "ce"


@pytest.mark.unit
def test_evaluate_first_names_the_evaluation_it_stands_for():
    train = from_header(header_of(wire(evaluate_first=True, evaluate_seed=77)))
    assert train.first_evaluation() == EvaluateTask(model="classifier", binarize=False, seed=77)
    assert TrainTask(**TRAIN).first_evaluation() is None


@pytest.mark.unit
@pytest.mark.parametrize("header", [
    pb.TaskHeader(type=pb.TASK_TYPE_TRAIN),  # no settings at all
    pb.TaskHeader(type=pb.TASK_TYPE_TRAIN, evaluate=pb.EvaluateTask(**EVALUATE)),
    pb.TaskHeader(type=pb.TASK_TYPE_EVALUATE, train=pb.TrainTask(**TRAIN)),
    pb.TaskHeader(type=pb.TASK_TYPE_TRAIN, shutdown=pb.Shutdown(outcome=pb.RUN_OUTCOME_COMPLETED)),
])
def test_settings_of_another_kind_than_the_task_are_refused(header):
    with pytest.raises(TaskSettingsError, match="must carry") as caught:
        from_header(header)
    assert str(caught.value)


@pytest.mark.unit
def test_non_finite_floats_are_refused_by_name():
    assert refused(wire(lr=float("inf"))).key == "lr"
    assert refused(wire(prox_mu=float("nan"))).key == "prox_mu"


@pytest.mark.unit
def test_a_task_type_without_settings_is_refused():
    with pytest.raises(TaskSettingsError, match="carries no train or evaluate settings"):
        from_header(header_of(TrainTask(**TRAIN).to_proto(), pb.TASK_TYPE_SHUTDOWN))


@pytest.mark.unit
def test_construction_checks_too_and_an_unseeded_task_does_not_go_out():
    with pytest.raises(TaskSettingsError) as caught:
        TrainTask(**dict(TRAIN, batch_size=0))
    assert caught.value.key == "batch_size"
    template = TrainTask(**dict(TRAIN, seed=None))  # what a phase builds; the engine seeds it per client
    with pytest.raises(TaskSettingsError, match="round engine") as caught:
        template.to_proto()
    assert caught.value.key == "seed"


@pytest.mark.unit
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
class NewerTrainTask(TrainTask):
    """A training task whose wire form carries a setting this client does not know (a newer sender)."""

    def to_proto(self) -> pb.TrainTask:
        return with_unknown_field(super().to_proto())


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


@pytest.mark.integration
def test_client_reports_a_task_it_cannot_execute_and_the_round_fails_at_once(live, caplog):
    engine, metrics, shard, thread, outcome = live
    bad = NewerTrainTask(model="cvae", epochs=1, batch_size=16, optimizer="adam", lr=1e-3, sgd_momentum=0.0,
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
    assert "client alice could not execute its task" in message and f"'#{UNKNOWN_FIELD}'" in message
    assert _task_errors(metrics) == 1.0
    assert metrics.registry.get_sample_value("genfl_client_updates_accepted_total",
                                             {"phase": "cvae", "type": "TASK_TYPE_TRAIN"}) is None
    # The server logs the error just after recording it, so the engine may have woken first.
    logged = wait_until(lambda: [r.getMessage() for r in caplog.records if "could not execute task" in r.getMessage()],
                        5.0, "the server's log line of the task error")
    assert len(logged) == 1 and re.match(r"client alice could not execute task [0-9a-f]{32} \(", logged[0]), logged
    assert "cvae round 1" in logged[0] and "unknown setting" in logged[0] and f"'#{UNKNOWN_FIELD}'" in logged[0]

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


@pytest.mark.integration
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


@pytest.mark.integration
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

def sent_with_synthetic(tensors: dict[str, torch.Tensor], **changes) -> tuple[pb.TaskHeader, dict]:
    """A TRAIN header whose synthetic payload holds ``tensors`` (as any sender may encode them), and
    those tensors as the client receives them."""
    payload = encode_state_dict(tensors)
    message = wire(**{"synthetic_mix": 0.5, **changes})
    message.synthetic.CopyFrom(payload.manifest)
    header = header_of(message)
    return header, decode_payload(header.train.synthetic, payload.chunks, max_bytes=1 << 30)


def synthetic_tensors(count: int, labels=None) -> dict[str, torch.Tensor]:
    return {"images": torch.zeros(count, 28, 28, dtype=torch.uint8),
            "labels": torch.tensor(labels if labels is not None else [0] * count, dtype=torch.uint8)}


@pytest.mark.unit
def test_synthetic_images_travel_as_a_payload_after_the_weights():
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    pixels, labels = encode_synthetic(images, np.array([0, 7, 9]))
    task = TrainTask(**TRAIN, synthetic_mix=0.5, synthetic_images=pixels, synthetic_labels=labels)
    header = pb.TaskHeader(type=pb.TASK_TYPE_TRAIN)
    payload = set_settings(header, task)
    header = pb.TaskHeader.FromString(header.SerializeToString())
    assert [spec.name for spec in header.train.synthetic.tensors] == ["images", "labels"]
    assert header.train.synthetic == payload.manifest and header.train.synthetic_mix == 0.5
    # What the client reads after the weights' chunks: exactly this payload's chunks.
    stream = iter([pb.TaskMessage(chunk=pb.Chunk(index=i, data=d)) for i, d in enumerate(payload.chunks)])
    received = receive_synthetic(header, stream)
    got = from_header(header, received)
    assert got == task
    got_images, got_labels = got.synthetic_set()
    assert np.array_equal(got_images, images) and got_labels.tolist() == [0, 7, 9]
    # No synthetic images: no payload, no manifest, and nothing may follow the weights.
    plain = pb.TaskHeader(type=pb.TASK_TYPE_TRAIN)
    assert set_settings(plain, TrainTask(**TRAIN)) is None and not plain.train.HasField("synthetic")
    assert receive_synthetic(plain, iter([])) is None
    with pytest.raises(CodecError, match="more chunks"):
        receive_synthetic(plain, iter([pb.TaskMessage(chunk=pb.Chunk(index=0, data=b"x"))]))
    with pytest.raises(CodecError):  # one chunk short
        receive_synthetic(header, iter([]))


@pytest.mark.unit
def test_every_bad_synthetic_set_is_refused_by_name_when_built():
    from genfl_shared.tasks import MAX_SYNTHETIC_IMAGES, MAX_SYNTHETIC_MIX

    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    pixels, labels = encode_synthetic(images, np.array([0, 7, 9]))

    def refused_with(**changes):
        return refused_when_built(**{"synthetic_mix": 0.5, "synthetic_images": pixels, "synthetic_labels": labels,
                                     **changes}).key

    assert refused_with(synthetic_images=pixels[:-5]) == "synthetic_images"  # not whole images
    assert refused_with(synthetic_labels=encode_synthetic(images, np.array([0, 7]))[1]) == "synthetic_images"
    assert refused_with(synthetic_labels=encode_synthetic(images, np.array([0, 7, 10]))[1]) == "synthetic_labels"
    assert refused_with(synthetic_mix=0.0) == "synthetic_mix"  # images with nothing to mix them at
    for mix in (-0.1, MAX_SYNTHETIC_MIX + 0.1, 1e300, float("nan")):  # a mix that would make a client draw ~forever
        assert refused_with(synthetic_mix=mix) == "synthetic_mix"
    too_many = np.zeros((MAX_SYNTHETIC_IMAGES + 1, 28, 28), dtype=np.uint8)
    assert refused_with(**dict(zip(("synthetic_images", "synthetic_labels"),
                                   encode_synthetic(too_many, np.zeros(MAX_SYNTHETIC_IMAGES + 1))))) in (
        "synthetic_images", "synthetic_labels")
    # Synthetic images are for the classifier only.
    assert refused_with(model="cvae", optimizer="adam", prox_mu=0.0, sgd_momentum=0.0) == "synthetic_images"


@pytest.mark.unit
def test_every_bad_synthetic_payload_is_refused_by_name_when_received():
    from genfl_shared.tasks import MAX_SYNTHETIC_IMAGES, MAX_SYNTHETIC_MIX

    def refused_on_receipt(tensors, **changes) -> str:
        header, received = sent_with_synthetic(tensors, **changes)
        with pytest.raises(TaskSettingsError) as caught:
            from_header(header, received)
        return caught.value.key

    assert from_header(*sent_with_synthetic(synthetic_tensors(3, [0, 7, 9]))).synthetic_set()[1].tolist() == [0, 7, 9]
    assert refused_on_receipt(synthetic_tensors(3, [0, 7, 10])) == "synthetic_labels"
    assert refused_on_receipt({"images": torch.zeros(2, 28, 28, dtype=torch.uint8),
                               "labels": torch.zeros(3, dtype=torch.uint8)}) == "synthetic_images"
    assert refused_on_receipt({"images": torch.zeros(3, 28, 27, dtype=torch.uint8),
                               "labels": torch.zeros(3, dtype=torch.uint8)}) == "synthetic_images"
    assert refused_on_receipt({"images": torch.zeros(3, 28, 28),
                               "labels": torch.zeros(3, dtype=torch.uint8)}) == "synthetic_images"  # not uint8
    assert refused_on_receipt({**synthetic_tensors(3), "extra": torch.zeros(1)}) == "synthetic_images"
    assert refused_on_receipt({"labels": torch.zeros(3, dtype=torch.uint8),
                               "images": torch.zeros(3, 28, 28, dtype=torch.uint8)}) == "synthetic_images"
    assert refused_on_receipt(synthetic_tensors(0)) == "synthetic_images"  # announced, but no image
    assert refused_on_receipt(synthetic_tensors(3), synthetic_mix=0.0) == "synthetic_mix"
    for mix in (-0.1, MAX_SYNTHETIC_MIX + 0.1, 1e300, float("nan")):
        assert refused_on_receipt(synthetic_tensors(3), synthetic_mix=mix) == "synthetic_mix"
    assert refused_on_receipt(synthetic_tensors(3), model="cvae", optimizer="adam", prox_mu=0.0,
                              sgd_momentum=0.0) == "synthetic_images"
    # Too many images: refused from the manifest, before a byte of them is received.
    too_many, _ = sent_with_synthetic(synthetic_tensors(MAX_SYNTHETIC_IMAGES + 1))
    assert receive_synthetic(too_many, iter([pb.TaskMessage(chunk=pb.Chunk(index=0, data=b"x"))])) is None
    with pytest.raises(TaskSettingsError, match=f"no more than {MAX_SYNTHETIC_IMAGES}") as caught:
        from_header(too_many)
    assert caught.value.key == "synthetic_images"
    # Announced but not received.
    header, _ = sent_with_synthetic(synthetic_tensors(3))
    with pytest.raises(TaskSettingsError, match="not received"):
        from_header(header)
