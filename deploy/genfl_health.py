#!/usr/bin/env python3
"""``genfl-health``: the standard gRPC health protocol for GenFL containers (installed in the image).

``genfl-health probe [--address localhost:50051] [--service NAME] [--timeout 2] [TLS options]``
    Ask a server's health service; exit 0 when it answers SERVING, 1 otherwise (NOT_SERVING,
    unreachable, no answer in time). Against a TLS server: ``--ca ca.pem`` (and, when it requires
    client certificates, ``--tls-cert``/``--tls-key``; ``--tls-server-name`` when the address is not a
    name in the server's certificate), as for genfl-client. The docker compose healthcheck of the server uses it; Kubernetes
    uses its native gRPC probe instead. ``genfl-server`` answers for "" (the whole server) and
    ``genfl.v2.FederatedLearning``: NOT_SERVING until it listens with its data loaded, SERVING while
    the run goes on.

``genfl-health idle [--port 50051] [--tls-cert C --tls-key K [--client-ca CA]]``
    Serve only the health service (with TLS, and mutual TLS, like the server it stands in for), "" SERVING and ``genfl.v2.FederatedLearning`` NOT_SERVING, until
    SIGTERM/SIGINT: what ``genfl-entrypoint once server`` runs after a completed run, so that
    Kubernetes sees the pod alive (liveness: "") but not ready (readiness: the service) and neither
    restarts it into a new run nor routes clients to it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE_NAME = "genfl.v2.FederatedLearning"


def _read(path: str | None) -> bytes | None:
    return None if path is None else open(path, "rb").read()


def _channel(address: str, ca: str | None, cert: str | None, key: str | None,
             server_name: str | None) -> grpc.Channel:
    if ca is None and cert is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                               certificate_chain=_read(cert))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def probe(address: str, service: str, timeout: float, ca: str | None = None, cert: str | None = None,
          key: str | None = None, server_name: str | None = None) -> int:
    try:
        with _channel(address, ca, cert, key, server_name) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as error:
        print(f"{address} {service or '(server)'}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> bool:
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials) != 0
        return server.add_insecure_port(address) != 0
    except RuntimeError:  # newer grpcio raises instead of returning 0
        return False


def idle(port: int, cert: str | None = None, key: str | None = None, client_ca: str | None = None) -> int:
    credentials = None
    if cert is not None:
        credentials = grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=_read(client_ca),
                                                  require_client_auth=client_ca is not None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    if not any(_listen(server, f"{host}:{port}", credentials) for host in ("[::]", "0.0.0.0")):
        print(f"genfl-health: cannot listen on port {port}", file=sys.stderr)
        return 1
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"genfl-health: idle, answering health checks on :{port}", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(grace=1).wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfl-health", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("probe", help="check a server's health; exit 0 when SERVING")
    p.add_argument("--address", default="localhost:50051", help="host:port of the gRPC server")
    p.add_argument("--service", default="", help='service to ask about ("" = the whole server)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    p.add_argument("--ca", help="TLS: verify the server against this CA (PEM)")
    p.add_argument("--tls-cert", help="mutual TLS: this client certificate (PEM)")
    p.add_argument("--tls-key", help="mutual TLS: the private key of --tls-cert (PEM)")
    p.add_argument("--tls-server-name", help="name to verify in the server's certificate")
    i = commands.add_parser("idle", help="serve health only (alive, not ready) until SIGTERM")
    i.add_argument("--port", type=int, default=50051, help="port to listen on (all interfaces)")
    i.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    i.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    i.add_argument("--client-ca", help="mutual TLS: require client certificates signed by this CA")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.command == "probe":
        return probe(args.address, args.service, args.timeout, args.ca, args.tls_cert, args.tls_key,
                     args.tls_server_name)
    if args.client_ca is not None and args.tls_cert is None:
        parser.error("--client-ca needs --tls-cert and --tls-key")
    return idle(args.port, args.tls_cert, args.tls_key, args.client_ca)


if __name__ == "__main__":
    sys.exit(main())
