#!/usr/bin/env python3
"""``genfl-health``: the standard gRPC health protocol for GenFL containers (installed in the image).

``genfl-health probe [--address localhost:50051] [--service NAME] [--timeout 2]``
    Ask a server's health service; exit 0 when it answers SERVING, 1 otherwise (NOT_SERVING,
    unreachable, no answer in time). The docker compose healthcheck of the server uses it; Kubernetes
    uses its native gRPC probe instead. ``genfl-server`` answers for "" (the whole server) and
    ``genfl.v1.FederatedLearning``: NOT_SERVING until it listens with its data loaded, SERVING while
    the run goes on.

``genfl-health idle [--port 50051]``
    Serve only the health service, "" SERVING and ``genfl.v1.FederatedLearning`` NOT_SERVING, until
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

SERVICE_NAME = "genfl.v1.FederatedLearning"


def probe(address: str, service: str, timeout: float) -> int:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as error:
        print(f"{address} {service or '(server)'}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _listen(server: grpc.Server, address: str) -> bool:
    try:
        return server.add_insecure_port(address) != 0
    except RuntimeError:  # newer grpcio raises instead of returning 0
        return False


def idle(port: int) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    if not any(_listen(server, f"{host}:{port}") for host in ("[::]", "0.0.0.0")):
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
    i = commands.add_parser("idle", help="serve health only (alive, not ready) until SIGTERM")
    i.add_argument("--port", type=int, default=50051, help="port to listen on (all interfaces)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "probe":
        return probe(args.address, args.service, args.timeout)
    return idle(args.port)


if __name__ == "__main__":
    sys.exit(main())
