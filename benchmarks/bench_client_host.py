"""Memory of K clients as K ``genfl-client`` processes vs one client host (one process, K shards).

Partitions MNIST into K tiny IID shards and starts a real ``genfl-server`` that waits for K + 1
clients, so that the K clients stay registered, long-polling and holding their Presence streams,
but idle (no round starts). Once every client has registered (and a settling pause), it reads
each client process's /proc: VmRSS (resident pages, the libraries shared between processes
counted in each) and Pss (proportional set size: shared pages divided among their sharers, so
the sum is what the processes really cost the machine). Then the same with one host process
serving all K shards (``genfl-client --shard ... --shard ...``).

Reports the totals of both layouts and their ratio (context lines: no target; the issue asks
for the saving of K - 1 torch imports)."""

from __future__ import annotations

import time
from pathlib import Path

import click

import _common as c
from genfl_shared.runfiles import wait_for_endpoint

KB = 1024


def proc_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, Pss) of a process, in bytes."""
    rss = pss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * KB
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * KB
    return rss, pss


def idle_memory(label: str, groups: list[list[int]], shards: Path, clients: int, work: Path,
                settle: float) -> tuple[float, float, int]:
    """Total (VmRSS, Pss) of the client processes once all CLIENTS are registered and idle."""
    out = work / label
    with c.ProcessGroup() as procs:
        server = procs.start("server", [c.tool("genfl-server"), "--phase", "cvae", "--clients", str(clients + 1),
                                        "--threads", "1", "--address", "127.0.0.1:0", "--out", str(out),
                                        "--log-level", "warning"], work / f"{label}-server.log")
        address = wait_for_endpoint(out, 60, [server])["address"]
        logs = [work / f"{label}-client-{n}.log" for n in range(len(groups))]
        client_procs = [procs.start(f"client-{n}", [c.tool("genfl-client"), "--server", address, "--threads", "1",
                                                    *[a for i in group for a in
                                                      ("--shard", str(shards / f"client-{i:03d}.npz"))]],
                                    logs[n]) for n, group in enumerate(groups)]
        deadline = time.monotonic() + 300
        while sum(p.read_text(errors="replace").count(" registered with ") for p in logs if p.exists()) < clients:
            if any(p.poll() is not None for p in [server, *client_procs]):
                raise RuntimeError(f"{label}: a process exited early\n{c.tail(logs[0])}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: the clients did not all register within 300 s")
            time.sleep(0.2)
        time.sleep(settle)
        totals = [proc_memory(p.pid) for p in client_procs]
    return sum(t[0] for t in totals), sum(t[1] for t in totals), len(client_procs)


@click.command()
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=c.DEFAULT_DATA_ROOT)
@click.option("--clients", type=click.IntRange(2), default=10, help="K: clients in each layout.")
@click.option("--settle", type=float, default=2.0, help="Seconds to wait after the last registration.")
def main(data_root: Path, clients: int, settle: float) -> None:
    """Print the idle memory of K client processes and of one K-shard client host."""
    c.setup_logging()
    print(c.machine_line())
    with c.temp_dir("genfl-bench-host-") as work, c.ProcessGroup() as procs:
        shards = work / "shards"
        part = procs.start("partition", [c.tool("genfl-partition"), "--dataset", "mnist", "--data-root",
                                         str(data_root), "--clients", str(clients), "--iid", "--train-subset",
                                         str(100 * clients), "--seed", "0", "--out", str(shards),
                                         "--log-level", "WARNING"], work / "partition.log")
        if part.wait(120) != 0:
            raise RuntimeError(f"genfl-partition failed\n{c.tail(work / 'partition.log')}")
        sep_rss, sep_pss, n_sep = idle_memory("separate", [[i] for i in range(clients)], shards, clients, work,
                                              settle)
        host_rss, host_pss, n_host = idle_memory("host", [list(range(clients))], shards, clients, work, settle)
    c.result(f"{clients} clients, {n_sep} processes: total VmRSS", sep_rss / c.MB, "MB")
    c.result(f"{clients} clients, {n_sep} processes: total Pss", sep_pss / c.MB, "MB")
    c.result(f"{clients} clients, {n_host} host process: VmRSS", host_rss / c.MB, "MB")
    c.result(f"{clients} clients, {n_host} host process: Pss", host_pss / c.MB, "MB")
    c.result("Pss saved by the host (separate / host)", sep_pss / host_pss, "x")
    c.result("Pss per extra client in the host", (host_pss - sep_pss / clients) / (clients - 1) / c.MB, "MB")


if __name__ == "__main__":
    main()
