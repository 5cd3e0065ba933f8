"""A small deterministic run (real server, real clients) and the numbers it reports: every value
of metrics.jsonl except wall times. ``python tests/deterministic_numbers.py`` records them in
tests/data/deterministic_numbers.json for this platform; test_rounds.py checks that today's code
reports exactly those numbers (the evaluation riding on the next round's training must not change a
bit).

The floats depend on the CPU's vector width (float32 sums round differently with AVX2 and AVX-512),
so recordings are kept per platform (torch, machine type, vector width, AVX512-FP16). Each was
recorded with the code of the first recording (the evaluation then had a step of its own), so a
match means that code's numbers, bit for bit."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import dataset_dir  # noqa: E402
from helpers import free_port, kill_all, partition_mnist, run_rounds, start_client  # noqa: E402

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
    shards, out = partition_mnist(work / "shards", CLIENTS, 600, alpha=0.5), work / "run"
    address = f"127.0.0.1:{free_port()}"
    with open(work / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "genfl_server.cli", *SERVER_ARGS, "--test-data",
                                   str(dataset_dir("mnist")), "--address", address, "--out", str(out)],
                                  stdout=server_log, stderr=subprocess.STDOUT)
    clients = [start_client(address, shards / f"client-00{i}.npz", work / f"client-{i}.log") for i in range(CLIENTS)]
    try:
        assert server.wait(600) == 0, (work / "server.log").read_text()[-3000:]
        assert [c.wait(60) for c in clients] == [0] * CLIENTS
    finally:
        kill_all([server, *clients])
    assert len(run_rounds(out)) == 5
    return numbers(read_events(out / METRICS_JSONL))


def platform_key() -> dict:
    """What the recorded floats depend on besides the code."""
    key = {"torch": torch.__version__, "machine": platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if key["cpu_capability"] == "AVX512":
        # Two AVX-512 machines gave float32 sums differing in the 7th digit: the one with
        # AVX512-FP16 (Sapphire Rapids and later; oneDNN picks other kernels there) has its own recording.
        key["avx512_fp16"] = _has_cpu_flag("avx512_fp16")
    return key


def _has_cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)
    except OSError:
        return False


def recorded_events(platform_now: dict) -> list[dict] | None:
    """The numbers recorded for this platform: the most specific recording whose every key matches."""
    recordings = json.loads(RECORDED.read_text())["recordings"]
    matching = [r for r in recordings if all(platform_now.get(k) == v for k, v in r["platform"].items())]
    return max(matching, key=lambda r: len(r["platform"]))["events"] if matching else None


def recorded_platforms() -> list[dict]:
    return [r["platform"] for r in json.loads(RECORDED.read_text())["recordings"]]


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        events = deterministic_run(Path(work))
    key = platform_key()
    recordings = [r for r in json.loads(RECORDED.read_text())["recordings"] if r["platform"] != key]
    recordings.append({"platform": key, "events": events})
    RECORDED.write_text(json.dumps({"recordings": recordings}, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(events)} events for {key} in {RECORDED}")
