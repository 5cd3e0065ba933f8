"""``genfl-server``: the aggregation server of one federated run.

``main`` resolves the options (``resolve_settings``: a new run's preset and options, or a resumed
run's saved settings) and drives a ``ServerApp`` (app.py); the method itself is
``phases.run_method``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from genfl_shared.checkpoint import CheckpointError
from genfl_shared.cli import log_format_option, log_level_option, option, setup_logging
from genfl_shared.cli_settings import given_run_options, group_options, resolve_config, run_options
from genfl_shared.config import PATH_FIELDS, PRESETS, ROUNDS, SERVER_FIELDS, PathSettings, RunConfig, option_tokens
from genfl_shared.data import DATASETS, DataFormatError, DatasetNotFoundError
from genfl_shared.security import SecurityError, SecurityOptionsError, server_security

from .app import RESULT_SETTINGS, ServerApp, ServerSettings, configure_torch, new_run_state, settings_from_saved
from .coordinator import RegistrationTimeout
from .guard import PartitionCounts
from .presence import DEFAULT_PRESENCE_GRACE_SECONDS
from .runstate import RunState, RunStateError
from .listening import ListenError

log = logging.getLogger("genfl_server")


class _Stopped(Exception):
    pass


def _limit_malloc_arenas() -> None:
    """Keep freed transfer buffers from lingering in glibc's per-thread malloc arenas.

    Every gRPC thread that touches 1 MiB chunks would otherwise grow an arena of its own that
    glibc rarely returns; two arenas keep the server's memory close to what it actually holds.
    glibc's own mmap threshold is left alone: it rises to the size of the chunks freed, so the
    1 MiB buffers of every message are reused from the arenas. Forcing mmap for >= 256 KiB blocks
    cost 0.8 models of peak memory less with 50 clients, but an
    mmap, a munmap and a page fault per 4 KiB for every message: 713 instead of 61 page faults per
    client per round at M = 500, a third of the server's CPU in the kernel's fault path (perf).
    A no-op outside glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
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


def _expected_failure(error: BaseException) -> _ExpectedFailure | None:
    """The one-line form of an expected failure (see _EXIT_CODES), None for anything else."""
    code = next((code for kind, code in _EXIT_CODES.items() if isinstance(error, kind)), None)
    return None if code is None else _ExpectedFailure(str(error), code)


