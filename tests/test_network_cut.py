"""Network cut: each client runs in its own network namespace, linked to the host by a veth pair
that carries only link-local test addresses this test assigns itself. One client's link goes down
mid-round for a few seconds, then comes back; the run still finishes and that client is in the
rounds after the cut.

Namespaces need root (CAP_NET_ADMIN). CI runs as root, so a missing privilege fails the test
instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import dataset_dir
from helpers import run_rounds, start_server, wait_until

pytestmark = pytest.mark.integration

CLIENTS = 2
ROUNDS = 5
CUT_SECONDS = 5.0
TEST_DEADLINE = 110.0  # the whole test, setup to teardown, stays below two minutes


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(0.0, self.end - time.monotonic())
        return left if cap is None else min(left, cap)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise AssertionError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class CutLab:
    """Namespaces gfl<pid>n<i>, each with a veth pair: gfl<pid>h<i> in the root namespace holding
    169.254.X.(4i+1)/30, gfl<pid>p<i> in the namespace holding 169.254.X.(4i+2)/30. Nothing else
    is routed; 169.254.169.0/24 (cloud metadata) is never used."""

    def __init__(self, clients: int):
        pid = os.getpid()
        self.tag = f"gfl{pid % 100000}"
        self.octet = 200 + pid % 50
        self.clients = clients
        self.namespaces: list[str] = []
        self.host_links: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def host_link(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def host_ip(self, i: int) -> str:
        return f"169.254.{self.octet}.{4 * i + 1}"

    def client_ip(self, i: int) -> str:
        return f"169.254.{self.octet}.{4 * i + 2}"

    def create(self) -> None:
        if shutil.which("ip") is None:
            pytest.fail("the network-cut test needs iproute2's `ip` (apt-get install iproute2)")
        for i in range(self.clients):
            ns, host, peer = self.ns(i), self.host_link(i), f"{self.tag}p{i}"
            added = _ip("netns", "add", ns, check=False)
            if added.returncode != 0:
                pytest.fail(f"`ip netns add {ns}` failed: {added.stderr.strip()} -- this test needs root "
                            f"(CAP_NET_ADMIN and CAP_SYS_ADMIN); CI runs it as root")
            self.namespaces.append(ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns)
            self.host_links.append(host)
            _ip("addr", "add", f"{self.host_ip(i)}/30", "dev", host)
            _ip("link", "set", host, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # down by default in a new namespace
            _ip("-n", ns, "addr", "add", f"{self.client_ip(i)}/30", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")

    def set_host_link(self, i: int, state: str) -> None:
        _ip("link", "set", self.host_link(i), state)

    def destroy(self) -> list[str]:
        """Remove everything created (deleting a namespace deletes its veth end, and so the pair);
        returns what could not be removed."""
        problems = []
        for ns in self.namespaces:
            proc = _ip("netns", "del", ns, check=False)
            if proc.returncode != 0:
                problems.append(f"netns {ns}: {proc.stderr.strip()}")
        for link in self.host_links:
            if _ip("link", "show", link, check=False).returncode == 0:
                proc = _ip("link", "del", link, check=False)
                if proc.returncode != 0:
                    problems.append(f"link {link}: {proc.stderr.strip()}")
        return problems


def test_client_link_cut_mid_round_then_restored_run_finishes(tmp_path):
    deadline = Deadline(TEST_DEADLINE)
    link = CutLab(CLIENTS)
    procs: list[subprocess.Popen] = []
    log_paths = [tmp_path / "server.log"] + [tmp_path / f"client-{i}.log" for i in range(CLIENTS)]

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in log_paths if p.exists())

    try:
        link.create()
        shards = tmp_path / "shards"
        part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                               "--data-root", str(dataset_dir("mnist")), "--clients", str(CLIENTS), "--iid",
                               "--train-subset", "400", "--seed", "0", "--out", str(shards)],
                              capture_output=True, text=True, timeout=deadline.left(60))
        assert part.returncode == 0, part.stderr

        out = tmp_path / "run"
        # 0.0.0.0: the server answers on every host-side veth address; the clients can reach nothing
        # but their own link, so all their traffic crosses it.
        server, endpoint = start_server(
            out, "--phase", "cvae", "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--address", "0.0.0.0:0",
            "--local-epochs", "2", "--round-timeout", "20", "--min-fit-clients", "1", "--register-timeout", "60",
            log=log_paths[0], timeout=deadline.left(60))
        procs.append(server)
        port = endpoint["port"]

        for i in range(CLIENTS):
            with open(log_paths[1 + i], "w") as client_log:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", link.ns(i), sys.executable, "-m", "genfl_client.cli",
                     "--server", f"{link.host_ip(i)}:{port}", "--shard", str(shards / f"client-00{i}.npz"),
                     "--threads", "1"],
                    stdout=client_log, stderr=subprocess.STDOUT))
        clients = procs[1:]

        first = wait_until(lambda: run_rounds(out), deadline.left(60), "round 1", details=logs)[0]
        assert sorted(first["per_client"]) == [f"client-00{i}" for i in range(CLIENTS)], first
        # Round 2 is under way: cut the last client's link, then restore it.
        victim = CLIENTS - 1
        link.set_host_link(victim, "down")
        cut_at = len(run_rounds(out))
        time.sleep(CUT_SECONDS)
        link.set_host_link(victim, "up")
        restored_at = len(run_rounds(out))
        assert all(p.poll() is None for p in procs), "a process died during the cut\n" + logs()

        assert server.wait(deadline.left(90)) == 0, logs()
        codes = [c.wait(deadline.left(30)) for c in clients]
        assert codes == [0] * CLIENTS, f"client exit codes {codes}\n{logs()}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        problems = link.destroy()
    assert not problems, f"test network not fully removed: {problems}"

    rounds = run_rounds(out)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1)), rounds
    assert cut_at < ROUNDS, "the run ended before the cut: nothing was tested"
    victim_id = f"client-00{victim}"
    after = rounds[restored_at:]
    assert after, f"no round ran after the link was restored (cut after round {cut_at})"
    assert any(victim_id in r["per_client"] for r in after), \
        f"{victim_id} took part in no round after its link came back: {[sorted(r['per_client']) for r in rounds]}"
    assert victim_id in rounds[-1]["per_client"]
