"""One server, many clients: what each client costs the server per round.

Starts a real ``genfl-server --phase cvae --rounds R --clients M --local-epochs 0 --threads 1`` and
M fake clients (``fake_clients.py``: asyncio + grpc.aio, no torch, spread over a few processes)
that speak the real protocol: register, long-poll, download each task's weights and echo them back
as the update (valid manifest and digest), answer evaluations, exit at SHUTDOWN. For each M:

  * seconds per round: median of the server's round records (OUT/metrics.jsonl, ``seconds``);
  * server CPU seconds per round per client: the server's user+system CPU (/proc) between the end
    of round 1 and the end of the last round (the steady state, without start-up and registration),
    over the rounds in between and M;
  * server minor page faults per round per client, over the same rounds (/proc): fresh memory the
    server touched, a load-independent sign of per-message allocations;
  * server peak RSS (VmHWM just before it exits) and the most threads seen (/proc, 20 ms poll);
  * weight bytes per client per round, counted by the fake clients (downloads + uploads).

The clients share the machine's cores with the server, so a round's wall time includes their
work; the CPU line is the server's alone.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from pathlib import Path

import click

import _common as c
from fake_clients import ClientProcesses
from genfl_shared.runfiles import METRICS_JSONL, round_events, wait_for_endpoint


def _status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                fields[name] = int(value.split()[0])
    return fields


def _machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        jiffies = [int(x) for x in f.readline().split()[1:]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")


class ServerWatch(threading.Thread):
    """Polls the server every 20 ms: peak RSS, most threads, and its CPU seconds at the moment each
    round's record appears in metrics.jsonl; with them the fake clients' CPU seconds and the whole
    machine's busy CPU seconds (what else a round's wall time went to)."""

    def __init__(self, pid: int, metrics: Path):
        super().__init__(daemon=True)
        self.pid, self.metrics = pid, metrics
        self.client_pids: list[int] = []
        self.peak_hwm_kb = self.max_threads = 0
        self.cpu_at_round: dict[int, float] = {}
        self.faults_at_round: dict[int, int] = {}
        self.client_cpu_at_round: dict[int, float] = {}
        self.machine_busy_at_round: dict[int, float] = {}
        self.time_at_round: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            cpu = c.cpu_seconds(self.pid)
            faults = c.minor_faults(self.pid)
            try:
                status = _status(self.pid)
            except OSError:
                return
            if cpu is None or faults is None:
                return
            self.peak_hwm_kb = max(self.peak_hwm_kb, status.get("VmHWM", 0))
            self.max_threads = max(self.max_threads, status.get("Threads", 0))
            done = len(round_events(self.metrics))
            if done and done not in self.cpu_at_round:
                self.cpu_at_round[done] = cpu
                self.faults_at_round[done] = faults
                self.client_cpu_at_round[done] = sum(c.cpu_seconds(p) or 0.0 for p in self.client_pids)
                self.machine_busy_at_round[done] = _machine_busy_seconds()
                self.time_at_round[done] = time.monotonic()
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(clients: int, rounds: int, processes: int, work: Path, profile_dir: Path | None = None,
            server_args: tuple[str, ...] = ()) -> dict:
    out = work / "server"
    with c.ProcessGroup() as procs:
        server = procs.start("server", [c.tool("genfl-server"), "--phase", "cvae", "--rounds", str(rounds),
                                        "--clients", str(clients), "--local-epochs", "0", "--threads", "1",
                                        "--address", "127.0.0.1:0", "--out", str(out), "--log-level", "warning",
                                        *server_args],
                             work / "server.log")
        address = wait_for_endpoint(out, 60, [server])["address"]
        watch = ServerWatch(server.pid, out / METRICS_JSONL)
        watch.start()
        if profile_dir is not None:  # py-spy samples every thread (cProfile sees only the main one)
            profile_dir.mkdir(parents=True, exist_ok=True)
            spy = procs.start("py-spy", [c.tool("py-spy"), "record", "--pid", str(server.pid), "--format", "raw",
                                   "--rate", "50", "--nonblocking", "-o", str(profile_dir / f"server-m{clients}.txt")],
                        work / "py-spy.log")
        fakes = ClientProcesses(address, clients, processes)
        watch.client_pids = fakes.pids
        started = time.perf_counter()
        try:
            stats = fakes.join(timeout=600 + 5 * clients)
        finally:
            fakes.stop()
        wall = time.perf_counter() - started
        if not stats.error:
            c.wait_all([server], 60, "the server")
            if profile_dir is not None:
                c.wait_all([spy], 60, "py-spy (writing its profile)")
        watch.stop()
    if stats.error or server.returncode != 0:
        raise RuntimeError(f"M = {clients}: server exit {server.returncode}; client errors: {stats.error}\n"
                           f"{c.tail(work / 'server.log')}")
    records = round_events(out / METRICS_JSONL)
    if len(records) != rounds or len(watch.cpu_at_round) < 2:
        raise RuntimeError(f"M = {clients}: {len(records)} round records, CPU seen at {sorted(watch.cpu_at_round)}")
    last = max(watch.cpu_at_round)
    steady_cpu = (watch.cpu_at_round[last] - watch.cpu_at_round[1]) / (last - 1)
    steady_faults = (watch.faults_at_round[last] - watch.faults_at_round[1]) / (last - 1)
    steady_client_cpu = (watch.client_cpu_at_round[last] - watch.client_cpu_at_round[1]) / (last - 1)
    steady_busy = (watch.machine_busy_at_round[last] - watch.machine_busy_at_round[1]) / (last - 1)
    steady_seconds = (watch.time_at_round[last] - watch.time_at_round[1]) / (last - 1)
    return {"clients": clients, "round_seconds": c.median([r["seconds"] for r in records]),
            "round_seconds_all": [r["seconds"] for r in records], "wall": wall,
            "cpu_per_round": steady_cpu, "cpu_per_round_per_client": steady_cpu / clients,
            "faults_per_round_per_client": steady_faults / clients,
            "client_cpu_per_round": steady_client_cpu, "machine_busy_per_round": steady_busy,
            "machine_busy_share": steady_busy / (steady_seconds * (os.cpu_count() or 1)),
            "peak_rss_mb": watch.peak_hwm_kb * 1024 / c.MB, "threads": watch.max_threads,
            "bytes_per_client_round": (stats.bytes_received + stats.bytes_sent) / clients / rounds,
            "tasks": stats.tasks}


@click.command(context_settings={"show_default": True})
@click.option("--clients", "client_counts", default="10,100,500,1000",
              help="Comma-separated client counts M, one server run each.")
@click.option("--rounds", type=click.IntRange(2), default=3)
@click.option("--processes", type=click.IntRange(1), default=4, help="Processes the fake clients run in.")
@click.option("--keep", is_flag=True, help="Keep the temp folder (server logs).")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Record the server with py-spy (pip install py-spy) into DIR/server-mM.txt (collapsed stacks).")
@click.option("--server-args", default="", help="More genfl-server options, one string (shell-split), e.g. "
              "'--max-concurrent-uploads 4'.")
@click.option("-v", "--verbose", is_flag=True)
def main(client_counts: str, rounds: int, processes: int, keep: bool, profile_dir: Path | None,
         server_args: str, verbose: bool) -> None:
    """Seconds per round and the server's CPU, memory, threads and traffic with M fake clients."""
    c.setup_logging(verbose)
    print(c.machine_line())
    if server_args:
        print(f"server options: {server_args}")
    counts = [int(x) for x in client_counts.split(",") if x.strip()]
    with c.temp_dir("genfl-bench-many-", keep) as tmp:
        for clients in counts:
            run = measure(clients, rounds, processes, tmp / f"m{clients}", profile_dir, tuple(shlex.split(server_args)))
            label = f"M = {clients}"
            c.result(f"{label}: seconds per round (server record, median)", run["round_seconds"], "s",
                     extra="rounds: " + ", ".join(f"{s:.2f}" for s in run["round_seconds_all"]))
            c.result(f"{label}: server CPU per round", run["cpu_per_round"], "CPU-s")
            c.result(f"{label}: server CPU per round per client", run["cpu_per_round_per_client"] * 1e3, "CPU-ms")
            c.result(f"{label}: fake clients' CPU per round (all processes)", run["client_cpu_per_round"], "CPU-s")
            c.result(f"{label}: machine busy CPU per round (every process)", run["machine_busy_per_round"], "CPU-s",
                     extra=f"{run['machine_busy_share']:.0%} of {os.cpu_count()} cores")
            c.result(f"{label}: server minor page faults per round per client",
                     run["faults_per_round_per_client"], "faults")
            c.result(f"{label}: server peak RSS", run["peak_rss_mb"], "MB")
            c.result(f"{label}: server threads (most seen)", run["threads"], "threads")
            c.result(f"{label}: weight bytes per client per round", run["bytes_per_client_round"] / c.MB, "MB",
                     extra=f"tasks: {run['tasks']}, wall {run['wall']:.1f} s")


if __name__ == "__main__":
    main()
