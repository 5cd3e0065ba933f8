"""A small deterministic run (real server, real clients) and the numbers it reports: every value
of metrics.jsonl except wall times. ``python tests/deterministic_numbers.py`` records them in
tests/data/deterministic_numbers.json; test_rounds.py checks that today's code reports exactly
those numbers (the evaluation riding on the next round's training must not change a bit)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import dataset_dir  # noqa: E402
from helpers import free_port, run_rounds  # noqa: E402

from genfl_shared.runfiles import METRICS_JSONL, read_events  # noqa: E402

RECORDED = Path(__file__).resolve().parent / "data" / "deterministic_numbers.json"
CLIENTS = 3
SERVER_ARGS = ["--phase", "all", "--clients", str(CLIENTS), "--cvae-rounds", "2", "--classifier-rounds", "3",
               "--synthetic-samples", "300", "--cas-epochs", "1", "--pretrain-epochs", "1", "--seed", "5",
               "--deterministic", "--threads", "1", "--dataset", "mnist"]
WALL_TIMES = {"seconds", "train_seconds"}


def numbers(events: list[dict]) -> list[dict]:
    """The events without their wall times (which no run repeats)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in WALL_TIMES}
        return value
    return [strip(e) for e in events]


def deterministic_run(work: Path) -> list[dict]:
    """Partition, run server + CLIENTS clients to completion; returns metrics.jsonl's numbers."""
    shards, out = work / "shards", work / "run"
    part = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                           "--data-root", str(dataset_dir("mnist")), "--clients", str(CLIENTS), "--alpha", "0.5",
                           "--train-subset", "600", "--seed", "0", "--out", str(shards)],
                          capture_output=True, text=True, timeout=120)
    assert part.returncode == 0, part.stderr
    address = f"127.0.0.1:{free_port()}"
    logs = [open(work / "server.log", "w")] + [open(work / f"client-{i}.log", "w") for i in range(CLIENTS)]
    server = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", *SERVER_ARGS, "--test-data",
                               str(dataset_dir("mnist")), "--address", address, "--out", str(out)],
                              stdout=logs[0], stderr=subprocess.STDOUT)
    clients = [subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", address, "--shard",
                                 str(shards / f"client-00{i}.npz"), "--threads", "1"],
                                stdout=logs[1 + i], stderr=subprocess.STDOUT) for i in range(CLIENTS)]
    try:
        assert server.wait(600) == 0, (work / "server.log").read_text()[-3000:]
        assert [c.wait(60) for c in clients] == [0] * CLIENTS
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs:
            f.close()
    assert len(run_rounds(out)) == 5
    return numbers(read_events(out / METRICS_JSONL))


def platform_key() -> dict:
    """What the recorded floats depend on besides the code."""
    return {"torch": torch.__version__, "machine": platform.machine()}


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        events = deterministic_run(Path(work))
    RECORDED.write_text(json.dumps({"platform": platform_key(), "events": events}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(events)} events in {RECORDED}")
