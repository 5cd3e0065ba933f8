"""Pure overhead of a federated round: 10 real client processes that do no training.

Partitions MNIST into 10 tiny IID shards (``--train-subset 1000``: 90 train / 10 held-out images
per client), starts a real ``genfl-server --local-epochs 0 --threads 1`` and 10 real
``genfl-client --threads 1`` processes on this machine. With zero local epochs a client echoes
the weights back unchanged, so a round is all protocol and bookkeeping: one broadcast, each
client's (tiny) held-out evaluation of the received model (round r's evaluation rides on round
r + 1's TRAIN task; only the last round has an EVALUATE step of its own), the upload, FedAvg and
the replies. Per-round ``seconds`` come from the server's OUT/metrics.jsonl.

Reports median and p90 seconds per round for the CVAE (4.29 MB) and for ExquisiteNetV1
(``--phase classifier --no-pretrain``, 3.73 MB). Target: median < 0.3 s. For comparison, Flower
with 10 echo clients needs 9-17 s per round on this machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

import _common as c
from genfl_shared.runfiles import METRICS_JSONL, round_events, wait_for_endpoint

TARGET_SECONDS = 0.3


def make_shards(data_root: Path, clients: int, out: Path, procs: c.ProcessGroup) -> Path:
    shards = out / "shards"
    part = procs.start("partition", [c.tool("genfl-partition"), "--dataset", "mnist", "--data-root", str(data_root),
                                     "--clients", str(clients), "--iid", "--train-subset", str(100 * clients),
                                     "--seed", "0", "--out", str(shards), "--log-level", "WARNING"],
                       out / "partition.log")
    if part.wait(120) != 0:
        raise RuntimeError(f"genfl-partition failed\n{c.tail(out / 'partition.log')}")
    return shards


def run_phase(label: str, server_args: list[str], shards: Path, clients: int, rounds: int, work: Path) -> list[dict]:
    out = work / label
    with c.ProcessGroup() as procs:
        server = procs.start("server", [c.tool("genfl-server"), *server_args, "--clients", str(clients),
                                        "--rounds", str(rounds), "--local-epochs", "0", "--threads", "1",
                                        "--address", "127.0.0.1:0", "--out", str(out), "--log-level", "warning"],
                             work / f"{label}-server.log")
        address = wait_for_endpoint(out, 60, [server])["address"]
        client_procs = [procs.start(f"client-{i}", [c.tool("genfl-client"), "--server", address,
                                                    "--shard", str(shards / f"client-{i:03d}.npz"),
                                                    "--threads", "1", "--log-level", "warning"],
                                    work / f"{label}-client-{i}.log")
                        for i in range(clients)]
        started = time.perf_counter()
        cpu = c.CpuTracker([server, *client_procs])
        metrics = out / METRICS_JSONL
        marks: dict[int, tuple[float, dict[int, float]]] = {}  # rounds done -> (time, CPU seconds)

        def mark() -> None:
            # CPU at the end of round 1 and of the last round: the steady state, without start-up.
            done = len(round_events(metrics))
            if done in (1, rounds) and done not in marks:
                marks[done] = (time.perf_counter(), cpu.snapshot())

        try:
            cpu.wait(600, f"the {label} run", interval=0.01, on_sample=mark)
        except TimeoutError:
            raise RuntimeError(f"{label}: run timed out\n{c.tail(work / f'{label}-server.log')}") from None
        wall = time.perf_counter() - started
        if server.returncode != 0 or any(p.returncode != 0 for p in client_procs):
            raise RuntimeError(f"{label}: server exit {server.returncode}, client exits "
                               f"{[p.returncode for p in client_procs]}\n{c.tail(work / f'{label}-server.log')}")
    records = round_events(metrics)
    if len(records) != rounds:
        raise RuntimeError(f"{label}: {len(records)} round records, expected {rounds}")
    print(f"  {label}: {rounds} rounds, process start to exit {wall:.1f} s; per-round s: "
          + " ".join(f"{r['seconds']:.3f}" for r in records), flush=True)
    if 1 in marks and rounds in marks:
        (t0, cpu0), (t1, cpu1) = marks[1], marks[rounds]
        n = rounds - 1
        server_cpu = (cpu1[server.pid] - cpu0[server.pid]) / n
        client_cpu = sum(cpu1[p.pid] - cpu0[p.pid] for p in client_procs) / n
        print(f"  {label}: CPU per round (rounds 2-{rounds}): server {server_cpu:.3f} s, {len(client_procs)} clients "
              f"{client_cpu:.3f} s, total {server_cpu + client_cpu:.3f} CPU-s per {(t1 - t0) / n:.3f} s of wall "
              f"time (machine: {os.cpu_count()} CPUs)", flush=True)
    return records


@click.command(context_settings={"show_default": True})
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=c.DEFAULT_DATA_ROOT, help="MNIST IDX files.")
@click.option("--clients", type=click.IntRange(1), default=10)
@click.option("--rounds", type=click.IntRange(2), default=20)
@click.option("--phase", "phases", type=click.Choice(["cvae", "classifier"]), multiple=True,
              default=("cvae", "classifier"), help="Which models to time (repeatable).")
@click.option("--keep", is_flag=True, help="Keep the temp folder (logs, metrics).")
@click.option("-v", "--verbose", is_flag=True)
def main(data_root: Path, clients: int, rounds: int, phases: tuple[str, ...], keep: bool, verbose: bool) -> None:
    """Seconds per round with CLIENTS real clients and no local training."""
    c.setup_logging(verbose)
    print(c.machine_line())
    args = {"cvae": ["--phase", "cvae"], "classifier": ["--phase", "classifier", "--no-pretrain"]}
    names = {"cvae": "CVAE 4.29 MB", "classifier": "ExquisiteNetV1 3.73 MB"}
    with c.temp_dir("genfl-bench-overhead-", keep) as tmp:
        with c.ProcessGroup() as procs:
            shards = make_shards(data_root, clients, tmp, procs)
        summary = []
        for phase in phases:
            records = run_phase(phase, args[phase], shards, clients, rounds, tmp)
            summary.append((phase, [r["seconds"] for r in records]))
    for phase, seconds in summary:
        steady = seconds[1:]  # round 1 includes the clients' one-time set-up
        c.result(f"round overhead {names[phase]}, {clients} clients, median", c.median(seconds), "s",
                 target=TARGET_SECONDS)
        c.result(f"round overhead {names[phase]}, {clients} clients, p90", c.percentile(seconds, 90), "s",
                 target=TARGET_SECONDS)
        c.result(f"  (round 1 / median of rounds 2-{len(seconds)})", seconds[0], "s",
                 extra=f"{c.median(steady):.3f} s")


if __name__ == "__main__":
    main()
