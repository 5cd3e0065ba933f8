"""Liveness: the server knows which clients are there (each holds a Presence stream open), and a
step stops waiting for clients that are away once it has --min-fit-clients results, instead of
waiting out the round timeout; an away client takes part again as soon as it is back.

First the pieces (presence bookkeeping, the batch's wait, the RPC on loopback), then the scenario
with real processes: 4 genfl-client processes, --min-fit-clients 3, --round-timeout 300, one
SIGKILLed in round 2."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from genfl_server.coordinator import Coordinator, TaskResult
from genfl_server.presence import Presence
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask
from helpers import (kill_all, log_tail, loopback_server, partition_mnist, run_rounds, start_client, start_server,
                     wait_until)

GRACE = 0.5


# -- the bookkeeping --------------------------------------------------------------------------------

@pytest.mark.unit
def test_a_client_is_away_only_after_its_last_stream_stayed_closed_for_the_grace():
    presence = Presence(grace=GRACE)
    changes = []
    presence.listeners.append(lambda: changes.append(presence.away()))
    first, second = presence.opened("a"), presence.opened("a")
    presence.closed("a", first)
    time.sleep(GRACE * 2)
    assert not presence.is_away("a")  # one stream is still open (an old session's closed late)
    presence.closed("a", second)
    presence.closed("a", second)  # idempotent: the gRPC callback and the handler both report it
    assert not presence.is_away("a")  # within the grace: a reconnect is no absence
    wait_until(lambda: presence.is_away("a"), 5, "a to count as away")
    assert changes == [{"a"}]
    presence.opened("a")
    assert not presence.is_away("a") and changes == [{"a"}, set()]
    assert not presence.is_away("never-opened")  # a client without the stream is never away


@pytest.mark.unit
def test_a_stream_reopened_within_the_grace_leaves_the_client_present():
    presence = Presence(grace=GRACE)
    presence.closed("a", presence.opened("a"))
    token = presence.opened("a")  # reconnected in time
    time.sleep(GRACE * 3)
    assert not presence.is_away("a")
    presence.closed("a", token)
    wait_until(lambda: presence.is_away("a"), 5, "a to count as away")


@pytest.mark.unit
def test_clients_leaving_after_the_run_ended_are_not_counted_away():
    presence = Presence(grace=0)
    token = presence.opened("a")
    presence.close()
    presence.closed("a", token)
    time.sleep(0.2)
    assert not presence.is_away("a")


def _batch(coordinator: Coordinator, clients: list[str]):
    tasks = [coordinator.new_task(cid, pb.TASK_TYPE_EVALUATE, "cvae", 1,
                                  EvaluateTask(model="cvae", binarize=True, seed=1), None) for cid in clients]
    return tasks, coordinator.dispatch(tasks)


@pytest.mark.unit
def test_a_step_with_its_quorum_stops_waiting_when_the_rest_go_away_and_not_before():
    coordinator = Coordinator("run-live", expected_clients=3, dataset=None, presence_grace=GRACE)
    tokens = {cid: coordinator.presence_opened(cid) for cid in ("a", "b", "c")}
    tasks, batch = _batch(coordinator, ["a", "b", "c"])
    for task in tasks[:2]:
        coordinator.finish(TaskResult(task, 0, {}), batch, None)
    # Two results, c present: the step goes on waiting for c (until its deadline).
    assert not batch.wait(GRACE * 2, quorum=2, is_away=coordinator.presence.is_away)
    # c's stream closes: once the grace passes, the waiting step is woken and ends.
    waiter = threading.Thread(target=lambda: batch.wait(60, quorum=2, is_away=coordinator.presence.is_away))
    started = time.monotonic()
    waiter.start()
    coordinator.presence_closed("c", tokens["c"])
    waiter.join(10)
    assert not waiter.is_alive() and time.monotonic() - started < 5
    assert not batch.complete and [t.client_id for t in batch.unanswered()] == ["c"]
    # Without enough results an away client does not end the wait.
    _tasks, short = _batch(coordinator, ["a", "c"])
    assert not short.wait(GRACE, quorum=1, is_away=coordinator.presence.is_away)
    coordinator.shutdown(reason="test over")


@pytest.mark.unit
def test_the_end_of_run_waits_to_tell_connected_clients_only():
    """At the end of a run the server waits (bounded) until every client has heard it ended, but not
    for one whose presence stream has closed: nobody is there to tell (a client stopped by the same
    Ctrl-C as the server), and a wait for it only delays the exit."""
    coordinator = Coordinator("run-end", expected_clients=3, dataset=None, presence_grace=60)
    for cid in ("a", "b", "c"):
        coordinator.register(pb.RegisterRequest(client_id=cid, num_train_samples=10, num_heldout_samples=2))
    tokens = {cid: coordinator.presence_opened(cid) for cid in ("a", "b")}  # c never opens one
    coordinator.shutdown(reason="done")
    coordinator.presence_closed("a", tokens["a"])  # a is gone before hearing it
    assert coordinator.next_task("c", 1).type == pb.TASK_TYPE_SHUTDOWN
    assert not coordinator.wait_shutdown_delivered(0.3)  # b is still connected and has not heard it
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(coordinator.wait_shutdown_delivered(30)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    coordinator.presence_closed("b", tokens["b"])  # b goes too: the wait ends at once, not after 30 s
    waiter.join(10)
    assert waiter_result == [True] and time.monotonic() - started < 5
    assert not coordinator.presence.is_away("b")  # and leaving after the run is no absence


@pytest.mark.integration
def test_presence_rpc_on_loopback_counts_the_client_present_then_away_when_the_stream_ends():
    coordinator = Coordinator("run-rpc", expected_clients=1, dataset=None, presence_grace=GRACE)
    with loopback_server(coordinator) as (channel, _port):
        stub = pb_grpc.FederatedLearningStub(channel)
        reply = stub.Register(pb.RegisterRequest(client_id="a", num_train_samples=10, num_heldout_samples=2),
                              timeout=10)
        with pytest.raises(grpc.RpcError) as refused:  # another session's secret opens nothing
            next(stub.Presence(pb.PresenceRequest(run_id="run-rpc", client_id="a", session_secret="0" * 32),
                               timeout=10))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        request = pb.PresenceRequest(run_id="run-rpc", client_id="a", session_secret=reply.session_secret)
        call = stub.Presence(request)
        assert next(call).present
        assert coordinator.present_clients() == 1
        call.cancel()  # what the kernel does for a killed process: the stream ends
        wait_until(lambda: coordinator.presence.is_away("a"), 10, "a to count as away")
        assert coordinator.present_clients() == 0
        again = stub.Presence(request)
        assert next(again).present and not coordinator.presence.is_away("a")
        again.cancel()


@pytest.mark.integration
def test_a_presence_stream_cancelled_while_its_opening_is_recorded_does_not_hold_the_client_present():
    # A stream may end at once (a runner renews it after a re-registration; a client dies just
    # after opening it); on a loaded server the call may end while its opening is still being
    # recorded off the event loop. That stream must count as closed too, or the client is never away.
    coordinator = Coordinator("run-race", expected_clients=1, dataset=None, presence_grace=GRACE)
    recorded = coordinator.presence_opened
    entered = threading.Event()

    def slow_opening(client_id):  # a busy executor, made certain
        entered.set()
        time.sleep(1.0)
        return recorded(client_id)

    coordinator.presence_opened = slow_opening
    with loopback_server(coordinator) as (channel, _port):
        stub = pb_grpc.FederatedLearningStub(channel)
        reply = stub.Register(pb.RegisterRequest(client_id="a", num_train_samples=10, num_heldout_samples=2),
                              timeout=10)
        request = pb.PresenceRequest(run_id="run-race", client_id="a", session_secret=reply.session_secret)
        call = stub.Presence(request)
        assert entered.wait(10)
        call.cancel()  # before the server recorded the opening
        wait_until(lambda: coordinator.presence.is_away("a"), 10, "a to count as away")
        assert coordinator.present_clients() == 0


# -- the scenario, with real processes --------------------------------------------------------------

CLIENTS = 4
VICTIM = CLIENTS - 1


def _scrape(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        match = re.search(rf"^{name} (\S+)$", response.read().decode(), re.M)
    return float(match.group(1)) if match else None


def _start_run(tmp_path, rounds: int, *extra: str):
    shards = partition_mnist(tmp_path / "shards", CLIENTS, 400)
    out = tmp_path / "run"
    server, endpoint = start_server(out, "--phase", "cvae", "--clients", str(CLIENTS), "--rounds", str(rounds),
                                    "--address", "127.0.0.1:0", "--round-timeout", "300", "--min-fit-clients", "3",
                                    "--presence-grace", "1", "--metrics-port", "0", *extra, log=tmp_path / "server.log",
                                    timeout=300)

    def start(i):
        return start_client(endpoint["address"], shards / f"client-00{i}.npz", tmp_path / f"client-{i}.log")

    return out, server, endpoint["metrics_port"], start


def _kill_victim_in_round_2(clients, metrics_port):
    wait_until(lambda: (_scrape(metrics_port, "genfl_round") or 0) >= 2, 600, "round 2 to start", interval=0.1,
               ignore=(OSError,))
    clients[VICTIM].send_signal(signal.SIGKILL)
    clients[VICTIM].wait()
    killed_at = time.monotonic()
    wait_until(lambda: _scrape(metrics_port, "genfl_clients_present") == CLIENTS - 1, 30,
               "the killed client to count as away", ignore=(OSError,))
    return killed_at


@pytest.mark.integration
def test_a_killed_client_is_not_waited_for_and_the_run_finishes_in_seconds(tmp_path):
    rounds = 4
    out, server, metrics_port, start = _start_run(tmp_path, rounds)
    clients = [start(i) for i in range(CLIENTS)]
    try:
        killed_at = _kill_victim_in_round_2(clients, metrics_port)
        # With --round-timeout 300 each later step would otherwise wait 300 s for the dead client.
        assert server.wait(120) == 0, log_tail(tmp_path / "server.log")
        finished_in = time.monotonic() - killed_at
        assert [c.wait(60) for c in clients[:VICTIM]] == [0] * VICTIM
    finally:
        kill_all([server, *clients])
    assert finished_in < 120
    records = run_rounds(out)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    # Round r's evaluation rides on round r + 1's training: from round 1 on, the dead client is
    # missing from the evaluations, and the rounds after the kill take seconds, not 300 s a step.
    for record in records:
        assert record["clients"] == CLIENTS - 1 and f"client-00{VICTIM}" not in record["per_client"]
    for record in records[1:]:
        assert record["seconds"] < 60, record
    log = (tmp_path / "server.log").read_text()
    assert f"client client-00{VICTIM} is away" in log
    assert f"missing client-00{VICTIM} (away: not waited for)" in log
    assert "within 300 s" not in log  # no step ran into its deadline


@pytest.mark.integration
def test_a_killed_client_restarted_takes_part_again(tmp_path):
    # Enough (short) rounds that the restarted process, which loads torch and its shard first,
    # is back well before the end, also on a loaded machine.
    rounds = 40
    out, server, metrics_port, start = _start_run(tmp_path, rounds, "--local-epochs", "1")
    clients = [start(i) for i in range(CLIENTS)]
    try:
        _kill_victim_in_round_2(clients, metrics_port)
        clients[VICTIM] = start(VICTIM)  # the same shard, under the same identity
        wait_until(lambda: _scrape(metrics_port, "genfl_clients_present") == CLIENTS, 300,
                   "the restarted client to count as present", details=lambda: log_tail(tmp_path / "server.log"),
                   ignore=(OSError,))
        assert server.wait(300) == 0, log_tail(tmp_path / "server.log")
        assert [c.wait(60) for c in clients] == [0] * CLIENTS
    finally:
        kill_all([server, *clients])
    records = run_rounds(out)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert any(r["clients"] == CLIENTS - 1 for r in records)
    assert records[-1]["clients"] == CLIENTS and f"client-00{VICTIM}" in records[-1]["per_client"]
    log = (tmp_path / "server.log").read_text()
    assert f"client client-00{VICTIM} is away" in log and f"client client-00{VICTIM} is present again" in log
