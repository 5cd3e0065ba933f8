"""The wire protocol against a real gRPC server on loopback, with hand-made clients.

Every refusal is checked for its exact gRPC status code and its
``genfl_client_updates_rejected_total{reason=...}`` increment, and the round's aggregate must come
out exactly as if only the good updates had ever been sent.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from genfl_server.coordinator import Coordinator, TaskResult, TaskState
from genfl_server.metrics import ServerMetrics
from genfl_server.service import (SERVICE_NAME, FederatedLearningService, UnservedMethodError,
                                  check_serves_every_method, method_handlers)
from genfl_server.status_codes import status_code
from genfl_server.strategy import FedAvg
from genfl_shared.codec import CHUNK_SIZE, PayloadAssembler, encode_state_dict
from genfl_shared.errors import Rejected
from genfl_shared.models import build_model
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask, TrainTask
from helpers import loopback_server, wait_until

RUN_ID = "run-test"
DATASET = "mnist"
POLL_TIMEOUT = 10.0  # long, so that anything arriving quickly was pushed, not a poll expiring
PROMPT = 2.0  # "at once": generous for a loaded CI machine, yet far below POLL_TIMEOUT
RPC_TIMEOUT = 20.0
SAMPLES = {"alice": (100, 20), "bob": (50, 10)}  # client -> (train, held-out)


@dataclass
class Server:
    coordinator: Coordinator
    metrics: ServerMetrics
    stub: pb_grpc.FederatedLearningStub
    port: int

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("genfl_client_updates_rejected_total", {"reason": reason})
        return value or 0.0

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# client id -> its current session secret, as the last registration in this test returned it
# (what a real client keeps); hand-made requests carry it unless a test says otherwise.
SESSIONS: dict[str, str] = {}


@pytest.fixture
def server():
    SESSIONS.clear()
    coordinator = Coordinator(RUN_ID, expected_clients=2, dataset=DATASET, poll_timeout=POLL_TIMEOUT)
    metrics = ServerMetrics()
    with loopback_server(coordinator, metrics) as (channel, port):
        yield Server(coordinator, metrics, pb_grpc.FederatedLearningStub(channel), port)


# -- hand-made client helpers ---------------------------------------------------------------------

def register(stub, client_id: str, *, dataset: str = DATASET, samples=None) -> pb.RegisterReply:
    train, heldout = samples or SAMPLES.get(client_id, (10, 5))
    reply = stub.Register(pb.RegisterRequest(client_id=client_id, num_train_samples=train,
                                             num_heldout_samples=heldout, dataset=dataset,
                                             client_version="test"), timeout=RPC_TIMEOUT)
    SESSIONS[client_id] = reply.session_secret
    return reply


def fetch(stub, client_id: str, run_id: str = RUN_ID):
    """One FetchTask: (header, decoded weights or None, seconds until the header arrived)."""
    started = time.monotonic()
    stream = stub.FetchTask(pb.FetchTaskRequest(run_id=run_id, client_id=client_id,
                                                session_secret=SESSIONS.get(client_id, "")), timeout=RPC_TIMEOUT)
    first = next(stream)
    header_seconds = time.monotonic() - started
    assert first.WhichOneof("kind") == "header"
    header = first.header
    rest = list(stream)
    if not header.HasField("manifest"):
        assert rest == []
        return header, None, header_seconds
    assembler = PayloadAssembler(header.manifest, max_bytes=1 << 30)
    for message in rest:
        assert message.WhichOneof("kind") == "chunk"
        assembler.add(message.chunk)
    return header, assembler.finish(), header_seconds


def result_header(task: pb.TaskHeader, client_id: str, num_samples: int, **overrides) -> pb.ResultHeader:
    fields = dict(run_id=task.run_id, task_id=task.task_id, client_id=client_id, phase=task.phase,
                  round=task.round, type=task.type, num_samples=num_samples, metrics={"loss": 0.5},
                  session_secret=SESSIONS.get(client_id, ""))
    fields.update(overrides)
    return pb.ResultHeader(**fields)


def submit(stub, header: pb.ResultHeader, state=None, *, chunks=None, order=None) -> pb.SubmitReply:
    """SubmitResult with ``state`` encoded as the update; ``chunks`` replaces the encoded chunks and
    ``order`` sends them (with their true indices) in another order."""
    if state is not None:
        payload = encode_state_dict(state)
        header.manifest.CopyFrom(payload.manifest)
        chunks = payload.chunks if chunks is None else chunks
    indexed = list(enumerate(chunks or ()))
    if order is not None:
        indexed = [indexed[i] for i in order]
    messages = [pb.ResultMessage(header=header)]
    messages += [pb.ResultMessage(chunk=pb.Chunk(index=i, data=d)) for i, d in indexed]
    return stub.SubmitResult(iter(messages), timeout=RPC_TIMEOUT)


def expect_rejection(srv: Server, code: grpc.StatusCode, reason: str, call, *args, **kwargs) -> grpc.RpcError:
    before = srv.rejected(reason)
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, f"{reason}: {info.value.code()} {info.value.details()}"
    assert srv.rejected(reason) == before + 1, f"metric for {reason} did not move"
    return info.value


def perturbed(state, seed: int, scale: float = 0.01):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


class Poller(threading.Thread):
    """A FetchTask running in the background, started before the server has anything to send."""

    def __init__(self, stub, client_id: str):
        super().__init__(daemon=True)
        self.stub, self.client_id = stub, client_id
        self.outcome = None
        self.error = None
        self.header_at = None

    def run(self):
        try:
            stream = self.stub.FetchTask(pb.FetchTaskRequest(run_id=RUN_ID, client_id=self.client_id,
                                                             session_secret=SESSIONS[self.client_id]),
                                         timeout=RPC_TIMEOUT)
            first = next(stream)
            self.header_at = time.monotonic()
            self.outcome = (first, list(stream))
        except Exception as error:  # reported by the test thread
            self.error = error


def start_poller(srv: Server, client_id: str) -> Poller:
    poller = Poller(srv.stub, client_id)
    poller.start()
    # The poll is open on the server (counted as connected) and then waiting on the condition.
    wait_until(lambda: srv.sample("genfl_clients_connected") >= 1, 5.0, "the poll to arrive", interval=0.01)
    time.sleep(0.2)
    assert poller.outcome is None, "the poll must be waiting before anything is dispatched"
    return poller


# -- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model("cvae").state_dict().items()}  # 4.3 MB: 5 chunks


@pytest.mark.integration
def test_round_trip_and_every_rejection(server: Server, template):
    srv, stub, coordinator = server, server.stub, server.coordinator

    # -- registration ---------------------------------------------------------------------------
    reply = register(stub, "alice")
    assert reply.run_id == RUN_ID and reply.poll_timeout_seconds == POLL_TIMEOUT
    assert register(stub, "alice").run_id == RUN_ID  # idempotent re-registration
    register(stub, "bob")
    assert srv.sample("genfl_clients_registered") == 2
    expect_rejection(srv, grpc.StatusCode.RESOURCE_EXHAUSTED, "run_full", register, stub, "carol")
    expect_rejection(srv, grpc.StatusCode.FAILED_PRECONDITION, "wrong_dataset", register, stub, "carol",
                     dataset="fmnist")
    expect_rejection(srv, grpc.StatusCode.FAILED_PRECONDITION, "wrong_dataset", register, stub, "alice",
                     dataset="fmnist")
    expect_rejection(srv, grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count", register, stub, "alice",
                     samples=(0, 5))
    assert sorted(coordinator.clients) == ["alice", "bob"]
    assert [c.client_id for c in coordinator.wait_for_clients(timeout=5)] == ["alice", "bob"]
    expect_rejection(srv, grpc.StatusCode.FAILED_PRECONDITION, "sample_count_changed", register, stub,
                     "alice", samples=(101, 20))
    # Polls from strangers are refused too.
    expect_rejection(srv, grpc.StatusCode.NOT_FOUND, "unknown_client", fetch, stub, "mallory")
    expect_rejection(srv, grpc.StatusCode.FAILED_PRECONDITION, "wrong_run", fetch, stub, "alice",
                     run_id="run-other")

    # -- a TRAIN task reaches a waiting poll at once ----------------------------------------------
    strategy = FedAvg()
    strategy.begin(template)
    folded: list[tuple[str, int]] = []

    def on_update(task, num_samples, update):
        folded.append((task.client_id, num_samples))
        strategy.accumulate(update, num_samples)

    payload = encode_state_dict(template)
    assert payload.manifest.num_chunks >= 5
    config = TrainTask(model="cvae", epochs=1, batch_size=32, optimizer="adam", lr=0.001, sgd_momentum=0.0,
                       binarize=True, seed=7)
    tasks = [coordinator.new_task(cid, pb.TASK_TYPE_TRAIN, "cvae", 1, config, payload) for cid in ("alice", "bob")]
    poller = start_poller(srv, "alice")
    dispatched_at = time.monotonic()
    batch = coordinator.dispatch(tasks, template=template, on_update=on_update)
    poller.join(RPC_TIMEOUT)
    assert poller.error is None, poller.error
    latency = poller.header_at - dispatched_at
    assert latency < PROMPT < POLL_TIMEOUT, f"the task took {latency:.2f} s to reach a waiting poll"

    first, rest = poller.outcome
    header_a = first.header
    assert header_a.type == pb.TASK_TYPE_TRAIN and header_a.run_id == RUN_ID
    assert (header_a.phase, header_a.round, header_a.task_id) == ("cvae", 1, tasks[0].task_id)
    assert header_a.WhichOneof("settings") == "train" and TrainTask.from_proto(header_a.train) == config
    assert len(rest) == header_a.manifest.num_chunks == payload.manifest.num_chunks
    assert [m.chunk.index for m in rest] == list(range(len(rest)))
    assert all(len(m.chunk.data) <= CHUNK_SIZE for m in rest)
    assembler = PayloadAssembler(header_a.manifest, max_bytes=1 << 30)
    for message in rest:
        assembler.add(message.chunk)
    weights = assembler.finish()
    assert list(weights) == list(template)
    assert all(torch.equal(weights[k], template[k]) for k in template)
    assert srv.sample("genfl_sent_bytes_total") == payload.nbytes

    # The unanswered task is re-delivered on every poll; bob's was waiting for him.
    header_b, weights_b, seconds = fetch(stub, "bob")
    assert header_b.task_id == tasks[1].task_id and seconds < PROMPT
    assert all(torch.equal(weights_b[k], template[k]) for k in template)
    again, _, _ = fetch(stub, "alice")
    assert again.task_id == header_a.task_id

    # -- a correct result is accepted and folded in ------------------------------------------------
    good_a, good_b = perturbed(template, 1), perturbed(template, 2)
    accepted = submit(stub, result_header(header_a, "alice", 100), good_a)
    assert accepted.accepted and header_a.task_id in accepted.message
    assert folded == [("alice", 100)]
    assert srv.sample("genfl_client_updates_accepted_total", {"phase": "cvae", "type": "TASK_TYPE_TRAIN"}) == 1
    assert srv.sample("genfl_received_bytes_total") == payload.nbytes

    # -- every bad submission is refused with its exact status and metric ------------------------
    bad = perturbed(template, 99, scale=5.0)  # would move the aggregate a lot if it got in
    r = grpc.StatusCode
    expect_rejection(srv, r.NOT_FOUND, "unknown_client", submit, stub,
                     result_header(header_b, "mallory", 10), bad)
    expect_rejection(srv, r.FAILED_PRECONDITION, "wrong_run", submit, stub,
                     result_header(header_b, "bob", 50, run_id="run-other"), bad)
    error = expect_rejection(srv, r.FAILED_PRECONDITION, "stale_round", submit, stub,
                             result_header(header_b, "bob", 50, round=2), bad)
    assert "round" in error.details()
    expect_rejection(srv, r.FAILED_PRECONDITION, "stale_round", submit, stub,
                     result_header(header_b, "bob", 50, phase="classifier"), bad)
    expect_rejection(srv, r.ALREADY_EXISTS, "duplicate", submit, stub,
                     result_header(header_a, "alice", 100), bad)
    expect_rejection(srv, r.PERMISSION_DENIED, "wrong_client", submit, stub,
                     result_header(header_b, "alice", 50), bad)
    expect_rejection(srv, r.NOT_FOUND, "unknown_task", submit, stub,
                     result_header(header_b, "bob", 50, task_id="no-such-task"), bad)
    expect_rejection(srv, r.INVALID_ARGUMENT, "wrong_type", submit, stub,
                     result_header(header_b, "bob", 10, type=pb.TASK_TYPE_EVALUATE))
    expect_rejection(srv, r.INVALID_ARGUMENT, "bad_sample_count", submit, stub,
                     result_header(header_b, "bob", 51), bad)  # bob registered 50
    expect_rejection(srv, r.INVALID_ARGUMENT, "bad_sample_count", submit, stub,
                     result_header(header_b, "bob", 0), bad)
    expect_rejection(srv, r.INVALID_ARGUMENT, "malformed", submit, stub,
                     result_header(header_b, "bob", 50))  # a TRAIN result without weights

    corrupt = list(encode_state_dict(bad).chunks)
    flipped = bytearray(corrupt[3])
    flipped[777] ^= 0x40
    corrupt[3] = bytes(flipped)
    expect_rejection(srv, r.DATA_LOSS, "digest_mismatch", submit, stub,
                     result_header(header_b, "bob", 50), bad, chunks=corrupt)
    expect_rejection(srv, r.DATA_LOSS, "truncated", submit, stub,
                     result_header(header_b, "bob", 50), bad, chunks=corrupt[:-1])

    name = "decoder.4.weight"  # [784, 512] -> [512, 784]: same size, wrong shape
    wrong_shape = dict(good_b, **{name: good_b[name].reshape(512, 784)})
    expect_rejection(srv, r.INVALID_ARGUMENT, "bad_shape", submit, stub,
                     result_header(header_b, "bob", 50), wrong_shape)
    for poison in (float("nan"), float("inf")):
        non_finite = dict(good_b, **{name: good_b[name].clone()})
        non_finite[name][100, 7] = poison
        expect_rejection(srv, r.INVALID_ARGUMENT, "non_finite", submit, stub,
                         result_header(header_b, "bob", 50), non_finite)
    missing = {k: v for k, v in good_b.items() if k != name}
    expect_rejection(srv, r.INVALID_ARGUMENT, "missing_tensor", submit, stub,
                     result_header(header_b, "bob", 50), missing)
    expect_rejection(srv, r.INVALID_ARGUMENT, "extra_tensor", submit, stub,
                     result_header(header_b, "bob", 50), dict(good_b, extra=torch.zeros(0)))
    reinterpreted = dict(good_b, **{name: good_b[name].view(torch.int32)})  # same bytes, wrong dtype
    expect_rejection(srv, r.INVALID_ARGUMENT, "bad_dtype", submit, stub,
                     result_header(header_b, "bob", 50), reinterpreted)
    swapped = [0, 2, 1] + list(range(3, len(corrupt)))
    expect_rejection(srv, r.INVALID_ARGUMENT, "chunk_order", submit, stub,
                     result_header(header_b, "bob", 50), bad, order=swapped)
    bigger = dict(good_b, extra=torch.zeros(4))
    expect_rejection(srv, r.RESOURCE_EXHAUSTED, "oversized", submit, stub,
                     result_header(header_b, "bob", 50), bigger)

    # Hostile manifests: a dtype off the allow-list, an empty tensor whose shape overflows int64.
    for reason, spec in (("bad_dtype", pb.TensorSpec(name=name, dtype="complex64", shape=[2])),
                         ("bad_manifest", pb.TensorSpec(name=name, dtype="float32", shape=[1 << 62, 1 << 62, 0]))):
        hostile = result_header(header_b, "bob", 50)
        hostile.manifest.CopyFrom(pb.Manifest(tensors=[spec], total_bytes=0,
                                              sha256=hashlib.sha256(b"").digest(), num_chunks=0))
        expect_rejection(srv, r.INVALID_ARGUMENT, reason, submit, stub, hostile)

    assert folded == [("alice", 100)], "no refused update may reach the strategy"
    assert not batch.wait(0)

    # -- bob's good result completes the batch ------------------------------------------------------
    assert submit(stub, result_header(header_b, "bob", 50, metrics={"loss": 0.25}), good_b).accepted
    assert folded == [("alice", 100), ("bob", 50)]
    assert batch.wait(5)
    assert {r.task.client_id: (r.num_samples, r.metrics) for r in batch.results.values()} == {
        "alice": (100, {"loss": 0.5}), "bob": (50, {"loss": 0.25})}
    aggregate = strategy.finish()

    reference = FedAvg()
    reference.begin(template)
    reference.accumulate(good_a, 100)
    reference.accumulate(good_b, 50)
    expected = reference.finish()
    assert list(aggregate) == list(expected)
    assert all(torch.equal(aggregate[k], expected[k]) for k in expected), "the aggregate saw a bad update"
    for k in ("encoder.1.weight", "decoder.4.bias"):
        torch.testing.assert_close(aggregate[k], (good_a[k] * 100 + good_b[k] * 50) / 150)
    # The accepted result of bob is a duplicate now, however good.
    expect_rejection(srv, r.ALREADY_EXISTS, "duplicate", submit, stub,
                     result_header(header_b, "bob", 50), good_b)

    # -- a result for a closed batch is late --------------------------------------------------------
    late_tasks = [coordinator.new_task(cid, pb.TASK_TYPE_TRAIN, "cvae", 2, config, payload)
                  for cid in ("alice", "bob")]
    late_batch = coordinator.dispatch(late_tasks, template=template, on_update=on_update)
    header_late, _, _ = fetch(stub, "bob")
    assert header_late.round == 2
    coordinator.close(late_batch)
    late_before = srv.sample("genfl_client_updates_late_total")
    error = expect_rejection(srv, r.FAILED_PRECONDITION, "late", submit, stub,
                             result_header(header_late, "bob", 50), good_b)
    assert "closed" in error.details()
    assert srv.sample("genfl_client_updates_late_total") == late_before + 1
    assert folded == [("alice", 100), ("bob", 50)] and late_batch.results == {}

    # -- and the server still serves: an evaluation round goes through --------------------------------
    assert register(stub, "alice").run_id == RUN_ID
    evaluate = EvaluateTask(model="cvae", binarize=True, seed=7)
    eval_tasks = [coordinator.new_task(cid, pb.TASK_TYPE_EVALUATE, "cvae", 2, evaluate, encode_state_dict(aggregate))
                  for cid in ("alice", "bob")]
    eval_batch = coordinator.dispatch(eval_tasks, template=aggregate)
    for cid, (_, heldout) in SAMPLES.items():
        header, weights, _ = fetch(stub, cid)
        assert header.type == pb.TASK_TYPE_EVALUATE
        assert all(torch.equal(weights[k], aggregate[k]) for k in aggregate)
        if cid == "bob":
            expect_rejection(srv, r.INVALID_ARGUMENT, "bad_sample_count", submit, stub,
                             result_header(header, cid, heldout + 1))
        assert submit(stub, result_header(header, cid, heldout, metrics={"loss": 1.0})).accepted
    assert eval_batch.wait(5)
    assert sorted(r.num_samples for r in eval_batch.results.values()) == [10, 20]
    assert srv.sample("genfl_client_updates_accepted_total", {"phase": "cvae", "type": "TASK_TYPE_EVALUATE"}) == 2


@pytest.mark.integration
def test_idle_when_nothing_comes(server: Server):
    register(server.stub, "alice")
    server.coordinator.poll_timeout = 0.3
    header, weights, seconds = fetch(server.stub, "alice")
    assert header.type == pb.TASK_TYPE_IDLE and weights is None
    assert 0.25 <= seconds < 5


@pytest.mark.integration
def test_shutdown_releases_a_waiting_poll(server: Server):
    register(server.stub, "alice")
    register(server.stub, "bob")
    poller = start_poller(server, "alice")
    released_at = time.monotonic()
    server.coordinator.shutdown(reason="all rounds done")
    poller.join(RPC_TIMEOUT)
    assert poller.error is None, poller.error
    assert poller.header_at - released_at < PROMPT < POLL_TIMEOUT
    first, rest = poller.outcome
    assert first.header.type == pb.TASK_TYPE_SHUTDOWN and rest == []
    assert first.header.shutdown == pb.Shutdown(outcome=pb.RUN_OUTCOME_COMPLETED, reason="all rounds done")
    assert not server.coordinator.wait_shutdown_delivered(0.1)  # bob has not heard yet
    header, _, seconds = fetch(server.stub, "bob")  # later polls hear it at once
    assert header.type == pb.TASK_TYPE_SHUTDOWN and seconds < PROMPT
    assert server.coordinator.wait_shutdown_delivered(1.0)


# -- one task life-cycle ----------------------------------------------------------------------------

@pytest.mark.unit
def test_task_life_cycle_decides_duplicate_and_late_in_one_place():
    """pending -> delivered -> done or closed; a result that passed open_task is still refused when
    its task was answered or closed during the upload, with the same status as an immediate one."""
    coordinator = Coordinator(RUN_ID, expected_clients=2, dataset=DATASET, poll_timeout=0.1)
    secrets = {cid: coordinator.register(pb.RegisterRequest(client_id=cid, num_train_samples=train,
                                                            num_heldout_samples=heldout, dataset=DATASET))[1]
               for cid, (train, heldout) in SAMPLES.items()}
    folded = []
    tasks = [coordinator.new_task(cid, pb.TASK_TYPE_TRAIN, "cvae", 1, {}, None) for cid in SAMPLES]
    batch = coordinator.dispatch(tasks, template={}, on_update=lambda task, n, _u: folded.append(task.client_id))
    alice, bob = tasks
    assert coordinator.task_state(alice.task_id) is TaskState.PENDING
    assert coordinator.next_task("alice", 0.1) is alice
    assert coordinator.task_state(alice.task_id) is TaskState.DELIVERED
    assert coordinator.next_task("alice", 0.1) is alice  # re-delivered until answered

    def header(task):
        return pb.ResultHeader(run_id=RUN_ID, task_id=task.task_id, client_id=task.client_id, phase="cvae",
                               session_secret=secrets[task.client_id],
                               round=1, type=pb.TASK_TYPE_TRAIN, num_samples=10)

    def refused(call, *args):
        with pytest.raises(Rejected) as info:
            call(*args)
        return status_code(info.value.reason), info.value.reason

    # Two uploads of alice's result pass open_task; the first accepted makes the second a duplicate.
    first, second = coordinator.open_task(header(alice)), coordinator.open_task(header(alice))
    coordinator.finish(TaskResult(alice, 10, {}), first[1], {"w": torch.zeros(1)})
    assert coordinator.task_state(alice.task_id) is TaskState.DONE
    duplicate = (grpc.StatusCode.ALREADY_EXISTS, "duplicate")
    assert refused(coordinator.finish, TaskResult(alice, 10, {}), second[1], {"w": torch.zeros(1)}) == duplicate
    assert refused(coordinator.open_task, header(alice)) == duplicate
    assert coordinator.next_task("alice", 0.1) is None  # nothing left to do
    # Bob's upload passes open_task, then the deadline closes the batch: late, and never folded.
    _, bob_batch = coordinator.open_task(header(bob))
    assert not batch.wait(0.05)
    coordinator.close(batch)
    assert coordinator.task_state(bob.task_id) is TaskState.CLOSED
    assert coordinator.task_state(alice.task_id) is TaskState.DONE  # an answered task stays answered
    late = (grpc.StatusCode.FAILED_PRECONDITION, "late")
    assert refused(coordinator.finish, TaskResult(bob, 10, {}), bob_batch, {"w": torch.zeros(1)}) == late
    assert refused(coordinator.open_task, header(bob)) == late
    assert folded == ["alice"] and list(batch.results) == [alice.task_id]
    assert coordinator.next_task("bob", 0.1) is None
    unknown = header(bob)
    unknown.task_id = "never-handed-out"
    assert refused(coordinator.open_task, unknown) == (grpc.StatusCode.NOT_FOUND, "unknown_task")


# -- every RPC of the proto is served ---------------------------------------------------------------

def _handlers() -> dict:
    coordinator = Coordinator(RUN_ID, expected_clients=1, dataset=DATASET)
    return method_handlers(FederatedLearningService(coordinator, ServerMetrics()))


@pytest.mark.unit
def test_the_handler_table_serves_every_method_of_the_proto():
    proto_methods = {m.name for m in pb.DESCRIPTOR.services_by_name["FederatedLearning"].methods}
    assert set(_handlers()) == proto_methods
    check_serves_every_method(_handlers())  # what start_grpc_server checks before it serves


@pytest.mark.unit
@pytest.mark.parametrize("method", ["Register", "FetchTask", "SubmitResult"])
def test_a_method_left_unserved_stops_the_start(method):
    handlers = _handlers()
    del handlers[method]
    with pytest.raises(UnservedMethodError, match=f"{method} is not served"):
        check_serves_every_method(handlers)


@pytest.mark.unit
def test_a_method_served_with_the_wrong_streaming_stops_the_start():
    handlers = _handlers()
    fetch_task = handlers["FetchTask"]
    handlers["FetchTask"] = grpc.unary_unary_rpc_method_handler(fetch_task.unary_stream)
    with pytest.raises(UnservedMethodError, match="FetchTask is served with other streaming"):
        check_serves_every_method(handlers)
    handlers = dict(_handlers(), Extra=fetch_task)
    with pytest.raises(UnservedMethodError, match="Extra is not in the proto"):
        check_serves_every_method(handlers)


@pytest.mark.integration
def test_no_method_of_the_proto_answers_unimplemented(server: Server):
    """Every method of the proto's service, called on a real server with an empty request, gets a
    real answer or a refusal, never UNIMPLEMENTED (an RPC added to the proto but not served)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    for method in pb.DESCRIPTOR.services_by_name["FederatedLearning"].methods:
        path = f"/{SERVICE_NAME}/{method.name}"
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
            (method.client_streaming, method.server_streaming)]
        call = kind(path, request_serializer=None, response_deserializer=None)
        request = iter([b""]) if method.client_streaming else b""
        try:
            reply = call(request, timeout=RPC_TIMEOUT)
            if method.server_streaming:
                list(reply)
        except grpc.RpcError as error:
            assert error.code() != grpc.StatusCode.UNIMPLEMENTED, f"{method.name} is not served"
    channel.close()


