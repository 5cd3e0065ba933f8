"""``genfl-server``: the aggregation server of one federated run."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import os
import platform
import signal
import sys
import time
import uuid
from pathlib import Path

import click
import torch

from genfl_shared.checkpoint import CheckpointError, load_checkpoint
from genfl_shared.cli import log_format_option, log_level_option, option, setup_logging
from genfl_shared.config import PRESETS, RunConfig
from genfl_shared.data import DATASETS, DataFormatError, DatasetNotFoundError, load_dataset, to_float_images
from genfl_shared.runfiles import ENDPOINT_JSON, write_json_atomic
from genfl_shared.security import SecurityError, SecurityOptionsError, server_security

from .coordinator import Coordinator, RegistrationTimeout
from .engine import RoundEngine
from .guard import UpdateGuard
from .metrics import ServerMetrics
from .phases import PhaseContext, classifier_phase, cvae_phase, initial_state, synthetic_pretraining
from .results import RunRecorder
from .runstate import RunState, RunStateError
from .service import FederatedLearningService, ListenError, set_health, start_grpc_server

log = logging.getLogger("genfl_server")


class _Stopped(Exception):
    pass


def _limit_malloc_arenas() -> None:
    """Keep freed transfer buffers from lingering in glibc's per-thread malloc arenas.

    Every gRPC thread that touches 1 MiB chunks would otherwise grow an arena of its own that
    glibc rarely returns; two arenas and mmap for >= 256 KiB blocks (returned to the OS on free)
    keep the server's memory close to what it actually holds. A no-op outside glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _on_signal(signum, _frame):
    raise _Stopped(f"stopped by {signal.Signals(signum).name}")


# -- exit codes (README, "genfl-server"): an expected failure is one "Error: ..." line, no traceback --
EXIT_RUN_FAILED = 1  # the run failed, or an input file (data, checkpoint, run state, JSON) is unusable
EXIT_CANNOT_LISTEN = 3  # --address cannot be listened on
EXIT_CLIENTS_MISSING = 4  # fewer than --clients registered within --register-timeout
_EXIT_CODES = {ListenError: EXIT_CANNOT_LISTEN, RegistrationTimeout: EXIT_CLIENTS_MISSING,
               DatasetNotFoundError: EXIT_RUN_FAILED, DataFormatError: EXIT_RUN_FAILED}


