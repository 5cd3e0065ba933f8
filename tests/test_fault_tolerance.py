"""Rounds that survive failures: real processes, one of them killed with SIGKILL mid-run."""

from __future__ import annotations

import signal

import pytest

from helpers import kill_all, partition_mnist, run_rounds, start_client, start_server, wait_until

pytestmark = pytest.mark.integration

CLIENTS = 4
# A dead client is no longer waited for (presence), so rounds take seconds: enough of them that the
# restarted client, which loads torch and its shard first, is back well before the end.
ROUNDS = 30


def test_killed_client_round_completes_with_the_rest_and_the_client_rejoins(tmp_path):
    shards = partition_mnist(tmp_path / "shards", CLIENTS, 800)
    out = tmp_path / "run"
    server, endpoint = start_server(out, "--phase", "cvae", "--clients", str(CLIENTS), "--rounds", str(ROUNDS),
                                    "--address", "127.0.0.1:0", "--round-timeout", "6", "--min-fit-clients", "3",
                                    log=tmp_path / "server.log")
    address = endpoint["address"]

    def start(i):
        return start_client(address, shards / f"client-00{i}.npz", tmp_path / f"client-{i}.log")

    clients = [start(i) for i in range(CLIENTS)]
    victim = CLIENTS - 1
    try:
        wait_until(lambda: len(run_rounds(out)) >= 1, 120, "round 1", interval=0.1)
        clients[victim].send_signal(signal.SIGKILL)
        clients[victim].wait()
        # A round completes without the victim once the deadline passes (3 of 4 >= min-fit-clients).
        wait_until(lambda: any(e["clients"] == CLIENTS - 1 for e in run_rounds(out)), 60,
                   "a round aggregated without the killed client", interval=0.1)
        clients[victim] = start(victim)  # comes back under the same identity
        assert server.wait(180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert [c.wait(60) for c in clients] == [0] * CLIENTS
    finally:
        kill_all([server, *clients])
    rounds = run_rounds(out)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert rounds[0]["clients"] == CLIENTS
    assert any(r["clients"] == CLIENTS - 1 for r in rounds)
    assert rounds[-1]["clients"] == CLIENTS and f"client-00{victim}" in rounds[-1]["per_client"]
    log = (tmp_path / "server.log").read_text()
    assert "missing client-003" in log and "registered (" in log and "again" in log
