"""Prometheus metrics of a client process (served with ``genfl-client --metrics-port``).

Every series carries a ``client_id`` label: a client host serves several clients from one
process and one /metrics endpoint (ClientMetricFamilies), each with its own ClientMetrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from genfl_shared import __version__

LABELS = ("client_id",)


class ClientMetricFamilies:
    """The metric families of one process, in one registry: one labelled child per client."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.build = Info("genfl_client_build", "GenFL build information", LABELS, registry=r)
        self.train_seconds = Counter("genfl_client_train_seconds_total", "Seconds spent in local training",
                                     LABELS, registry=r)
        self.samples_trained = Counter("genfl_client_samples_trained_total",
                                       "Training samples processed (per task, all epochs counted once)",
                                       LABELS, registry=r)
        self.bytes_sent = Counter("genfl_client_sent_bytes_total", "Model bytes sent to the server", LABELS,
                                  registry=r)
        self.bytes_received = Counter("genfl_client_received_bytes_total", "Model bytes received", LABELS,
                                      registry=r)
        self.last_loss = Gauge("genfl_client_last_train_loss", "Train loss of the last local training",
                               LABELS, registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_address[1]


class ClientMetrics:
    """One client's series (in ``families``, shared with the other clients of its process, or in
    families of its own)."""

    def __init__(self, client_id: str, families: ClientMetricFamilies | None = None) -> None:
        self.families = families or ClientMetricFamilies()
        self.registry = self.families.registry
        f = self.families
        f.build.labels(client_id).info({"version": __version__})
        self.train_seconds = f.train_seconds.labels(client_id)
        self.samples_trained = f.samples_trained.labels(client_id)
        self.bytes_sent = f.bytes_sent.labels(client_id)
        self.bytes_received = f.bytes_received.labels(client_id)
        self.last_loss = f.last_loss.labels(client_id)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        return self.families.serve(port, addr)