class _ExpectedFailure(click.ClickException):
    """Printed by click as ``Error: <message>``, then exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _exit_codes(run):
    """Turn the expected failures of ``run`` (see _EXIT_CODES) into one line and their exit code."""
    @functools.wraps(run)
    def run_with_exit_codes(**opts):
        try:
            return run(**opts)
        except tuple(_EXIT_CODES) as error:
            code = next(code for kind, code in _EXIT_CODES.items() if isinstance(error, kind))
            raise _ExpectedFailure(str(error), code) from None
    return run_with_exit_codes


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--phase", type=click.Choice(["cvae", "classifier", "all"]), default="all",
        help="cvae: federated CVAE only; classifier: synthetic pre-training + federated classifier "
             "(needs a CVAE from --cvae-checkpoint unless --no-pretrain); all: both, same clients.")
@option("--address", default="0.0.0.0:50051", help="host:port to listen on (port 0 picks a free port, "
        "written to OUT/endpoint.json).")
@option("--clients", type=click.IntRange(1), default=None, help="Clients to wait for [preset: 10].")
@option("--rounds", type=click.IntRange(0), default=None,
        help="Rounds of each federated phase run (overrides both --cvae-rounds and --classifier-rounds).")
@option("--cvae-rounds", type=click.IntRange(0), default=None, help="[preset: 20]")
@option("--classifier-rounds", type=click.IntRange(0), default=None, help="[preset: 10]")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@option("--preset", type=click.Choice(sorted(PRESETS)), default="paper",
        help="Defaults for every setting below; explicit options override it.")
@option("--dataset", type=click.Choice(sorted(DATASETS)), default=None,
        help="Dataset of the run; clients holding another are refused. Needed with --test-data.")
@option("--test-data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
        help="Data root holding the real test split (server-side test accuracy and CAS).")
@option("--partition-info", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="partition.json of the shards, to record dataset/alpha in summary.json.")
@option("--cvae-checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Global CVAE for --phase classifier.")
@option("--pretrained-checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="--phase classifier: start from this already pre-trained classifier (skips sampling, CAS "
        "and pre-training; genfl-sweep shares one pre-training between its arms).")
@option("--pretrain/--no-pretrain", default=True, help="Pre-train the classifier on synthetic data "
        "(--no-pretrain: the baseline, seeded random start).")
@option("--local-epochs", type=click.IntRange(0), default=None, help="Local epochs per round [preset: 2].")
@option("--batch-size", type=click.IntRange(1), default=None, help="Local batch size [preset: 32].")
@option("--synthetic-samples", type=click.IntRange(10), default=None, help="[preset: 60000]")
@option("--cas-epochs", type=click.IntRange(0), default=None,
        help="Epochs of the CAS classifier on synthetic data; 0 skips CAS [preset: 20].")
@option("--pretrain-epochs", type=click.IntRange(0), default=None, help="[preset: 5]")
@option("--strategy", type=click.Choice(["fedavg", "fedprox", "fedavgm", "median", "trimmed_mean", "krum"]),
        default=None,
        help="Aggregation: FedAvg, FedProx (clients add a proximal term), FedAvgM (server momentum), or "
             "the robust ones, which hold every update of a round: coordinate-wise median, trimmed mean, "
             "(multi-)Krum [preset: fedavg].")
@option("--prox-mu", type=click.FloatRange(0), default=None, help="FedProx proximal weight mu [0.01].")
@option("--fedavgm-momentum", type=click.FloatRange(0, 1), default=None, help="FedAvgM server momentum [0.9].")
@option("--fedavgm-lr", type=click.FloatRange(min=0, min_open=True), default=None,
        help="FedAvgM server learning rate [1.0].")
@option("--trim-fraction", type=click.FloatRange(0, 0.5, max_open=True), default=None,
        help="Trimmed mean: share of the values dropped at each end, per weight [0.2].")
@option("--krum-byzantine", type=click.IntRange(0), default=None,
        help="Krum: Byzantine clients tolerated, F (needs more than 2F + 2 clients) [1].")
@option("--krum-select", type=click.IntRange(1), default=None,
        help="Krum: best-scored updates averaged, M (1: Krum; more: multi-Krum) [1].")
@option("--max-update-norm", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Reject (or with --clip-updates, clip) an update farther than this from the global model "
             "(L2 norm of w_client - w_global) [no fixed bound].")
@option("--clip-updates", is_flag=True, default=False,
        help="Beyond --max-update-norm, scale the update's step down to the bound instead of rejecting it.")
@option("--update-norm-factor", type=click.FloatRange(0), default=None,
        help="Adaptive bound: redo a round without any update farther than this many times the round's "
             "median distance (from 3 updates; 0: off) [10].")
@option("--max-client-samples", type=click.IntRange(0), default=None,
        help="Most training samples one client may register (0: no limit) [60000].")
@option("--max-client-weight-share", type=click.FloatRange(0, 1, min_open=True), default=None,
        help="Largest share of the FedAvg weight one client may hold, from 3 clients on (1: no cap) [0.5].")
@option("--no-binarize", is_flag=True, default=False, help="Keep grey levels (the paper binarises at 0.5).")
@option("--seed", type=int, default=0, help="Run seed: model init, client shuffling, synthetic data.")
@option("--device", default="cpu", help="Torch device for server-side work (cpu, cuda, cuda:1).")
@option("--threads", type=click.IntRange(0), default=0, help="Torch CPU threads (0: torch's default).")
@option("--round-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Seconds to wait for every client's result in a step (default: no limit).")
@option("--min-fit-clients", type=click.IntRange(1), default=None,
        help="With --round-timeout: aggregate a round if at least this many clients answered by the "
             "deadline (default: all clients).")
@option("--round-retries", type=click.IntRange(0), default=2,
        help="Times a round that got too few results is retried before the run stops.")
@option("--register-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Seconds to wait for all clients to register (default: no limit).")
@option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Serve TLS with this PEM certificate (chain); needs --tls-key.")
@option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="PEM private key (unencrypted) of --tls-cert.")
@option("--client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Mutual TLS: require a client certificate signed by this PEM CA (needs --tls-cert).")
@option("--tokens-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="JSON {client_id: \"sha256:<hex>\"} of hashed client tokens (python -m genfl_server.security "
             "make-tokens); every request must then carry its client's token.")
@option("--metrics-port", type=click.IntRange(0, 65535), default=None,
        help="Serve Prometheus /metrics on this port.")
@option("--linger-seconds", type=click.FloatRange(0), default=0.0,
        help="Keep serving /metrics this long after the run ends, so Prometheus scrapes the final values.")
@option("--run-id", default=None, help="Run identifier (default: random).")
@option("--deterministic", is_flag=True, default=False,
        help="Bit-reproducible runs: deterministic kernels and updates summed in client order (holds "
             "a round's updates in memory). With fixed seeds, a resumed run ends with the same weights.")
@option("--resume", is_flag=True, default=False,
        help="Continue the interrupted run in --out from its last saved state (its settings are reused).")
@log_level_option
@log_format_option
@_exit_codes
def main(**opts) -> None:
    """Run the aggregation server: wait for the clients, run the federated phases, write results."""
    setup_logging(opts["log_level"], opts["log_format"], "server")
    _limit_malloc_arenas()
    credentials, authenticator = _security(opts)
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    out: Path = opts["out"]
    out.mkdir(parents=True, exist_ok=True)
    if opts["resume"]:
        # Everything about the run comes from its saved state; only where to listen comes from here.
        try:
            run_state = RunState.load(out)
        except RunStateError as error:
            raise click.ClickException(str(error)) from None
        run_fields = run_state.progress["run"]
        config = RunConfig(**run_fields["config"])
        phase, dataset = run_fields["phase"], run_fields["dataset"]
        log.info("resuming run in %s: %s", out, {k: v for k, v in run_state.progress["completed_rounds"].items()})
    else:
        config = _config(opts)
        phase = opts["phase"]
        if opts["pretrained_checkpoint"] is not None and (phase != "classifier" or not config.pretrain
                                                          or opts["cvae_checkpoint"] is not None):
            raise click.UsageError("--pretrained-checkpoint goes with --phase classifier, without "
                                   "--no-pretrain and without --cvae-checkpoint")
        if (phase == "classifier" and config.pretrain and opts["cvae_checkpoint"] is None
                and opts["pretrained_checkpoint"] is None):
            raise click.UsageError("--phase classifier with pre-training needs --cvae-checkpoint "
                                   "or --pretrained-checkpoint (or use --phase all, or --no-pretrain)")
        partition = _read_partition_info(opts["partition_info"]) if opts["partition_info"] else {}
        dataset = opts["dataset"] or partition.get("dataset")
        # The data split is the partitioner's business; record what it did, not a preset's value.
        config = dataclasses.replace(config, train_subset=partition.get("train_subset"))
        run_fields = {"dataset": dataset, "alpha": partition.get("alpha"), "clients": config.clients,
                      "seed": config.seed, "pretrain": config.pretrain, "phase": phase, "preset": opts["preset"],
                      "config": config.to_dict()}
        run_state = RunState.in_dir(out)
        run_state.progress["run"] = run_fields
        try:
            if opts["pretrained_checkpoint"] is not None:
                # synthetic_pretraining() finds it as if resumed after that step.
                run_state.tensors["pretrained"] = load_checkpoint(opts["pretrained_checkpoint"], "classifier")
                run_fields["pretrained_checkpoint"] = str(opts["pretrained_checkpoint"])
            elif phase == "classifier" and config.pretrain:
                run_state.tensors["cvae"] = load_checkpoint(opts["cvae_checkpoint"], "cvae")
        except CheckpointError as error:
            raise click.ClickException(str(error)) from None
    if authenticator is not None and len(authenticator.client_ids) < config.clients:
        raise click.ClickException(f"{opts['tokens_file']} holds tokens for {len(authenticator.client_ids)} "
                                   f"clients, but the run waits for {config.clients}")
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition for determinism
        torch.use_deterministic_algorithms(True)
    device = torch.device(opts["device"])
    test_set = None
    if opts["test_data"] is not None:
        if dataset is None:
            raise click.UsageError("--test-data needs --dataset (or --partition-info)")
        images, labels = load_dataset(dataset, opts["test_data"], "test")
        test_set = (to_float_images(images, binarize=config.binarize).to(device), labels.to(device))
        log.info("test set: %d %s images from %s", len(labels), dataset, opts["test_data"])

    metrics = ServerMetrics()
    metrics_port = None
    if opts["metrics_port"] is not None:
        metrics_port = metrics.serve(opts["metrics_port"])
        log.info("Prometheus metrics on :%d/metrics", metrics_port)
    run_id = opts["run_id"] or uuid.uuid4().hex[:12]
    coordinator = Coordinator(run_id, expected_clients=config.clients, dataset=dataset,
                              max_client_samples=config.max_client_samples or None)
    service = FederatedLearningService(coordinator, metrics, authenticator=authenticator)
    server, port, health = start_grpc_server(service, opts["address"], max_workers=2 * config.clients + 16,
                                             credentials=credentials)
    set_health(health, serving=True)  # listening, with its data (test set, checkpoint) loaded
    host = opts["address"].rsplit(":", 1)[0]
    write_json_atomic(out / ENDPOINT_JSON, {"address": f"{host}:{port}", "port": port, "run_id": run_id,
                                              "metrics_port": metrics_port})
    log.info("run %s listening on %s:%d (%s%s) for %d clients", run_id, host, port,
             "mutual TLS" if opts["client_ca"] else "TLS" if credentials else "plaintext",
             ", client tokens required" if authenticator else "", config.clients)

    recorder = RunRecorder(out, run_id=run_id, device=str(device), device_name=_device_name(device), **run_fields)
    if opts["resume"] and "recorder" in run_state.progress:
        recorder.restore(run_state.progress["recorder"])
    elif not opts["resume"]:
        run_state.save(recorder_state=recorder.export())  # resumable from the very start
    engine = RoundEngine(coordinator, metrics, recorder, seed=config.seed, round_timeout=opts["round_timeout"],
                         min_clients=opts["min_fit_clients"], round_retries=opts["round_retries"],
                         deterministic=config.deterministic, guard=update_guard(config))
    ctx = PhaseContext(engine, recorder, metrics, config, out, device, test_set, run_state)
    signal.signal(signal.SIGTERM, _on_signal)
    failure = None
    try:
        engine.wait_for_clients(opts["register_timeout"])
        cvae_state = run_state.tensors.get("cvae")
        if phase in ("cvae", "all"):
            cvae_state = cvae_phase(ctx)
        if phase in ("classifier", "all"):
            start = synthetic_pretraining(ctx, cvae_state) if config.pretrain else initial_state("classifier",
                                                                                                 config.seed)
            classifier_phase(ctx, start)
        summary = recorder.write_summary()
        metrics.phase.state("done")
        log.info("run %s complete; summary in %s", run_id, summary)
    except (Exception, KeyboardInterrupt, _Stopped) as error:
        failure = error
        metrics.phase.state("failed")
        log.error("run %s failed: %s", run_id, error,
                  exc_info=not isinstance(error, (_Stopped, KeyboardInterrupt, RegistrationTimeout)))
    finally:
        set_health(health, serving=False)
        coordinator.shutdown(failed=failure is not None, reason=str(failure or ""))
        if not coordinator.wait_shutdown_delivered(timeout=10.0):
            log.warning("not every client heard that the run ended")
        server.stop(grace=2).wait(timeout=10)  # bounded: a stuck stream must not hang the exit
        if opts["metrics_port"] is not None and opts["linger_seconds"]:
            log.info("run over; serving /metrics for %.0f s more", opts["linger_seconds"])
            time.sleep(opts["linger_seconds"])
    if isinstance(failure, RegistrationTimeout):
        raise failure  # after the shutdown above: _exit_codes makes it one line and its exit code
    if failure is not None:
        sys.exit(EXIT_RUN_FAILED)


def _read_partition_info(path: Path) -> dict:
    try:
        partition = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"--partition-info {path} is not a readable JSON file: {error}") from None
    if not isinstance(partition, dict):
        raise click.ClickException(f"--partition-info {path} must hold a JSON object (a partition.json)")
    return partition


def _device_name(device: torch.device) -> str:
    """What ran the server-side work, for reports (e.g. 'NVIDIA H100 80GB HBM3')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _security(opts):
    """(gRPC server credentials or None, TokenAuthenticator or None) from the security options."""
    try:
        return server_security(opts["tls_cert"], opts["tls_key"], opts["client_ca"], opts["tokens_file"])
    except SecurityOptionsError as error:
        raise click.UsageError(str(error)) from None
    except SecurityError as error:
        raise click.ClickException(str(error)) from None


