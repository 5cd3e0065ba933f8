"""``genfl-launch``: a whole federated run on this machine, as real processes.

Partitions the data, starts one ``genfl-server`` and K ``genfl-client`` processes that talk gRPC
over loopback (the server picks a free port and announces it in ``endpoint.json``), shows progress,
and prints the results. ``--compare`` trains the CVAE once, then runs the classifier phase with and
without synthetic pre-training on the same shards.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from genfl_shared.cli import log_level_option, option, setup_logging
from genfl_shared.cli_settings import given_run_options, resolve_config, run_options
from genfl_shared.config import CVAE_AGGREGATIONS, DP_FIELDS, GENERATOR_FIELDS, PRESETS, ROUNDS
from genfl_shared.data import DATASETS, DataFormatError, DatasetNotFoundError
from genfl_shared.partition import PartitionError, partition_dataset, shard_file_name
from genfl_shared.runfiles import (ENDPOINT_JSON, METRICS_JSONL, SUMMARY_JSON, EndpointTimeout, read_events,
                                   wait_for_endpoint)


log = logging.getLogger("genfl_launch")

# The run settings genfl-launch takes (the rest keep the preset's values).
LAUNCH_FIELDS = ("clients", "seed", "cvae_rounds", "classifier_rounds", "local_epochs", "synthetic_samples",
                 "cas_epochs", "pretrain_epochs", "strategy", "pretrain", "deterministic", "local_loss",
                 "server_finetune_steps", "server_finetune_lr", "server_finetune_batch_size", "server_distill",
                 "server_distill_teacher", "server_distill_max_teachers", "server_distill_steps", "server_distill_lr",
                 "server_distill_temperature", "server_distill_batch_size", "client_synthetic_mix",
                 *GENERATOR_FIELDS, *DP_FIELDS)


class LaunchError(RuntimeError):
    pass


@dataclass
class Stage:
    """One server run (with its clients) of a launch."""

    name: str
    out: Path
    server_args: list[str]
    total_rounds: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)


def child_env() -> dict[str, str]:
    # The children get every setting as an explicit flag; GENFL_* variables meant for the launcher
    # must not leak into them as defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


clients_per_process_option = option(
    "--clients-per-process", type=click.IntRange(1), default=None, show_default="all on CUDA, 1 on the CPU",
    help="Clients per genfl-client process (a client host: one process and torch runtime for several "
         "shards, each still a separate client; saves memory and, on CUDA, contexts).")


def resolve_clients_per_process(given: int | None, device: str, clients: int) -> int:
    """--clients-per-process, or its default: one CUDA context for all of a run's clients, and on
    the CPU one process per client (their tasks then run in parallel on the cores)."""
    if given is not None:
        return given
    return max(1, clients) if device.startswith("cuda") else 1


def _client_args_for(server_args: list[str]) -> list[str]:
    """Client options a stage's server settings need: a server that sends synthetic images of missing
    classes (--client-synthetic-mix > 0) or gives each class to the clients holding it
    (--cvae-aggregation other than fedavg) needs each client's label counts, which clients share
    only when told to (the launcher's user, who owns these clients, asked for it)."""
    def value(flag: str) -> str | None:
        return server_args[server_args.index(flag) + 1] if flag in server_args else None

    mix, aggregation = value("--client-synthetic-mix"), value("--cvae-aggregation")
    if (mix is not None and float(mix) > 0) or aggregation not in (None, "fedavg"):
        return ["--share-label-counts"]
    return []


class Launcher:
    def __init__(self, shards: list[Path], *, client_args: list[str], timeout: float | None,
                 progress_bar: bool = True, clients_per_process: int = 1):
        self.shards = shards
        self.client_args = client_args
        self.clients_per_process = clients_per_process
        self.timeout = timeout
        self.progress_bar = progress_bar  # off when several launchers share one terminal (genfl-sweep)
        self.running: list[subprocess.Popen] = []
        # stop_all() may come from another thread (genfl-sweep's Ctrl-C) while a stage is starting:
        # after it, nothing new starts.
        self._lock = threading.Lock()
        self._stopped = False

    def _spawn(self, name: str, args: list[str], log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(log_path, "w") as log_file:
            if self._stopped:
                raise LaunchError(f"not starting {name}: stopping")
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log_file, stderr=subprocess.STDOUT,
                                    env=child_env(), start_new_session=True)
            self.running.append(proc)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return proc

    def run_stage(self, stage: Stage) -> dict:
        stage.out.mkdir(parents=True, exist_ok=True)
        (stage.out / ENDPOINT_JSON).unlink(missing_ok=True)
        logs = stage.out / "logs"
        server = self._spawn("server", ["genfl_server.cli", *stage.server_args, "--out", str(stage.out),
                                        "--address", "127.0.0.1:0"], logs / "server.log")
        stage.processes["server"] = server
        endpoint = self._wait_for_endpoint(stage, server)
        client_args = [*self.client_args, *_client_args_for(stage.server_args)]
        for group in self.client_groups():
            name = group[0].stem if len(group) == 1 else f"{group[0].stem}_to_{group[-1].stem}"
            shard_args = [arg for shard in group for arg in ("--shard", str(shard))]
            stage.processes[name] = self._spawn(name, ["genfl_client.cli", "--server", endpoint, *shard_args,
                                                       *client_args], logs / f"{name}.log")
        self._monitor(stage)
        return json.loads((stage.out / SUMMARY_JSON).read_text())

    def client_groups(self) -> list[list[Path]]:
        """The shards of each client process, in order (--clients-per-process of them at most)."""
        n = self.clients_per_process
        return [self.shards[i:i + n] for i in range(0, len(self.shards), n)]

    def _wait_for_endpoint(self, stage: Stage, server: subprocess.Popen) -> str:
        try:
            return wait_for_endpoint(stage.out, 120, [server], poll_seconds=0.1)["address"]
        except EndpointTimeout:
            raise LaunchError(f"{stage.name}: server did not start listening within 120 s") from None
        except RuntimeError:
            raise LaunchError(f"{stage.name}: server exited with code {server.returncode} before "
                              f"listening\n{log_tail(stage.out / 'logs' / 'server.log')}") from None

    def _monitor(self, stage: Stage) -> None:
        if not self.progress_bar:
            self._watch(stage, lambda event: None)
            return
        with click.progressbar(length=max(stage.total_rounds, 1), label=f"{stage.name}: starting",
                               file=sys.stderr, show_pos=True, width=24) as bar:
            def show(event: dict) -> None:
                bar.label = f"{stage.name}: {_describe(event)}"
                if event.get("event") == "round":
                    bar.update(1)
                else:
                    bar.render_progress()
            self._watch(stage, show)

    def _watch(self, stage: Stage, on_event) -> None:
        """Until every process of the stage has exited: report new events, fail fast on a crash."""
        metrics_path = stage.out / METRICS_JSONL
        started = time.monotonic()
        seen = 0
        while True:
            events = read_events(metrics_path)
            for event in events[seen:]:
                on_event(event)
            seen = len(events)
            failed = {n: p.returncode for n, p in stage.processes.items()
                      if p.poll() is not None and p.returncode != 0}
            if failed:
                name = next(iter(failed))
                raise LaunchError(f"{stage.name}: {name} exited with code {failed[name]}\n"
                                  f"{log_tail(stage.out / 'logs' / f'{name}.log')}")
            if all(p.poll() is not None for p in stage.processes.values()):
                return
            if self.timeout and time.monotonic() - started > self.timeout:
                raise LaunchError(f"{stage.name}: not finished after {self.timeout:.0f} s")
            time.sleep(0.2)

    def stop_all(self) -> None:
        """Terminate every child still running (SIGTERM, then SIGKILL after 5 s); start no more."""
        with self._lock:
            self._stopped = True
            alive = [p for p in self.running if p.poll() is None]
        if not alive:
            return
        started = time.monotonic()
        for proc in alive:
            _signal_group(proc, signal.SIGTERM)
        deadline = started + 5
        killed = []
        for proc in alive:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
                killed.append(proc.pid)
        # How long a stop takes is worth seeing (a slow one is a bug in a child's shutdown path).
        log.log(logging.WARNING if killed else logging.INFO, "stopped %d processes in %.1f s%s", len(alive),
                time.monotonic() - started, f" (pids {killed} killed: not ended 5 s after SIGTERM)" if killed else "")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _describe(event: dict) -> str:
    kind = event.get("event")
    if kind == "round":
        acc = event.get("weighted_client_accuracy")
        text = f"{event['phase']} round {event['round']}"
        if acc is not None:
            text += f", client acc {acc:.3f}"
        if event.get("train_loss") is not None:
            text += f", loss {event['train_loss']:.3g}"
        return text
    if kind == "cas":
        return f"CAS {pct(event.get('cas'))}"
    if kind == "dp":
        return f"DP-SGD after cvae round {event['round']}: {guarantee_text(event)}"
    return f"server-side {kind}"


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text().splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(f"    | {line}" for line in text)


def rounds_table(summary: dict) -> str:
    rows = [f"{'phase':<11} {'round':>5} {'client acc':>10} {'test acc':>9} {'train loss':>10} {'seconds':>8}"]
    for r in summary["rounds"]:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4g}"
        rows.append(f"{r['phase']:<11} {r['round']:>5} {pct(r['weighted_client_accuracy']):>10} "
                    f"{pct(r['test_accuracy']):>9} {loss:>10} {r['seconds']:>8.2f}")
    return "\n".join(rows)


