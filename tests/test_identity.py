"""Hostile clients cannot act for others, nor flood the server's log (sessions, task ids, rate-limited logs).

Hand-made clients speak proto/genfl.proto over real gRPC: to a server in this process
(helpers.loopback_server), and to a real genfl-server process where its log is what is checked.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from genfl_client.executor import TaskExecutor
from genfl_client.metrics import ClientMetrics
from genfl_client.runner import ClientRunner, FatalClientError
from genfl_server.coordinator import Coordinator, TaskState
from genfl_server.logsafe import MAX_SHOWN_CHARS, RateLimitedLog, shown
from genfl_server.metrics import ServerMetrics
from genfl_shared.codec import MAX_MESSAGE_BYTES
from genfl_shared.partition import Shard
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask
from helpers import loopback_server, start_server

RUN_ID = "run-identity"
DATASET = "mnist"
RPC_TIMEOUT = 20.0
SERVICE = "/genfl.v2.FederatedLearning"
EVALUATE = EvaluateTask(model="cvae", binarize=True, seed=1)
HELDOUT = 20
GARBAGE = b"\xff\xff\xff"  # parses as no message: a truncated varint
# A rejection message quotes at most a few client strings of MAX_SHOWN_CHARS; whole lines stay short.
MAX_LINE_CHARS = 2000
Code = grpc.StatusCode


class Run:
    """A two-client run served on loopback, and hand-made requests to it."""

    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics, channel: grpc.Channel, port: int):
        self.coordinator, self.metrics, self.channel = coordinator, metrics, channel
        self.address = f"127.0.0.1:{port}"
        self.stub = pb_grpc.FederatedLearningStub(channel)

    def register(self, client_id: str, dataset: str = DATASET) -> pb.RegisterReply:
        return self.stub.Register(pb.RegisterRequest(client_id=client_id, num_train_samples=100,
                                                     num_heldout_samples=HELDOUT, dataset=dataset),
                                  timeout=RPC_TIMEOUT)

    def fetch(self, client_id: str, secret: str, run_id: str = RUN_ID) -> pb.TaskHeader:
        messages = list(self.stub.FetchTask(pb.FetchTaskRequest(run_id=run_id, client_id=client_id,
                                                                session_secret=secret), timeout=RPC_TIMEOUT))
        return messages[0].header

    def submit(self, client_id: str, secret: str, task_id: str, *, run_id: str = RUN_ID,
               loss: float = 1.0) -> pb.SubmitReply:
        header = pb.ResultHeader(run_id=run_id, task_id=task_id, client_id=client_id, phase="cvae", round=1,
                                 type=pb.TASK_TYPE_EVALUATE, num_samples=HELDOUT, metrics={"loss": loss},
                                 session_secret=secret)
        return self.stub.SubmitResult(iter([pb.ResultMessage(header=header)]), timeout=RPC_TIMEOUT)

    def rejected(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("genfl_client_updates_rejected_total",
                                                      {"reason": reason}) or 0.0

    def refused(self, code: grpc.StatusCode, reason: str, call, *args, **kwargs) -> str:
        """Run ``call``; it must fail with ``code``, counted under ``reason``; returns the details."""
        before = self.rejected(reason)
        with pytest.raises(grpc.RpcError) as info:
            call(*args, **kwargs)
        assert info.value.code() == code, f"{reason}: {info.value.code()} {info.value.details()}"
        assert self.rejected(reason) == before + 1, f"the metric for {reason} did not move"
        return info.value.details()


@pytest.fixture
def run():
    coordinator = Coordinator(RUN_ID, expected_clients=2, dataset=DATASET, poll_timeout=0.3)
    metrics = ServerMetrics()
    with loopback_server(coordinator, metrics) as (channel, port):
        yield Run(coordinator, metrics, channel, port)


def dispatch_evaluation(run: Run, client_ids=("alice", "bob")):
    tasks = [run.coordinator.new_task(cid, pb.TASK_TYPE_EVALUATE, "cvae", 1, EVALUATE, None) for cid in client_ids]
    return tasks, run.coordinator.dispatch(tasks)


# -- finding 4: acting in another client's name --------------------------------------------------

@pytest.mark.unit
def test_task_ids_are_random_128_bit_hex():
    coordinator = Coordinator(RUN_ID, expected_clients=1, dataset=DATASET)
    ids = [coordinator.new_task("alice", pb.TASK_TYPE_EVALUATE, "cvae", 1, EVALUATE, None).task_id
           for _ in range(200)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", task_id) for task_id in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    assert not any(task_id.startswith(RUN_ID) for task_id in ids)


@pytest.mark.integration
def test_result_in_another_clients_name_is_refused_and_the_real_client_is_unaffected(run: Run):
    alice = run.register("alice").session_secret
    mallory = run.register("bob").session_secret  # mallory holds bob's registration, a session of its own
    assert re.fullmatch(r"[0-9a-f]{32}", alice) and alice != mallory
    run.coordinator.wait_for_clients(timeout=5)
    (alice_task, _), batch = dispatch_evaluation(run)

    # What the finding did: alice's task id guessed (handed out in client order) and a result sent
    # in alice's name; then the same with the real id (stolen, say from a log), with any secret.
    for guessed in (f"{RUN_ID}-1", f"{RUN_ID}-2"):
        run.refused(Code.PERMISSION_DENIED, "bad_session", run.submit, "alice", "", guessed, loss=9.0)
    details = run.refused(Code.PERMISSION_DENIED, "bad_session", run.submit, "alice", "", alice_task.task_id,
                          loss=9.0)
    assert "no session secret" in details
    details = run.refused(Code.PERMISSION_DENIED, "bad_session", run.submit, "alice", mallory,
                          alice_task.task_id, loss=9.0)
    assert "not client 'alice''s current one" in details
    run.refused(Code.PERMISSION_DENIED, "wrong_client", run.submit, "bob", mallory, alice_task.task_id, loss=9.0)
    # Nor can mallory poll alice's task in her name.
    run.refused(Code.PERMISSION_DENIED, "bad_session", run.fetch, "alice", mallory)
    assert run.coordinator.task_state(alice_task.task_id) is TaskState.PENDING and batch.results == {}

    # Alice is unaffected: her task reaches her and her result (not ALREADY_EXISTS) is the one kept.
    header = run.fetch("alice", alice)
    assert header.task_id == alice_task.task_id
    assert run.submit("alice", alice, header.task_id, loss=1.0).accepted
    assert batch.results[alice_task.task_id].metrics == {"loss": 1.0}


@pytest.mark.integration
def test_missing_or_wrong_secret_is_refused_on_every_call(run: Run):
    alice = run.register("alice").session_secret
    for secret, said in (("", "no session secret"), ("0" * 32, "current one"), (alice + "0", "current one"),
                         ("x" * 100_000, "current one")):
        assert said in run.refused(Code.PERMISSION_DENIED, "bad_session", run.fetch, "alice", secret)
        assert said in run.refused(Code.PERMISSION_DENIED, "bad_session", run.submit, "alice", secret, "t")
    assert run.fetch("alice", alice).type == pb.TASK_TYPE_IDLE  # the right one still works
    # The coordinator keeps a digest, never the secret itself.
    assert alice.encode() not in run.coordinator.clients["alice"].session_digest
    assert alice not in repr(run.coordinator.clients["alice"])


@pytest.mark.integration
def test_reregistration_starts_a_new_session_and_ends_the_old(run: Run, caplog):
    caplog.set_level(logging.INFO, logger="genfl_server")
    first = run.register("alice").session_secret
    assert run.fetch("alice", first).type == pb.TASK_TYPE_IDLE
    # Alice registers again (a restart, or a hostile connection that knows her id: without tokens
    # the server cannot tell them apart): a new secret; the old one is refused from now on.
    second = run.register("alice").session_secret
    assert second != first
    run.refused(Code.PERMISSION_DENIED, "bad_session", run.fetch, "alice", first)
    assert run.fetch("alice", second).type == pb.TASK_TYPE_IDLE
    # The old session was live (it had just polled): the takeover is logged as such.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "registered again while its session was live" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("client alice "), warnings

    # A session idle for longer than a poll plus the grace is replaced without a warning.
    run.coordinator.clients["alice"].last_seen -= 3600
    caplog.clear()
    third = run.register("alice").session_secret
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("client alice registered" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    run.refused(Code.PERMISSION_DENIED, "bad_session", run.fetch, "alice", second)
    assert run.fetch("alice", third).type == pb.TASK_TYPE_IDLE


@pytest.mark.integration
def test_a_session_that_holds_a_task_is_live(run: Run, caplog):
    alice = run.register("alice").session_secret
    run.register("bob")
    run.coordinator.wait_for_clients(timeout=5)
    dispatch_evaluation(run)
    run.fetch("alice", alice)  # delivered: alice is working on it
    run.coordinator.clients["alice"].last_seen -= 3600  # a long task: no request for an hour
    caplog.set_level(logging.WARNING, logger="genfl_server")
    run.register("alice")
    assert any("registered again while its session was live" in r.getMessage() for r in caplog.records)


# -- finding 7: attacker-controlled text in the log -----------------------------------------------

def _server_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("genfl_server")]


@pytest.mark.integration
def test_huge_ids_give_bounded_printable_log_lines_and_error_details(run: Run, caplog):
    caplog.set_level(logging.INFO, logger="genfl_server")
    alice = run.register("alice").session_secret
    huge = "\x1b[31m" + "A\nFAKE LOG LINE\x00" * 60_000  # about 1 MB, with control characters
    details = [
        run.refused(Code.NOT_FOUND, "unknown_client", run.fetch, huge, alice),
        run.refused(Code.FAILED_PRECONDITION, "wrong_run", run.fetch, "alice", alice, run_id=huge),
        run.refused(Code.NOT_FOUND, "unknown_task", run.submit, "alice", alice, huge),
        run.refused(Code.NOT_FOUND, "unknown_client", run.submit, huge, alice, "t"),
        run.refused(Code.FAILED_PRECONDITION, "wrong_dataset", run.register, "carol", dataset=huge),
        run.refused(Code.INVALID_ARGUMENT, "bad_client_id", run.register, huge),
    ]
    for text in details:
        assert len(text) <= MAX_LINE_CHARS and text.isprintable(), text[:300]
    assert "chars)" in details[0]  # says that it was cut
    lines = _server_lines(caplog)
    assert len(lines) >= len(details)
    for line in lines:
        assert len(line) <= MAX_LINE_CHARS and line.isprintable(), line[:300]
    assert sum(map(len, lines)) < 20_000


@pytest.mark.unit
def test_shown_escapes_and_cuts():
    assert shown("alice") == "alice"
    assert shown("a\nb\x00c\x1b") == "a\\nb\\x00c\\x1b"
    assert shown("é ü 日本") == "é ü 日本"  # printable text is kept as it is
    cut = shown("x" * 10_000)
    assert cut == "x" * MAX_SHOWN_CHARS + "…(+9800 chars)"
    assert len(shown("\x00" * 10_000)) <= MAX_SHOWN_CHARS + 20


@pytest.mark.integration
def test_repeated_rejections_of_one_client_are_rate_limited_in_the_log(run: Run, caplog):
    caplog.set_level(logging.WARNING, logger="genfl_server")
    run.register("alice")
    for _ in range(60):
        run.refused(Code.PERMISSION_DENIED, "bad_session", run.fetch, "alice", "wrong")
    logged = [line for line in _server_lines(caplog) if line.startswith("rejected (bad_session)")]
    assert len(logged) == 5, logged  # the first few; all 60 are counted in the metric
    assert run.rejected("bad_session") == 60
    # Another client's rejection is still logged.
    run.refused(Code.NOT_FOUND, "unknown_client", run.fetch, "carol", "x")
    assert any("'carol'" in line for line in _server_lines(caplog))


@pytest.mark.integration
def test_repeated_re_registrations_are_rate_limited_in_the_log(run: Run, caplog):
    """Re-registrations are accepted (a restarted client comes back), so a hostile connection could
    repeat them: their log lines are limited like rejections."""
    caplog.set_level(logging.INFO, logger="genfl_server")
    secrets = {run.register("alice").session_secret for _ in range(50)}
    assert len(secrets) == 50  # every one a new session
    logged = [line for line in _server_lines(caplog) if line.startswith("client alice registered")]
    assert len(logged) == 5, logged


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_rejection_log_says_how_many_it_left_out(caplog):
    clock = FakeClock()
    logger = logging.getLogger("genfl_server.test_rejection_log")
    rejections = RateLimitedLog(logger, first=2, every=10.0, max_lines=4, clock=clock)
    caplog.set_level(logging.WARNING, logger=logger.name)
    for _ in range(7):
        rejections.rejected("mallory", "bad_session", "nope")
    assert [r.getMessage() for r in caplog.records] == ["rejected (bad_session): nope"] * 2
    clock.now += 10
    rejections.rejected("mallory", "bad_session", "nope")
    assert caplog.records[-1].getMessage() == "rejected (bad_session): nope (5 more about 'mallory' not logged since)"
    # Many clients at once: at most max_lines lines per window, then one line that counts the rest.
    caplog.clear()
    for index in range(20):
        rejections.rejected(f"client-{index}", "unknown_client", "who?")
    assert len(caplog.records) == 3  # 4 per window, one used above
    clock.now += 10
    rejections.rejected("client-0", "unknown_client", "who?")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[3].startswith("17 lines about clients not logged in the last 10 s"), messages
    assert messages[4] == "rejected (unknown_client): who?"


# -- unparsable requests, against a real genfl-server process -------------------------------------

def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _rejected_sample(text: str, reason: str) -> float:
    match = re.search(rf'^genfl_client_updates_rejected_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.integration
def test_server_process_refuses_unparsable_requests_as_malformed_without_tracebacks(tmp_path):
    out, log_path = tmp_path / "run", tmp_path / "server.log"
    server, endpoint = start_server(out, "--clients", "1", "--phase", "cvae", "--rounds", "1", "--address",
                                    "127.0.0.1:0", "--register-timeout", "60", "--local-epochs", "1",
                                    "--metrics-port", "0", log=log_path)
    channel = grpc.insecure_channel(endpoint["address"],
                                    options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    try:
        grpc.channel_ready_future(channel).result(timeout=20)
        stub = pb_grpc.FederatedLearningStub(channel)
        raw = dict(request_serializer=None)  # the bytes go out as they are

        def refused_as_malformed(call, request):
            with pytest.raises(grpc.RpcError) as info:
                result = call(request, timeout=RPC_TIMEOUT)
                if hasattr(result, "__next__"):
                    list(result)
            assert info.value.code() == Code.INVALID_ARGUMENT, (info.value.code(), info.value.details())
            assert "does not parse" in info.value.details()

        refused_as_malformed(channel.unary_unary(f"{SERVICE}/Register", **raw,
                                                 response_deserializer=pb.RegisterReply.FromString), GARBAGE)
        refused_as_malformed(channel.unary_stream(f"{SERVICE}/FetchTask", **raw,
                                                  response_deserializer=pb.TaskMessage.FromString), GARBAGE)

        # A registered client's valid result header, then a chunk that does not parse.
        probe = pb.RegisterRequest(client_id="probe", num_train_samples=100, num_heldout_samples=20, dataset=DATASET)
        reply = stub.Register(probe, timeout=RPC_TIMEOUT)
        messages = list(stub.FetchTask(pb.FetchTaskRequest(run_id=reply.run_id, client_id="probe",
                                                           session_secret=reply.session_secret), timeout=RPC_TIMEOUT))
        task = messages[0].header
        assert task.type == pb.TASK_TYPE_TRAIN
        header = pb.ResultHeader(run_id=task.run_id, task_id=task.task_id, client_id="probe", phase=task.phase,
                                 round=task.round, type=task.type, num_samples=100, metrics={"loss": 0.5},
                                 session_secret=reply.session_secret)
        header.manifest.CopyFrom(task.manifest)
        stream = [pb.ResultMessage(header=header).SerializeToString(), GARBAGE]
        refused_as_malformed(channel.stream_unary(f"{SERVICE}/SubmitResult", **raw,
                                                  response_deserializer=pb.SubmitReply.FromString), iter(stream))

        # And a flood of 1 MB ids: each rejection is counted, the log stays small.
        huge = "\n" + "B" * (1 << 20)
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.FetchTask(pb.FetchTaskRequest(run_id=reply.run_id, client_id=huge, session_secret="x"),
                                    timeout=RPC_TIMEOUT))
            assert info.value.code() == Code.NOT_FOUND and len(info.value.details()) <= MAX_LINE_CHARS

        metrics = _scrape(endpoint["metrics_port"])
        assert _rejected_sample(metrics, "malformed") == 3, metrics
        assert _rejected_sample(metrics, "truncated") == 0
        assert _rejected_sample(metrics, "unknown_client") == 30
        assert server.poll() is None
    finally:
        channel.close()
        server.terminate()
        server.wait(30)
    log_text = log_path.read_text(errors="replace")
    assert "Traceback" not in log_text and "Exception deserializing" not in log_text, log_text[-3000:]
    assert len(log_text) < 50_000, f"{len(log_text)} bytes of log"
    assert max(map(len, log_text.splitlines())) <= MAX_LINE_CHARS + 200  # plus the log line's prefix
    assert log_text.count("rejected (malformed)") == 3
    assert log_text.count("rejected (unknown_client)") <= 6


# -- the real client, when its session is taken over -----------------------------------------------

@pytest.mark.integration
def test_client_whose_session_was_taken_over_stops_with_a_clear_error(run: Run):
    """It must not retry for ever (re-registering would take the id back, and the two would take
    it from each other in turn); it stops, saying why."""
    rng = np.random.default_rng(0)
    shard = Shard("alice", 0, DATASET, rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 8).astype(np.int64), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, 4).astype(np.int64))
    runner = ClientRunner(run.address, "alice", TaskExecutor(shard, torch.device("cpu")), ClientMetrics("alice"),
                          dataset=DATASET)
    outcome: dict = {}

    def serve():
        try:
            outcome["exit_code"] = runner.run()
        except BaseException as error:  # surfaced by the test
            outcome["error"] = error

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while "alice" not in run.coordinator.clients and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "alice" in run.coordinator.clients, "the client did not register"
        run.stub.Register(pb.RegisterRequest(client_id="alice", num_train_samples=8, num_heldout_samples=4,
                                             dataset=DATASET), timeout=RPC_TIMEOUT)  # the takeover
        thread.join(15)
        assert not thread.is_alive(), "the client kept retrying"
        error = outcome.get("error")
        assert isinstance(error, FatalClientError), outcome
        assert "PERMISSION_DENIED" in str(error) and "registered with this client id since" in str(error)
        assert run.rejected("bad_session") >= 1
    finally:
        runner.close()
