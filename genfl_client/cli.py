"""``genfl-client``: one federated client per data shard; several shards make a client host
(genfl_client.host): one process, one torch runtime, each shard still a separate client."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import click
import grpc
import torch

from genfl_shared.cli import log_format_option, log_level_option, option, setup_logging
from genfl_shared.partition import ShardError, load_shard
from genfl_shared.security import SecurityError, SecurityOptionsError, channel_credentials, read_token_file

from .executor import TaskExecutor
from .host import ClientHost
from .metrics import ClientMetricFamilies, ClientMetrics
from .runner import ClientRunner

log = logging.getLogger("genfl_client")


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--server", required=True, help="Server address host:port (the client always dials out).")
@option("--shard", "shards", type=click.Path(path_type=Path), required=True, multiple=True,
        help="A shard file (from genfl-partition). Repeat it to host several clients in this one process "
             "(GENFL_SHARD: paths separated by spaces): each shard is a separate client with its own "
             "registration, id, token and Presence stream; their tasks take turns on one torch runtime.")
@option("--client-id", default=None, help="Client identifier (default: the one in the shard; only with one "
        "--shard).")
@option("--device", default="cpu", help="Torch device for local training (cpu, cuda, cuda:0).")
@option("--threads", type=click.IntRange(0), default=0,
        help="Torch CPU threads (0: torch's default; 1 when many clients share a machine).")
@option("--max-reconnect-seconds", type=click.FloatRange(0), default=0.0,
        help="Give up after this long without reaching the server (0: retry forever).")
@option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Connect with TLS and verify the server against this PEM CA certificate.")
@option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Client certificate (PEM) for mutual TLS; needs --tls-key. Implies TLS (without --ca the "
             "server is verified against the system's CAs).")
@option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="PEM private key (unencrypted) of --tls-cert.")
@option("--tls-server-name", default=None,
        help="Name to verify in the server's certificate instead of the host in --server.")
@option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="File holding this client's token (from make-tokens), sent with every request (one --shard).")
@option("--token-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
        help="Folder holding each client's token as <client id>.token (as make-tokens writes them): the "
             "token form for several --shard.")
@option("--metrics-port", type=click.IntRange(0, 65535), default=None,
        help="Serve Prometheus /metrics on this port (every client of the process, by client_id label).")
@option("--linger-seconds", type=click.FloatRange(0), default=0.0,
        help="Keep serving /metrics this long after the run ends, so Prometheus scrapes the final values.")
@option("--share-label-counts/--no-share-label-counts", default=False,
        help="Tell the server at registration how many train images of each class the shard holds (a server "
             "with --client-synthetic-mix then sends synthetic images of the classes it lacks; README.md says "
             "what this reveals). Off unless asked for: nothing about the shard's labels leaves the client.")
@log_level_option
@log_format_option
def main(server, shards, client_id, device, threads, max_reconnect_seconds, ca, tls_cert, tls_key,
         tls_server_name, token_file, token_dir, metrics_port, linger_seconds, share_label_counts, log_level,
         log_format) -> None:
    """Register with the server and execute its train/evaluate tasks on the local shard(s) until the
    server ends the run. Exit 0 when the run completed, non-zero on any fatal error. With several
    --shard, a client that fails fatally is logged with its id, the others carry on until the run
    ends, and the process then exits non-zero (the worst client's code)."""
    setup_logging(log_level, log_format, "client")
    if len(shards) > 1 and client_id is not None:
        raise click.UsageError("--client-id names one client: with several --shard each uses its shard's id")
    if len(shards) > 1 and token_file is not None:
        raise click.UsageError("--token-file holds one client's token: with several --shard give --token-dir")
    if token_file is not None and token_dir is not None:
        raise click.UsageError("give --token-file or --token-dir, not both")
    credentials = _credentials(ca, tls_cert, tls_key, tls_server_name)
    if (token_file or token_dir) is not None and credentials is None:
        log.warning("%s without TLS: the token crosses the network in plaintext; add --ca",
                    "--token-file" if token_file is not None else "--token-dir")
    if threads:
        torch.set_num_threads(threads)
    try:
        data = [load_shard(path) for path in shards]
    except ShardError as error:
        log.error("cannot use shard: %s", error)
        sys.exit(2)
    client_ids = [client_id] if client_id else [d.client_id for d in data]
    if len(set(client_ids)) != len(client_ids):
        raise click.BadParameter(f"the shards name the same client twice: {client_ids}", param_hint="--shard")
    if token_file is not None:
        tokens = [_read_token(token_file, "--token-file")]
    elif token_dir is not None:
        tokens = [_read_token(token_dir / f"{cid}.token", "--token-dir") for cid in client_ids]
    else:
        tokens = [None] * len(client_ids)
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        log.error("bad --device %r: %s", device, error)
        sys.exit(2)
    families = ClientMetricFamilies()
    if metrics_port is not None:
        try:
            log.info("Prometheus metrics on :%d/metrics", families.serve(metrics_port))
        except OSError as error:  # in use, not permitted: a usage problem, like a bad --device
            log.error("cannot serve metrics on --metrics-port %d: %s", metrics_port, error.strerror or error)
            sys.exit(2)
    compute_lock = threading.Lock() if len(shards) > 1 else None
    runners = []
    for path, shard, cid, token in zip(shards, data, client_ids, tokens):
        log.info("client %s: %d train / %d held-out %s samples from %s", cid, shard.num_train,
                 shard.num_heldout, shard.dataset, path)
        runners.append(ClientRunner(server, cid, TaskExecutor(shard, torch_device, compute_lock),
                                    ClientMetrics(cid, families), dataset=shard.dataset,
                                    max_reconnect_seconds=max_reconnect_seconds, credentials=credentials,
                                    tls_server_name=tls_server_name, token=token,
                                    share_label_counts=share_label_counts))
    host = ClientHost(runners)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = host.run()
    except KeyboardInterrupt:
        code = 130
    finally:
        host.close()
    if metrics_port is not None and linger_seconds and code in (0, 1):
        log.info("run over; serving /metrics for %.0f s more", linger_seconds)
        time.sleep(linger_seconds)
    sys.exit(code)


def _credentials(ca: Path | None, cert: Path | None, key: Path | None,
                 server_name: str | None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from the options (checked with the ssl module), or None: plaintext."""
    try:
        return channel_credentials(ca, cert, key, server_name)
    except SecurityOptionsError as error:
        raise click.UsageError(str(error)) from None
    except SecurityError as error:
        raise click.BadParameter(str(error), param_hint="--ca / --tls-cert / --tls-key") from None


def _read_token(path: Path, option_name: str = "--token-file") -> str:
    try:
        return read_token_file(path)
    except SecurityError as error:
        raise click.BadParameter(str(error), param_hint=option_name) from None


if __name__ == "__main__":
    main()
