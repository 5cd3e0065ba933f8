"""Prometheus metrics of the aggregation server (names follow Prometheus conventions).

Each server owns its registry, so several servers can live in one process (tests) without
colliding in prometheus_client's global default registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, start_http_server

from genfl_shared import __version__

from .listening import ListenError

PHASE_STATES = ["waiting", "cvae", "synthetic", "classifier", "done", "failed"]
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        Info("genfl_build", "GenFL build information", registry=r).info({"version": __version__})
        self.phase = Enum("genfl_phase", "Current phase of the run", states=PHASE_STATES, registry=r)
        self.round = Gauge("genfl_round", "Current federated round (0 before the first)", registry=r)
        self.rounds_completed = Counter("genfl_rounds_completed_total", "Federated rounds completed",
                                        ["phase"], registry=r)
        self.round_duration = Histogram("genfl_round_duration_seconds", "Wall time of a federated round",
                                        ["phase"], buckets=ROUND_BUCKETS, registry=r)
        self.clients_registered = Gauge("genfl_clients_registered", "Clients registered in this run",
                                        registry=r)
        self.clients_connected = Gauge("genfl_clients_connected",
                                       "Clients holding an open task poll right now", registry=r)
        self.rpcs_open = Gauge("genfl_rpcs_open", "Client RPCs (polls, uploads, registrations) open right now",
                               registry=r)
        self.clients_present = Gauge("genfl_clients_present",
                                     "Registered clients not counted away (presence stream closed for longer "
                                     "than --presence-grace)", registry=r)
        self.updates_accepted = Counter("genfl_client_updates_accepted_total",
                                        "Client results accepted", ["phase", "type"], registry=r)
        self.updates_rejected = Counter("genfl_client_updates_rejected_total",
                                        "Client requests rejected, by reason", ["reason"], registry=r)
        self.updates_late = Counter("genfl_client_updates_late_total",
                                    "Client results that arrived after their round closed", registry=r)
        self.bytes_sent = Counter("genfl_sent_bytes_total", "Model bytes sent to clients", registry=r)
        self.bytes_received = Counter("genfl_received_bytes_total", "Model bytes received from clients",
                                      registry=r)
        self.post_aggregation_refused = Counter(
            "genfl_post_aggregation_refused_total", "Post-aggregation steps (server fine-tuning) whose model was "
            "refused (non-finite or absurd weights); the round's aggregate was broadcast instead", ["phase"],
            registry=r)
        self.aggregation_seconds = Histogram("genfl_aggregation_seconds",
                                             "Time spent folding updates into the global model",
                                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r)
        self.weighted_client_accuracy = Gauge("genfl_weighted_client_accuracy",
                                              "Sample-weighted client held-out accuracy, last round",
                                              ["phase"], registry=r)
        self.test_accuracy = Gauge("genfl_test_accuracy", "Global model accuracy on the server's test set, "
                                   "last round", ["phase"], registry=r)
        self.train_loss = Gauge("genfl_train_loss", "Sample-weighted mean client train loss, last round",
                                ["phase"], registry=r)
        self.cas = Gauge("genfl_cas_accuracy", "Classification Accuracy Score of the synthetic data "
                         "(real test set)", registry=r)
        self.cas_federated = Gauge("genfl_cas_federated_accuracy", "CAS classifier's sample-weighted "
                                   "accuracy on the clients' held-out data", registry=r)
        self.synthetic_samples = Counter("genfl_synthetic_samples_generated_total",
                                         "Synthetic images sampled from the global CVAE", registry=r)
        self.pretrain_seconds = Gauge("genfl_pretrain_seconds", "Wall time of server-side pre-training",
                                      registry=r)
        # DP-SGD runs only (track_privacy): a run without DP has no epsilon, not an epsilon of 0.
        self.dp_epsilon: Gauge | None = None
        self.dp_delta: Gauge | None = None
        self.phase.state("waiting")

    def track_privacy(self, delta: float) -> None:
        """Export the run's DP guarantee (a DP-SGD run); its epsilon is NaN until a client reports one."""
        self.dp_epsilon = Gauge("genfl_dp_epsilon", "The run's DP-SGD epsilon so far: max over clients of the "
                                "spent epsilon they report, at delta genfl_dp_delta", registry=self.registry)
        self.dp_delta = Gauge("genfl_dp_delta", "The delta of the run's DP-SGD (epsilon, delta) guarantee",
                              registry=self.registry)
        self.dp_epsilon.set(float("nan"))
        self.dp_delta.set(delta)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics on ``port`` (0 picks a free one); returns the bound port."""
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as error:
            raise ListenError(f"cannot serve metrics on {addr}:{port}: {error.strerror or error}") from None
        return server.server_address[1]
