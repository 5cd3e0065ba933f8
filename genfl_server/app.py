"""The aggregation server of one run as an object: ``ServerApp(settings, run_state)`` builds the
coordinator, gRPC service, round engine, recorder and metrics server; ``start()`` listens,
``run()`` runs the method (``phases.run_method``), ``stop()`` tells the clients and shuts down.
``genfl-server`` (cli.py) resolves its options into ``ServerSettings`` and drives one; tests can
drive one in-process.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from genfl_shared.checkpoint import CheckpointError, load_checkpoint
from genfl_shared.config import PATH_FIELDS, PathSettings, RunConfig
from genfl_shared.ensemble import ENSEMBLE_KIND, CVAEEnsemble, is_ensemble
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.runfiles import ENDPOINT_JSON, read_json, write_json_atomic

from .coordinator import Coordinator
from .engine import RoundEngine
from .guard import PartitionCounts, UpdateGuard
from .metrics import ServerMetrics
from .phases import PhaseContext, run_method
from .privacy import PrivacyLedger, record_spent_epsilon
from .presence import DEFAULT_PRESENCE_GRACE_SECONDS
from .results import RunRecorder
from .runstate import RunState
from .service import FederatedLearningService, set_health, start_grpc_server

log = logging.getLogger("genfl_server")


@dataclass(frozen=True)
class ServerSettings:
    """Everything a server run is started with, resolved (preset applied, paths absolute)."""

    out: Path
    phase: str  # "cvae" | "classifier" | "all"
    preset: str
    config: RunConfig
    dataset: str | None = None
    alpha: float | str | None = None  # from partition.json, for the summary
    paths: PathSettings = field(default_factory=PathSettings)
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0: torch's default
    round_timeout: float | None = None
    min_fit_clients: int | None = None
    # Below: how the server is reached and watched, and how long it waits; a resumed run may change them.
    address: str = "0.0.0.0:50051"
    round_retries: int = 2
    presence_grace: float = DEFAULT_PRESENCE_GRACE_SECONDS
    register_timeout: float | None = None
    metrics_port: int | None = None
    linger_seconds: float = 0.0
    run_id: str | None = None
    resume: bool = False

    def saved(self) -> dict[str, Any]:
        """The settings that change results, as saved in the run state and reused by --resume: flat,
        by name (the paths among them, not nested), so that every saved run reads the same way."""
        paths = self.paths.saved()
        values = {name: paths[name] if name in PATH_FIELDS else getattr(self, name) for name in RESULT_SETTINGS}
        values["config"] = self.config.to_dict()
        return values

    def run_fields(self) -> dict[str, Any]:
        """What summary.json records about the run (besides its results)."""
        config = self.config
        fields = {"dataset": self.dataset, "alpha": self.alpha, "clients": config.data.clients,
                  "seed": config.reproducibility.seed, "pretrain": config.pretraining.pretrain, "phase": self.phase,
                  "preset": self.preset, "config": self.config.to_dict()}
        for name in ("cvae_checkpoint", "pretrained_checkpoint"):  # where its generator / start came from
            if getattr(self.paths, name) is not None:
                fields[name] = str(getattr(self.paths, name))
        return fields


# The settings that change what a run computes, by saved name (ServerSettings fields and the paths):
# saved with its state, fixed on --resume.
RESULT_SETTINGS = ("phase", "preset", "config", "dataset", "alpha", *PATH_FIELDS, "device", "threads",
                   "round_timeout", "min_fit_clients")


def settings_from_saved(saved: dict[str, Any], **rest: Any) -> ServerSettings:
    """ServerSettings from ``ServerSettings.saved()`` output plus the settings a resume may choose."""
    values = {name: value for name, value in saved.items() if name not in PATH_FIELDS}
    values["config"] = RunConfig.from_dict(values["config"])
    return ServerSettings(**values, paths=PathSettings.from_saved(saved), **rest)


def new_run_state(settings: ServerSettings) -> RunState:
    """The state of a run about to start: its settings, and the weights it was given to start from.
    Raises CheckpointError for an unreadable checkpoint."""
    run_state = RunState.in_dir(settings.out)
    run_state.progress["run"] = settings.run_fields()
    run_state.progress["settings"] = settings.saved()
    paths = settings.paths
    if paths.pretrained_checkpoint is not None:
        # synthetic_pretraining() finds it as if resumed after that step.
        run_state.tensors["pretrained"] = load_checkpoint(paths.pretrained_checkpoint, "classifier")
    if settings.phase == "classifier" and paths.cvae_checkpoint is not None:
        # Pre-training samples from it; so does server fine-tuning (also with a pre-trained start).
        # The CVAE phase's generator: one CVAE, or an ensemble of the clients' (--cvae-aggregation).
        generator = load_checkpoint(paths.cvae_checkpoint, ("cvae", ENSEMBLE_KIND))
        if is_ensemble(generator):
            try:  # a malformed one is refused now, not after the rounds
                CVAEEnsemble.from_state(generator)
            except ValueError as error:
                raise CheckpointError(f"{paths.cvae_checkpoint}: {error}") from None
        run_state.tensors["cvae"] = generator
    return run_state


def configure_torch(settings: ServerSettings) -> None:
    """Process-wide torch settings of the run (threads, determinism): they change results."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.config.reproducibility.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition for determinism
        torch.use_deterministic_algorithms(True)