def _exit_codes(command):
    """Expected failures before the run starts (e.g. the test data) become one line too."""
    @functools.wraps(command)
    def with_exit_codes(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except tuple(_EXIT_CODES) as error:
            raise _expected_failure(error) from None
    return with_exit_codes


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@click.pass_context
@option("--phase", type=click.Choice(["cvae", "classifier", "all"]), default="all",
        help="cvae: federated CVAE only; classifier: synthetic pre-training + federated classifier "
             "(needs a CVAE from --cvae-checkpoint unless --no-pretrain); all: both, same clients.")
@option("--address", default="0.0.0.0:50051", help="host:port to listen on (port 0 picks a free port, "
        "written to OUT/endpoint.json).")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@option("--preset", type=click.Choice(sorted(PRESETS)), default="paper",
        help="Defaults for every run setting; explicit options override it.")
@option("--dataset", type=click.Choice(sorted(DATASETS)), default=None,
        help="Dataset of the run; clients holding another are refused. Needed with --test-data.")
@group_options(PathSettings)
@option("--device", default="cpu", help="Torch device for server-side work (cpu, cuda, cuda:1).")
@option("--threads", type=click.IntRange(0), default=0, help="Torch CPU threads (0: torch's default).")
@option("--round-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Seconds to wait for every client's result in a step (default: no limit).")
@option("--min-fit-clients", type=click.IntRange(1), default=None,
        help="With --round-timeout: aggregate a round if at least this many clients answered by the "
             "deadline (default: all clients).")
@option("--round-retries", type=click.IntRange(0), default=2,
        help="Times a round that got too few results is retried before the run stops.")
@option("--presence-grace", type=click.FloatRange(min=0), default=DEFAULT_PRESENCE_GRACE_SECONDS,
        help="Seconds after a client's presence stream closed (process gone, link cut) before it counts "
             "as away: a step with at least --min-fit-clients results then stops waiting for it.")
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
@option("--resume", is_flag=True, default=False,
        help="Continue the interrupted run in --out from its last saved state. Every setting that "
             "changes results is reused; giving one with another value is refused.")
@run_options(ROUNDS, *SERVER_FIELDS)
@log_level_option
@log_format_option
@_exit_codes
def main(ctx: click.Context, **opts) -> None:
    """Run the aggregation server: wait for the clients, run the federated phases, write results."""
    setup_logging(opts["log_level"], opts["log_format"], "server")
    _limit_malloc_arenas()
    explicit = {name for name in ctx.params
                if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    settings, run_state = resolve_settings(opts, explicit)
    credentials, authenticator = _security(opts)
    if authenticator is not None and len(authenticator.client_ids) < settings.config.data.clients:
        raise click.ClickException(f"{opts['tokens_file']} holds tokens for {len(authenticator.client_ids)} "
                                   f"clients, but the run waits for {settings.config.data.clients}")
    configure_torch(settings)
    transport = "mutual TLS" if opts["client_ca"] else "TLS" if credentials else "plaintext"
    app = ServerApp(settings, run_state, credentials=credentials, authenticator=authenticator, transport=transport)
    signal.signal(signal.SIGTERM, _on_signal)
    # Errors -> exit codes: here (and _exit_codes, before the run). A failed run has told its
    # clients why (app.stop) before the process says it and exits.
    failure = None
    try:
        app.start()
        app.run()
    except (Exception, KeyboardInterrupt, _Stopped) as error:
        failure = error
        expected = isinstance(error, (_Stopped, KeyboardInterrupt, *_EXIT_CODES))
        log.error("run %s failed: %s", app.run_id, error, exc_info=not expected)
    finally:
        app.stop(failure)
    if failure is not None:
        one_line = _expected_failure(failure)
        if one_line is not None:
            raise one_line
        sys.exit(EXIT_RUN_FAILED)


def resolve_settings(opts: dict[str, Any], explicit: set[str]) -> tuple[ServerSettings, RunState]:
    """The run these options describe: a new one (preset + explicit options), or with --resume the
    saved run in --out (an explicit option that changes results must then match the saved value)."""
    opts = dict(opts)
    given = given_run_options(opts)
    out: Path = opts["out"].resolve()
    out.mkdir(parents=True, exist_ok=True)
    changeable = {"address": opts["address"], "round_retries": opts["round_retries"],
                  "presence_grace": opts["presence_grace"],
                  "register_timeout": opts["register_timeout"], "metrics_port": opts["metrics_port"],
                  "linger_seconds": opts["linger_seconds"], "run_id": opts["run_id"]}
    if opts["resume"]:
        try:
            run_state = RunState.load(out)
        except RunStateError as error:
            raise click.ClickException(str(error)) from None
        saved = _saved_settings(run_state, opts)
        _refuse_changes(saved, given, opts, explicit)
        settings = settings_from_saved(saved, out=out, resume=True, **changeable)
        log.info("resuming run in %s: %s", out, dict(run_state.progress["completed_rounds"]))
        return settings, run_state
    settings = _new_settings(opts, given, out, changeable)
    try:
        return settings, new_run_state(settings)
    except CheckpointError as error:
        raise click.ClickException(str(error)) from None


def _server_option(opts: dict[str, Any], name: str) -> Any:
    value = opts[name]
    # absolute(), not resolve(): a symlinked data folder keeps the path the user gave (messages name it)
    return value.absolute() if isinstance(value, Path) else value


def _new_settings(opts, given, out: Path, changeable: dict) -> ServerSettings:
    config = resolve_config(opts["preset"], given)
    phase = opts["phase"]
    synthetic_users = config.mitigations.federated_synthetic_options()
    if opts["pretrained_checkpoint"] is not None and (phase != "classifier" or not config.pretraining.pretrain or (
            opts["cvae_checkpoint"] is not None and not synthetic_users)):
        raise click.UsageError("--pretrained-checkpoint goes with --phase classifier, without "
                               "--no-pretrain and without --cvae-checkpoint (unless --server-finetune-steps, "
                               "--server-distill or --client-synthetic-mix: the CVAE then samples their synthetic "
                               "set)")
    if phase == "classifier" and synthetic_users and opts["cvae_checkpoint"] is None:
        raise click.UsageError(f"{' and '.join(synthetic_users)} with --phase classifier needs --cvae-checkpoint "
                               "(the CVAE samples the synthetic set they use)")
    if (phase == "classifier" and config.pretraining.pretrain and opts["cvae_checkpoint"] is None
            and opts["pretrained_checkpoint"] is None):
        raise click.UsageError("--phase classifier with pre-training needs --cvae-checkpoint "
                               "or --pretrained-checkpoint (or use --phase all, or --no-pretrain)")
    partition = _read_partition_info(opts["partition_info"])
    dataset = opts["dataset"] or partition.get("dataset")
    if opts["test_data"] is not None and dataset is None:
        raise click.UsageError("--test-data needs --dataset (or --partition-info)")
    # The data split is the partitioner's business; record what it did, not a preset's value.
    config = config.replace_settings(train_subset=partition.get("train_subset"))
    paths = PathSettings(**{name: _server_option(opts, name) for name in PATH_FIELDS})
    return ServerSettings(out=out, phase=phase, preset=opts["preset"], config=config, dataset=dataset,
                          alpha=partition.get("alpha"), paths=paths, device=opts["device"], threads=opts["threads"],
                          round_timeout=opts["round_timeout"], min_fit_clients=opts["min_fit_clients"],
                          resume=False, **changeable)


def _saved_settings(run_state: RunState, opts) -> dict[str, Any]:
    """The saved settings; a run state from before settings were saved holds only the run's
    config, phase, dataset and preset: the rest then comes from this command line, as it used to."""
    if "settings" in run_state.progress:
        return dict(run_state.progress["settings"])
    run = run_state.progress["run"]
    saved = {name: _server_option(opts, name) for name in RESULT_SETTINGS if name in opts}
    saved.update(phase=run["phase"], preset=run.get("preset", "paper"), dataset=run["dataset"],
                 alpha=run.get("alpha"), config=run["config"],
                 pretrained_checkpoint=run.get("pretrained_checkpoint"))
    return {k: str(v) if isinstance(v, Path) else v for k, v in saved.items()}


def _refuse_changes(saved: dict[str, Any], given: dict[str, Any], opts, explicit: set[str]) -> None:
    """--resume continues the saved run: an option that changes results must not differ from it."""
    config = RunConfig.from_dict(saved["config"])
    conflicts = []  # (the option as given, the saved value)
    for name, value in given.items():
        if value is None:
            continue
        if name == ROUNDS:
            rounds = (config.training.cvae_rounds, config.training.classifier_rounds)
            if rounds != (value, value):
                conflicts.append((f"--rounds {value}", f"{rounds[0]} and {rounds[1]}"))
        elif config.setting(name) != value:
            saved_value = config.setting(name)
            conflicts.append((" ".join(option_tokens(name, value)), " ".join(option_tokens(name, saved_value))))
    for name in RESULT_SETTINGS:
        if name in opts and name in explicit:
            value = _server_option(opts, name)
            value = str(value) if isinstance(value, Path) else value
            if value != saved.get(name):
                conflicts.append((f"--{name.replace('_', '-')} {value}", saved.get(name)))
    if conflicts:
        given_text, saved_value = conflicts[0]
        raise click.UsageError(f"{given_text} differs from the run being resumed ({saved_value}); --resume "
                               "reuses every setting that changes results: leave it out")


def _read_partition_info(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        partition = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"--partition-info {path} is not a readable JSON file: {error}") from None
    if not isinstance(partition, dict):
        raise click.ClickException(f"--partition-info {path} must hold a JSON object (a partition.json)")
    try:
        PartitionCounts.from_partition(partition, str(path))  # registrations are checked against it
    except ValueError as error:
        raise click.ClickException(f"--partition-info {error}") from None
    return partition


def _security(opts):
    """(gRPC server credentials or None, TokenAuthenticator or None) from the security options."""
    try:
        return server_security(opts["tls_cert"], opts["tls_key"], opts["client_ca"], opts["tokens_file"])
    except SecurityOptionsError as error:
        raise click.UsageError(str(error)) from None
    except SecurityError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