TRAIN_SETTINGS = TrainTask(model="cvae", epochs=1, batch_size=32, optimizer="adam", lr=0.001, sgd_momentum=0.0,
                           binarize=True, seed=7)


@pytest.mark.integration
def test_an_upload_refused_in_its_last_chunk_leaves_the_aggregate_exactly_as_it_was(server: Server, template):
    """Uploads are checked and folded chunk by chunk (genfl_server/upload.py): an update whose
    last chunk carries a wrong digest or a NaN must leave the running FedAvg sum bit for bit as it
    was, and the round's aggregate must be that of the good updates alone."""
    srv, stub, coordinator = server, server.stub, server.coordinator
    register(stub, "alice")
    register(stub, "bob")
    coordinator.wait_for_clients(timeout=5)
    strategy = FedAvg()
    strategy.begin(template)
    coordinator_tasks = [coordinator.new_task(cid, pb.TASK_TYPE_TRAIN, "cvae", 1, TRAIN_SETTINGS,
                                              encode_state_dict(template)) for cid in ("alice", "bob")]
    batch = coordinator.dispatch(coordinator_tasks, template=template,
                                 on_update=lambda task, n, update: strategy.accumulate(update, n))
    header_a, _, _ = fetch(stub, "alice")
    header_b, _, _ = fetch(stub, "bob")
    good_a, good_b = perturbed(template, 1), perturbed(template, 2)
    assert submit(stub, result_header(header_a, "alice", 100), good_a).accepted
    before = {name: acc.clone() for name, acc in strategy._sum.items()}

    last = list(template)[-1]
    while not template[last].is_floating_point():  # the last floating tensor ends in the last chunk
        last = list(template)[list(template).index(last) - 1]
    chunks = list(encode_state_dict(good_b).chunks)
    assert len(chunks) >= 5
    flipped = bytearray(chunks[-1])
    flipped[-20] ^= 0x01
    expect_rejection(srv, grpc.StatusCode.DATA_LOSS, "digest_mismatch", submit, stub,
                     result_header(header_b, "bob", 50), good_b, chunks=chunks[:-1] + [bytes(flipped)])
    non_finite = dict(good_b, **{last: good_b[last].clone()})
    non_finite[last].view(-1)[-1] = float("nan")
    expect_rejection(srv, grpc.StatusCode.INVALID_ARGUMENT, "non_finite", submit, stub,
                     result_header(header_b, "bob", 50), non_finite)
    assert all(torch.equal(strategy._sum[name], before[name]) for name in before), \
        "a refused upload changed the aggregate"

    assert submit(stub, result_header(header_b, "bob", 50), good_b).accepted
    assert batch.wait(5)
    reference = FedAvg()
    reference.begin(template)
    reference.accumulate(good_a, 100)
    reference.accumulate(good_b, 50)
    expected, aggregate = reference.finish(), strategy.finish()
    for name in template:
        assert torch.allclose(aggregate[name].double(), expected[name].double(), rtol=1e-6, atol=1e-7), name