def guarantee_text(dp: dict) -> str:
    """A DP run's (epsilon, delta) as summary.json's ``dp`` or a ``dp`` event has it."""
    epsilon = "-" if dp.get("epsilon") is None else f"{dp['epsilon']:.3f}"
    return f"(epsilon {epsilon}, delta {dp['delta']:g})"


def comparison_table(pretrained: dict, baseline: dict, generator: tuple[str, dict] | None = None) -> str:
    """Weighted client and test accuracy per classifier round of the arms; ``generator``: (mode, the
    pre-trained arm of --compare-generator MODE's CVAE), shown beside the FedAvg generator's."""
    arms = [("pre-trained", pretrained)] + ([(f"pre-trained, {generator[0]}", generator[1])] if generator else [])
    arms.append(("baseline", baseline))
    header = f"{'round':>5}"
    for name, _ in arms:
        header += f" | {name + ' client acc':>{max(19, len(name) + 11)}} {'test acc':>9}"
    rows = [header]
    per_arm = [[r for r in summary["rounds"] if r["phase"] == "classifier"] for _, summary in arms]
    for records in zip(*per_arm):
        row = f"{records[0]['round']:>5}"
        for (name, _), record in zip(arms, records):
            row += (f" | {pct(record['weighted_client_accuracy']):>{max(19, len(name) + 11)}} "
                    f"{pct(record['test_accuracy']):>9}")
        rows.append(row)
    rows.append(f"CAS {pct(pretrained.get('cas'))}, federated CAS {pct(pretrained.get('cas_federated'))}")
    if generator:
        rows.append(f"CAS with --cvae-aggregation {generator[0]}: {pct(generator[1].get('cas'))}, federated CAS "
                    f"{pct(generator[1].get('cas_federated'))}")
    return "\n".join(rows)


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--dataset", type=click.Choice(sorted(DATASETS)), default="mnist")
@option("--data-root", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Folder with the dataset's IDX files (or torchvision's layout).")
@option("--download", is_flag=True, help="Download the dataset with torchvision if missing (needs a network).")
@option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Dirichlet concentration of the label split (smaller: more skewed).")
@option("--iid", is_flag=True, help="Equal random split instead of Dirichlet.")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@option("--preset", type=click.Choice(sorted(PRESETS)), default="quick",
        help="quick: minutes on a 2-core CPU (README lists the reductions); paper: the poster's setup.")