def _config(opts) -> RunConfig:
    preset = PRESETS[opts["preset"]]
    rounds = opts["rounds"]
    return preset.override(
        clients=opts["clients"],
        cvae_rounds=opts["cvae_rounds"] if opts["cvae_rounds"] is not None else rounds,
        classifier_rounds=opts["classifier_rounds"] if opts["classifier_rounds"] is not None else rounds,
        local_epochs=opts["local_epochs"], batch_size=opts["batch_size"],
        synthetic_samples=opts["synthetic_samples"], cas_epochs=opts["cas_epochs"],
        pretrain_epochs=opts["pretrain_epochs"], pretrain=opts["pretrain"],
        binarize=False if opts["no_binarize"] else None, seed=opts["seed"],
        deterministic=opts["deterministic"] or None,
        strategy=opts["strategy"], prox_mu=opts["prox_mu"], fedavgm_momentum=opts["fedavgm_momentum"],
        fedavgm_lr=opts["fedavgm_lr"], trim_fraction=opts["trim_fraction"],
        krum_byzantine=opts["krum_byzantine"], krum_select=opts["krum_select"],
        max_update_norm=opts["max_update_norm"], clip_updates=opts["clip_updates"] or None,
        update_norm_factor=opts["update_norm_factor"], max_client_samples=opts["max_client_samples"],
        max_client_weight_share=opts["max_client_weight_share"],
    )


def update_guard(config: RunConfig) -> UpdateGuard:
    """The run's update bounds; 0 (factor) and 1 (share) switch a bound off."""
    share = config.max_client_weight_share
    return UpdateGuard(max_update_norm=config.max_update_norm, norm_factor=config.update_norm_factor or None,
                       clip=config.clip_updates, max_weight_share=None if share is None or share >= 1 else share)


if __name__ == "__main__":
    main()
