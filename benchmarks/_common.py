"""Helpers shared by the benchmark scripts: result lines, statistics, subprocess hygiene.

Not a benchmark itself. Every script imports it as ``_common`` (``python benchmarks/x.py`` puts
``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = (REPO_ROOT / ".." / "shared" / "data" / "mnist").resolve()
VENV_BIN = Path(sys.executable).parent

log = logging.getLogger("bench")

MB = 1e6
GB = 1e9


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), like numpy's default."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def result(name: str, value: float, unit: str, *, target: float | None = None, lower_is_better: bool = True,
           extra: str = "") -> bool | None:
    """Print one result line: ``name  value unit  target  PASS/MISS``; returns pass/miss (None: context)."""
    if target is None:
        verdict, tgt = "", "(context)"
        ok = None
    else:
        ok = value < target if lower_is_better else value > target
        verdict = "PASS" if ok else "MISS"
        tgt = f"target {'<' if lower_is_better else '>'} {target:g} {unit}"
    line = f"{name:<58} {value:>10.4g} {unit:<8} {tgt:<24} {verdict}"
    if extra:
        line += f"  {extra}"
    print(line, flush=True)
    return ok


def machine_line() -> str:
    import platform

    import torch
    return (f"# {time.strftime('%Y-%m-%d %H:%M')} | {platform.processor() or platform.machine()} | "
            f"{os.cpu_count()} CPUs | torch {torch.__version__}, {torch.get_num_threads()} threads | "
            f"load avg {os.getloadavg()[0]:.2f}")


def tool(name: str) -> str:
    """Path of a console script installed in the current venv (falls back to PATH)."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


def has_tool(name: str) -> bool:
    import shutil
    return (VENV_BIN / name).exists() or shutil.which(name) is not None


@contextlib.contextmanager
def temp_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            log.info("kept %s", path)
        else:
            import shutil
            shutil.rmtree(path, ignore_errors=True)


class ProcessGroup:
    """Subprocesses started by a benchmark; ``stop_all`` terminates (then kills) every one still
    running. Each child runs in its own session, so its own children go with it."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
        log.debug("starting %s: %s", name, " ".join(argv))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log_path, "wb")
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=kwargs.pop("cwd", REPO_ROOT),
                                start_new_session=True, **kwargs)
        handle.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self, timeout: float = 5.0) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_all(procs: Sequence[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{what} did not finish within {timeout:.0f} s") from None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running (or not yet reaped) process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int | None:
    """Minor page faults of a running process so far (fresh pages it touched); None once it is gone.
    Unlike CPU time, hardly moved by other load on the machine."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return None


class CpuTracker:
    """Last-seen CPU seconds of some processes: call ``sample()`` before reaping them."""

    def __init__(self, procs: Sequence[subprocess.Popen]):
        self.procs = list(procs)
        self.seconds = {p.pid: 0.0 for p in self.procs}

    def sample(self) -> None:
        for proc in self.procs:
            value = cpu_seconds(proc.pid)
            if value is not None:
                self.seconds[proc.pid] = value

    def wait(self, timeout: float, what: str, interval: float = 0.05, on_sample=None) -> None:
        """Sample until every process exits (a process is sampled before it is reaped);
        ``on_sample()`` runs after each sample."""
        deadline = time.monotonic() + timeout
        while True:
            self.sample()
            if on_sample is not None:
                on_sample()
            if all(p.poll() is not None for p in self.procs):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
            time.sleep(interval)

    def total(self, procs: Sequence[subprocess.Popen] | None = None) -> float:
        return sum(self.seconds[p.pid] for p in (self.procs if procs is None else procs))

    def snapshot(self) -> dict[int, float]:
        return dict(self.seconds)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"