@option("--compare", is_flag=True, help="Train the CVAE once, then the classifier phase with and "
        "without pre-training on the same shards (OUT/pretrained, OUT/baseline).")
@option("--compare-generator", type=click.Choice([m for m in CVAE_AGGREGATIONS if m != "fedavg"]), default=None,
        help="With --compare: also train the CVAE with this --cvae-aggregation (OUT/cvae-MODE) and pre-train "
        "from it (OUT/pretrained-MODE), shown beside the poster's FedAvg generator.")
@run_options("train_subset", ROUNDS, *LAUNCH_FIELDS)
@option("--device", default="cpu", help="Torch device of the server and the clients.")
@option("--client-threads", type=click.IntRange(1), default=1, help="Torch threads per client process.")
@clients_per_process_option
@option("--timeout", type=click.FloatRange(0), default=0, help="Give up on a stage after this many "
        "seconds (0: never).")
@log_level_option
def main(dataset, data_root, download, alpha, iid, out, preset, compare, compare_generator, device, client_threads,
         clients_per_process, timeout, log_level, **run_settings):
    """Partition the data and run one server and K client processes on this machine."""
    setup_logging(log_level, "text", "launch")
    if (alpha is None) == (not iid):
        raise click.UsageError("give exactly one of --alpha and --iid")
    config = resolve_config(preset, given_run_options(run_settings))
    if compare and config.pretraining.pretrain is False:
        raise click.UsageError("--compare runs both arms; leave out --no-pretrain")
    if compare_generator and not compare:
        raise click.UsageError("--compare-generator goes with --compare")
    if compare_generator and config.generator.cvae_aggregation != "fedavg":
        raise click.UsageError("--compare-generator sets the generator beside FedAvg's; leave out --cvae-aggregation")
    out.mkdir(parents=True, exist_ok=True)
    try:
        partition_dataset(dataset, data_root, config.data.clients, None if iid else alpha, config.reproducibility.seed,
                          out / "shards", train_subset=config.data.train_subset, download=download)
    except (DatasetNotFoundError, DataFormatError, PartitionError) as error:
        raise click.ClickException(str(error)) from None
    shards = [out / "shards" / shard_file_name(i) for i in range(config.data.clients)]
    log.info("partitioned %s into %d shards (%s) in %s", dataset, config.data.clients,
             "IID" if iid else f"alpha={alpha}", out / "shards")

    def server_args(phase: str, **changes) -> list[str]:
        return ["--preset", preset, "--phase", phase, "--device", device, "--dataset", dataset,
                "--test-data", str(data_root), "--partition-info", str(out / "shards" / "partition.json"),
                "--log-level", log_level, *config.replace_settings(**changes).to_argv()]

    n_cvae, n_cls = config.training.cvae_rounds, config.training.classifier_rounds
    per_process = resolve_clients_per_process(clients_per_process, device, config.data.clients)
    launcher = Launcher(shards, client_args=["--device", device, "--threads", str(client_threads),
                                             "--log-level", log_level], timeout=timeout or None,
                        clients_per_process=per_process)
    started = time.monotonic()
    try:
        if compare:
            cvae = launcher.run_stage(Stage("cvae", out / "cvae", server_args("cvae"), n_cvae))
            checkpoint = out / "cvae" / "cvae.pt"
            pretrained = launcher.run_stage(Stage("pretrained", out / "pretrained", server_args(
                "classifier", pretrain=True) + ["--cvae-checkpoint", str(checkpoint)], n_cls))
            baseline = launcher.run_stage(Stage("baseline", out / "baseline", server_args(
                "classifier", pretrain=False), n_cls))
            click.echo(f"\nGenFL {dataset}, {'IID' if iid else f'alpha={alpha}'}, {config.data.clients} clients, "
                       f"preset {preset}, seed {config.reproducibility.seed}: weighted client accuracy per "
                       "classifier round\n")
            generator = None
            if compare_generator:
                launcher.run_stage(Stage(f"cvae-{compare_generator}", out / f"cvae-{compare_generator}",
                                         server_args("cvae", cvae_aggregation=compare_generator), n_cvae))
                generator = (compare_generator, launcher.run_stage(Stage(
                    f"pretrained-{compare_generator}", out / f"pretrained-{compare_generator}",
                    server_args("classifier", pretrain=True)
                    + ["--cvae-checkpoint", str(out / f"cvae-{compare_generator}" / "cvae.pt")], n_cls)))
            click.echo(comparison_table(pretrained, baseline, generator))
            if cvae.get("dp"):
                click.echo(f"DP-SGD in the CVAE phase: {guarantee_text(cvae['dp'])}")
        else:
            summary = launcher.run_stage(Stage("run", out, server_args("all"), n_cvae + n_cls))
            click.echo("\n" + rounds_table(summary))
            click.echo(f"CAS {pct(summary.get('cas'))}, federated CAS {pct(summary.get('cas_federated'))}")
            if summary.get("dp"):
                click.echo(f"DP-SGD in the CVAE phase: {guarantee_text(summary['dp'])}")
    except LaunchError as error:
        launcher.stop_all()
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping the server and the clients", err=True)
        launcher.stop_all()
        sys.exit(130)
    finally:
        launcher.stop_all()
    click.echo(f"\nfinished in {time.monotonic() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