def device_name(device: torch.device) -> str:
    """What ran the server-side work, for reports (e.g. 'NVIDIA H100 80GB HBM3')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


class ServerApp:
    def __init__(self, settings: ServerSettings, run_state: RunState, *, credentials=None, authenticator=None,
                 transport: str | None = None):
        self.settings = settings
        self.transport = transport or ("TLS" if credentials else "plaintext")  # for the log
        self.run_state = run_state
        self.credentials = credentials
        self.authenticator = authenticator
        self.device = torch.device(settings.device)
        self.metrics = ServerMetrics()
        self.run_id = settings.run_id or uuid.uuid4().hex[:12]
        self.address: str | None = None  # host:port once listening
        self.metrics_port: int | None = None
        self._server = self._health = self.coordinator = self.ctx = None

    def _test_set(self):
        s = self.settings
        if s.paths.test_data is None:
            return None
        images, labels = load_dataset(s.dataset, s.paths.test_data, "test")
        log.info("test set: %d %s images from %s", len(labels), s.dataset, s.paths.test_data)
        return to_float_images(images, binarize=s.config.data.binarize).to(self.device), labels.to(self.device)

    def _partition_counts(self) -> PartitionCounts | None:
        """With --partition-info, the clients and counts a registration must match."""
        path = self.settings.paths.partition_info
        if path is None:
            return None
        partition = read_json(Path(path))
        if not isinstance(partition, dict):
            raise ValueError(f"--partition-info {path} is no longer a readable partition.json")
        counts = PartitionCounts.from_partition(partition, str(path))
        log.info("registrations must match %s: %d clients", path, len(counts.by_client))
        return counts

    def start(self) -> str:
        """Load the run's data, listen, announce the endpoint in OUT/endpoint.json; returns host:port."""
        s, config = self.settings, self.settings.config
        s.out.mkdir(parents=True, exist_ok=True)
        test_set = self._test_set()
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve(s.metrics_port)
            log.info("Prometheus metrics on :%d/metrics", self.metrics_port)
        self.coordinator = Coordinator(self.run_id, expected_clients=config.data.clients, dataset=s.dataset,
                                       max_client_samples=config.guard.max_client_samples or None,
                                       partition=self._partition_counts(), presence_grace=s.presence_grace)
        self.metrics.clients_present.set_function(self.coordinator.present_clients)
        privacy = None
        if config.dp.enabled:
            privacy = PrivacyLedger(config.dp)
            self.metrics.track_privacy(config.dp.dp_delta)
            # Recorded as each result is accepted, so a round's epsilon is complete by its end.
            self.coordinator.add_result_listener(partial(record_spent_epsilon, privacy, self.metrics))
        service = FederatedLearningService(self.coordinator, self.metrics, authenticator=self.authenticator,
                                           upload_timeout=config.transport.upload_timeout,
                                           max_concurrent_uploads=config.transport.max_concurrent_uploads,
                                           max_streams_per_connection=config.transport.max_streams_per_connection,
                                           max_streams_per_ip=config.transport.max_streams_per_ip)
        self._server, port, self._health = start_grpc_server(service, s.address, credentials=self.credentials)
        set_health(self._health, serving=True)  # listening, with its data (test set, checkpoint) loaded
        host = s.address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        write_json_atomic(s.out / ENDPOINT_JSON, {"address": self.address, "port": port, "run_id": self.run_id,
                                                  "metrics_port": self.metrics_port})
        log.info("run %s listening on %s (%s%s) for %d clients", self.run_id, self.address,
                 self.transport,
                 ", client tokens required" if self.authenticator else "", config.data.clients)

        recorder = RunRecorder(s.out, run_id=self.run_id, device=str(self.device),
                               device_name=device_name(self.device), **self.run_state.progress["run"])
        if s.resume and "recorder" in self.run_state.progress:
            recorder.restore(self.run_state.progress["recorder"])
            if privacy is not None:
                privacy.restore(recorder.summary.get("dp"))
                epsilon, delta = privacy.guarantee()
                if epsilon is not None:
                    self.metrics.dp_epsilon.set(epsilon)
                    self.metrics.dp_delta.set(delta)
        elif not s.resume:
            self.run_state.save(recorder_state=recorder.export())  # resumable from the very start
        engine = RoundEngine(self.coordinator, self.metrics, recorder, seed=config.reproducibility.seed,
                             round_timeout=s.round_timeout, min_clients=s.min_fit_clients,
                             round_retries=s.round_retries, deterministic=config.reproducibility.deterministic,
                             guard=UpdateGuard.from_config(config.guard))
        self.ctx = PhaseContext(engine, recorder, self.metrics, config, s.out, self.device, test_set,
                                self.run_state, privacy=privacy)
        return self.address

    def run(self) -> Path:
        """Wait for the clients, run the method, write summary.json (returned)."""
        self.ctx.engine.wait_for_clients(self.settings.register_timeout)
        run_method(self.ctx, self.settings.phase)
        summary = self.ctx.recorder.write_summary()
        self.metrics.phase.state("done")
        log.info("run %s complete; summary in %s", self.run_id, summary)
        return summary

    def stop(self, failure: BaseException | None = None) -> None:
        """Tell the clients the run is over (failed, with why, if ``failure``) and stop serving."""
        if failure is not None:
            self.metrics.phase.state("failed")
        if self._server is None:
            return
        set_health(self._health, serving=False)
        self.coordinator.shutdown(failed=failure is not None, reason=str(failure or ""))
        if not self.coordinator.wait_shutdown_delivered(timeout=10.0):
            log.warning("not every client heard that the run ended")
        self._server.stop(grace=2).wait(timeout=10)  # bounded: a stuck stream must not hang the exit
        self._server = None
        if self.settings.metrics_port is not None and self.settings.linger_seconds:
            log.info("run over; serving /metrics for %.0f s more", self.settings.linger_seconds)
            time.sleep(self.settings.linger_seconds)

