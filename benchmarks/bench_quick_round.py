"""Seconds per round of a real run at the ``quick`` preset: 10 clients, MNIST, alpha = 0.1.

Runs ``genfl-launch --dataset mnist --data-root DATA --clients 10 --alpha 0.1 --out TMP`` (the
quick preset: 10,000 training images, 10 CVAE rounds, synthetic pre-training, 5 classifier rounds,
2 local epochs, server-side test evaluation each round). Without ``genfl-launch`` (or with
``--direct``) it drives ``genfl-partition`` / ``genfl-server --preset quick --phase all`` /
10 x ``genfl-client --threads 1`` itself with the same settings.

Reports the median (and p90) seconds per round of each federated phase from OUT/metrics.jsonl, the
server-side steps (synthetic sampling, CAS, pre-training) and the total wall time. Targets are
informational: the quick preset is meant to finish in minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

import _common as c
from genfl_shared.runfiles import METRICS_JSONL, read_events, wait_for_endpoint

PHASES = ("cvae", "classifier")


def run_launch(data_root: Path, clients: int, alpha: float, out: Path, procs: c.ProcessGroup,
               timeout: float) -> None:
    proc = procs.start("launch", [c.tool("genfl-launch"), "--dataset", "mnist", "--data-root", str(data_root),
                                  "--clients", str(clients), "--alpha", str(alpha), "--out", str(out / "run"),
                                  "--log-level", "warning"], out / "launch.log")
    try:
        c.wait_all([proc], timeout, "genfl-launch")
    except TimeoutError:
        raise RuntimeError(f"genfl-launch timed out\n{c.tail(out / 'launch.log')}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"genfl-launch exited with {proc.returncode}\n{c.tail(out / 'launch.log')}")


def run_direct(data_root: Path, clients: int, alpha: float, out: Path, procs: c.ProcessGroup,
               timeout: float) -> None:
    from genfl_shared.config import PRESETS

    quick = PRESETS["quick"]
    shards = out / "shards"
    part = procs.start("partition", [c.tool("genfl-partition"), "--dataset", "mnist", "--data-root", str(data_root),
                                     "--clients", str(clients), "--alpha", str(alpha), "--seed", "0",
                                     "--train-subset", str(quick.data.train_subset), "--out", str(shards),
                                     "--log-level", "WARNING"], out / "partition.log")
    if part.wait(120) != 0:
        raise RuntimeError(f"genfl-partition failed\n{c.tail(out / 'partition.log')}")
    run = out / "run"
    server = procs.start("server", [c.tool("genfl-server"), "--preset", "quick", "--phase", "all",
                                    "--clients", str(clients), "--seed", "0", "--dataset", "mnist",
                                    "--test-data", str(data_root), "--partition-info", str(shards / "partition.json"),
                                    "--address", "127.0.0.1:0", "--out", str(run), "--log-level", "warning"],
                         out / "server.log")
    address = wait_for_endpoint(run, 60, [server])["address"]
    client_procs = [procs.start(f"client-{i}", [c.tool("genfl-client"), "--server", address, "--shard",
                                                str(shards / f"client-{i:03d}.npz"), "--threads", "1",
                                                "--log-level", "warning"], out / f"client-{i}.log")
                    for i in range(clients)]
    try:
        c.wait_all([server], timeout, "the run")
    except TimeoutError:
        raise RuntimeError(f"the run timed out\n{c.tail(out / 'server.log')}") from None
    c.wait_all(client_procs, 30, "the clients")
    if server.returncode != 0:
        raise RuntimeError(f"server exited with {server.returncode}\n{c.tail(out / 'server.log')}")


@click.command(context_settings={"show_default": True})
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=c.DEFAULT_DATA_ROOT, help="MNIST IDX files.")
@click.option("--clients", type=click.IntRange(1), default=10)
@click.option("--alpha", type=float, default=0.1, help="Dirichlet concentration.")
@click.option("--direct", is_flag=True, help="Drive partition/server/clients directly even if genfl-launch exists.")
@click.option("--timeout", type=float, default=900, help="Give up after this many seconds.")
@click.option("--keep", is_flag=True, help="Keep the temp folder (logs, metrics).")
@click.option("-v", "--verbose", is_flag=True)
def main(data_root: Path, clients: int, alpha: float, direct: bool, timeout: float, keep: bool,
         verbose: bool) -> None:
    """Seconds per round (per phase) and total wall time of a quick-preset run."""
    c.setup_logging(verbose)
    print(c.machine_line())
    use_launch = not direct and c.has_tool("genfl-launch")
    with c.temp_dir("genfl-bench-quick-", keep) as tmp:
        started = time.perf_counter()
        with c.ProcessGroup() as procs:
            (run_launch if use_launch else run_direct)(data_root, clients, alpha, tmp, procs, timeout)
        wall = time.perf_counter() - started
        events = read_events(tmp / "run" / METRICS_JSONL)
        summary = json.loads((tmp / "run" / "summary.json").read_text())
    how = "genfl-launch" if use_launch else "partition/server/clients"
    print(f"  driven by {how}; {clients} clients, alpha {alpha}, preset quick", flush=True)
    for phase in PHASES:
        seconds = [e["seconds"] for e in events if e.get("event") == "round" and e["phase"] == phase]
        if not seconds:
            continue
        print(f"  {phase} rounds s: " + " ".join(f"{s:.2f}" for s in seconds), flush=True)
        c.result(f"quick {phase} round, {clients} clients, median ({len(seconds)} rounds)", c.median(seconds), "s",
                 extra=f"p90 {c.percentile(seconds, 90):.2f} s, sum {sum(seconds):.1f} s")
    for event in events:
        if event.get("event") in ("synthetic", "cas", "pretrain"):
            c.result(f"quick server-side {event['event']}", event["seconds"], "s")
    final = summary.get("final") or {}
    if final.get("test_accuracy") is not None:
        c.result("quick final test accuracy (context)", final["test_accuracy"], "")
    c.result(f"quick total wall time ({how}, incl. partition)", wall, "s")


if __name__ == "__main__":
    main()
