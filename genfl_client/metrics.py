"""Prometheus metrics of one client (served with ``genfl-client --metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from genfl_shared import __version__


class ClientMetrics:
    def __init__(self, client_id: str) -> None:
        r = self.registry = CollectorRegistry()
        Info("genfl_client_build", "GenFL build information", registry=r).info(
            {"version": __version__, "client_id": client_id})
        self.train_seconds = Counter("genfl_client_train_seconds_total", "Seconds spent in local training",
                                     registry=r)
        self.samples_trained = Counter("genfl_client_samples_trained_total",
                                       "Training samples processed (per task, all epochs counted once)",
                                       registry=r)
        self.bytes_sent = Counter("genfl_client_sent_bytes_total", "Model bytes sent to the server", registry=r)
        self.bytes_received = Counter("genfl_client_received_bytes_total", "Model bytes received",
                                      registry=r)
        self.last_loss = Gauge("genfl_client_last_train_loss", "Train loss of the last local training",
                               registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_address[1]
