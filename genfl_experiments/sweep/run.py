"""Running a sweep's cells: each one a real server with real client processes, several at a time.

A cell is finished when its folder holds ``cell.json`` (written only after the run succeeded) and
every cell it depends on is finished too; finished cells are skipped on a re-run, so a sweep that
was interrupted or extended (more seeds, more alphas, more arms) continues where it stopped. A
federated cell that was interrupted mid-run continues from its last finished round (the server's
``--resume``), unless a cell it depends on was re-run since.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from genfl_server.runstate import FILE_NAME as RUN_STATE_FILE
from genfl_shared.config import GENERATOR_FIELDS, RunConfig, argv_for
from genfl_shared.partition import PARTITION_JSON, partition_dataset, shard_file_name
from genfl_shared.runfiles import read_json, write_json_atomic

from ..centralised import CENTRALISED_FIELDS
from ..launch import Launcher, LaunchError, Stage, child_env, log_tail, pct, resolve_clients_per_process
from .plan import Cell

log = logging.getLogger("genfl_sweep")

CELL_MARKER = "cell.json"
INPUTS_FILE = "inputs.json"  # what the current attempt was started with (arguments, dependencies' runs)
ELAPSED_FILE = "elapsed.json"


@dataclass
class SweepSettings:
    dataset: str
    data_root: Path
    preset: str
    config: RunConfig  # the sweep's settings; seed, strategy and pretrain are each cell's
    device: str = "cpu"
    client_threads: int = 1
    clients_per_process: int | None = None  # None: the default for the device (launch.resolve_clients_per_process)
    server_threads: int = 0
    cell_timeout: float | None = None
    log_level: str = "info"


    @property
    def clients(self) -> int:
        return self.config.data.clients

    @property
    def train_subset(self) -> int | None:
        return self.config.data.train_subset


# The settings every server of a sweep is given (in sweep.json's "fixed": cells mean the same).
FIXED_SERVER_FIELDS = ("cvae_rounds", "classifier_rounds", "local_epochs", "cvae_local_epochs", "synthetic_samples",
                       "cas_epochs", "pretrain_epochs", "prox_mu", "fedavgm_momentum", "fedavgm_lr")


def generator_args(config: RunConfig) -> list[str]:
    """The CVAE phase's generator options of every cell (none for the poster's FedAvg CVAE, so that
    a sweep recorded before they existed resumes with the same argv)."""
    return [] if config.generator.cvae_aggregation == "fedavg" else config.to_argv(GENERATOR_FIELDS)


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)  # a dependency failed


def current_inputs(cell: Cell, cells: dict[str, Cell]) -> dict | None:
    """{dependency key: {"path": its folder relative to the cell's, "run_id": its finished run}},
    or None while a dependency is unfinished. A cell built from other inputs is out of date."""
    inputs = {}
    for key in cell.deps:
        marker = read_json(cells[key].out / CELL_MARKER)
        if marker is None:
            return None
        inputs[key] = {"path": os.path.relpath(cells[key].out, cell.out), "run_id": marker["run_id"]}
    return inputs


def cell_args(cell: Cell) -> list[str]:
    """The options that make a federated cell's server this cell's run (after the sweep's own);
    a centralised cell has none (its trainer takes the sweep's settings only)."""
    if cell.kind == "centralised":
        return []
    args = ["--phase", cell.kind, *argv_for(**cell.settings)]
    if cell.pretrained_checkpoint is not None:
        args += ["--pretrained-checkpoint", str(cell.pretrained_checkpoint)]
    if cell.cvae_checkpoint is not None:
        args += ["--cvae-checkpoint", str(cell.cvae_checkpoint)]
    return args


def recorded_args(cell: Cell, cells: dict[str, Cell]) -> list[str]:
    """The cell's arguments as its folder records them: a path into a dependency's folder (a checkpoint)
    relative to the cell's own, so a sweep folder that was moved or copied whole still resumes."""
    dep_folders = [str(cells[key].out) + os.sep for key in cell.deps]
    return [os.path.relpath(arg, cell.out) if any(arg.startswith(f) for f in dep_folders) else arg
            for arg in cell_args(cell)]


def same_args(recorded: list[str] | None, cell: Cell, cells: dict[str, Cell]) -> bool:
    """Whether a cell's folder was run with the arguments the plan gives it now (a finished cell is
    resumed or skipped by this comparison)."""
    # Folders written before arguments were recorded relative hold them as given (absolute paths).
    return recorded is not None and recorded in (recorded_args(cell, cells), cell_args(cell))


def is_finished(cell: Cell, cells: dict[str, Cell], _memo: dict[str, bool] | None = None) -> bool:
    """Finished with the arguments the plan gives it now, from its dependencies' current results."""
    memo = {} if _memo is None else _memo
    if cell.key not in memo:
        marker = read_json(cell.out / CELL_MARKER)
        memo[cell.key] = (marker is not None and same_args(marker.get("args"), cell, cells)
                          and all(is_finished(cells[d], cells, memo) for d in cell.deps)
                          and marker.get("inputs") == current_inputs(cell, cells))
    return memo[cell.key]


class SweepRunner:
    def __init__(self, settings: SweepSettings, cells: list[Cell], *, parallel: int):
        self.settings = settings
        self.cells = {c.key: c for c in cells}
        self.order = [c.key for c in cells]
        self.parallel = parallel
        self._group_locks: dict[Path, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._launchers: list[Launcher] = []
        self._processes: list[subprocess.Popen] = []
        # Guards _stopping together with the registries: a cell registers its launcher or process
        # under it, so stop() sees everything that started and nothing starts after it.
        self._registry = threading.Lock()
        self._stopping = threading.Event()

    # -- scheduling ---------------------------------------------------------------------------

    def run(self) -> SweepOutcome:
        outcome = SweepOutcome()
        memo: dict[str, bool] = {}
        done = {k for k in self.order if is_finished(self.cells[k], self.cells, memo)}
        outcome.skipped = [k for k in self.order if k in done]
        todo = [k for k in self.order if k not in done]
        if outcome.skipped:
            log.info("%d of %d cells already finished (skipped)", len(done), len(self.order))
        started = time.monotonic()
        running: dict[Future, str] = {}
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="cell") as pool:
            try:
                while todo or running:
                    for key in list(todo):
                        if len(running) >= self.parallel:
                            break
                        deps = self.cells[key].deps
                        if any(d in outcome.failed or d in outcome.not_run for d in deps):
                            todo.remove(key)
                            outcome.not_run.append(key)
                            log.error("%s: not run, a cell it needs failed", key)
                        elif all(d in done for d in deps):
                            todo.remove(key)
                            running[pool.submit(self._run_cell, self.cells[key])] = key
                    if not running:
                        continue
                    finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in finished:
                        key = running.pop(future)
                        error = future.exception()
                        if error is None:
                            done.add(key)
                            outcome.ran.append(key)
                            remaining = len(todo) + len(running)
                            log.info("[%d/%d] %s finished (%s); %d cells to go, %.0f s so far",
                                     len(done), len(self.order), key, future.result(), remaining,
                                     time.monotonic() - started)
                        else:
                            outcome.failed[key] = str(error)
                            log.error("%s failed: %s", key, error)
            except BaseException:
                self.stop()
                raise
        return outcome

    def stop(self) -> None:
        """Stop every running cell's processes (Ctrl-C); no cell starts a process after this."""
        with self._registry:
            self._stopping.set()
            launchers, processes = list(self._launchers), list(self._processes)
        for launcher in launchers:
            launcher.stop_all()
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # -- one cell -----------------------------------------------------------------------------

    def _run_cell(self, cell: Cell) -> str:
        if self._stopping.is_set():
            raise LaunchError("sweep stopping")
        inputs = current_inputs(cell, self.cells)
        # Resume only a run interrupted with these arguments and these inputs; anything else (a run
        # that saved no state, a finished run whose dependency was re-run since) starts afresh.
        attempt = read_json(cell.out / INPUTS_FILE) or {}
        resume = (cell.kind != "centralised" and (cell.out / RUN_STATE_FILE).exists()
                  and not (cell.out / CELL_MARKER).exists()
                  and same_args(attempt.get("args"), cell, self.cells) and attempt.get("inputs") == inputs)
        if not resume:
            if cell.out.exists():
                shutil.rmtree(cell.out)
            cell.out.mkdir(parents=True)
            write_json_atomic(cell.out / INPUTS_FILE, {"args": recorded_args(cell, self.cells), "inputs": inputs})
        started = time.monotonic()
        log.info("%s: %s", cell.key, "resuming from its last finished round" if resume else "starting")
        # Wall time over every attempt, so a resumed cell reports what it cost in total.
        elapsed_path = cell.out / ELAPSED_FILE
        earlier = json.loads(elapsed_path.read_text())["seconds"] if resume and elapsed_path.exists() else 0.0
        try:
            if cell.kind == "centralised":
                summary = self._run_centralised(cell)
            else:
                summary = self._run_federated(cell, resume)
        finally:
            if cell.out.exists():
                write_json_atomic(elapsed_path, {"seconds": earlier + time.monotonic() - started})
        if cell.kind == "centralised":
            result = f"CAS {pct(summary['cas'])}"
        else:
            final = summary.get("final") or {}
            result = (f"client acc {pct(final.get('weighted_client_accuracy'))}, "
                      f"test acc {pct(final.get('test_accuracy'))}")
            if summary.get("cas") is not None:
                result += f", CAS {pct(summary['cas'])}"
        seconds = earlier + time.monotonic() - started
        write_json_atomic(cell.out / CELL_MARKER, {
            "key": cell.key, "kind": cell.kind, "seed": cell.seed, "seconds": seconds,
            "dataset": self.settings.dataset, "preset": self.settings.preset, "device": self.settings.device,
            "alpha": None if cell.distribution is None else (cell.distribution.alpha or "iid"),
            "distribution": None if cell.distribution is None else cell.distribution.name,
            "arm": None if cell.arm is None else cell.arm.record(),
            "epsilon": None if cell.privacy is None else cell.privacy.marker,  # the privacy axis' level
            "args": recorded_args(cell, self.cells), "inputs": inputs, "run_id": uuid.uuid4().hex,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        return f"{result}, {seconds:.0f} s"

    def _shards(self, cell: Cell) -> list[Path]:
        """Partition the cell's (distribution, seed) once; every cell of the group shares it."""
        s = self.settings
        shard_dir = cell.group / "shards"
        with self._locks_guard:
            lock = self._group_locks.setdefault(cell.group, threading.Lock())
        with lock:
            wanted = {"dataset": s.dataset, "alpha": cell.distribution.alpha or "iid", "seed": cell.seed,
                      "num_clients": s.clients, "train_subset": s.train_subset}
            info_path = shard_dir / PARTITION_JSON
            info = json.loads(info_path.read_text()) if info_path.exists() else {}
            if {k: info.get(k) for k in wanted} != wanted:
                partition_dataset(s.dataset, s.data_root, s.clients, cell.distribution.alpha, cell.seed,
                                  shard_dir, train_subset=s.train_subset)
        return [shard_dir / shard_file_name(i) for i in range(s.clients)]

    def _run_federated(self, cell: Cell, resume: bool) -> dict:
        s = self.settings
        shards = self._shards(cell)
        server_args = ["--device", s.device, "--test-data", str(s.data_root), "--threads", str(s.server_threads),
                       "--log-level", s.log_level]
        if resume:  # everything else comes from the cell's saved run state
            server_args.append("--resume")
        else:
            server_args += ["--preset", s.preset, *argv_for(clients=s.clients, seed=cell.seed),
                            "--dataset", s.dataset, "--partition-info", str(cell.group / "shards" / PARTITION_JSON),
                            *s.config.to_argv(FIXED_SERVER_FIELDS), *generator_args(s.config), *cell_args(cell)]
        # A resumed server's argv does not say what its clients must share: the generator asks for
        # the label counts whatever the cell (harmless where unused).
        shared = [] if s.config.generator.cvae_aggregation == "fedavg" else ["--share-label-counts"]
        launcher = Launcher(shards, client_args=["--device", s.device, "--threads", str(s.client_threads),
                                                 "--log-level", s.log_level, *shared],
                            timeout=s.cell_timeout, progress_bar=False,
                            clients_per_process=resolve_clients_per_process(s.clients_per_process, s.device,
                                                                            s.clients))
        with self._registry:
            if self._stopping.is_set():
                raise LaunchError("sweep stopping")
            self._launchers.append(launcher)
        try:
            return launcher.run_stage(Stage(cell.key, cell.out, server_args, cell.rounds))
        finally:
            launcher.stop_all()
            self._launchers.remove(launcher)

    def _run_centralised(self, cell: Cell) -> dict:
        s = self.settings
        cell.out.mkdir(parents=True, exist_ok=True)
        log_path = cell.out / "logs" / "centralised.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # train_subset None (all) is given as 0, which every tool reads as "all".
        config = s.config.replace_settings(seed=cell.seed, train_subset=s.train_subset or 0)
        args = [sys.executable, "-m", "genfl_experiments.centralised", "--dataset", s.dataset,
                "--data-root", str(s.data_root), "--preset", s.preset,
                "--device", s.device, "--threads", str(s.server_threads), "--out", str(cell.out),
                "--log-level", s.log_level, *config.to_argv(("seed", *CENTRALISED_FIELDS))]
        with self._registry, open(log_path, "w") as log_file:
            if self._stopping.is_set():
                raise LaunchError("sweep stopping")
            proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=child_env())
            self._processes.append(proc)
        try:
            code = proc.wait(timeout=s.cell_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise LaunchError(f"{cell.key}: not finished after {s.cell_timeout:.0f} s") from None
        finally:
            self._processes.remove(proc)
        if code != 0:
            raise LaunchError(f"{cell.key}: exited with code {code}\n{log_tail(log_path)}")
        return json.loads((cell.out / "summary.json").read_text())

