"""``genfl-client``: one federated client holding one data shard."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import click
import grpc
import torch

from genfl_shared.cli import log_format_option, log_level_option, option, setup_logging
from genfl_shared.partition import ShardError, load_shard
from genfl_shared.security import SecurityError, SecurityOptionsError, channel_credentials, read_token_file

from .executor import TaskExecutor
from .metrics import ClientMetrics
from .runner import ClientRunner, FatalClientError

log = logging.getLogger("genfl_client")


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--server", required=True, help="Server address host:port (the client always dials out).")
@option("--shard", type=click.Path(path_type=Path), required=True,
        help="This client's shard file (from genfl-partition).")
@option("--client-id", default=None, help="Client identifier (default: the one in the shard).")
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
        help="File holding this client's token (from make-tokens), sent with every request.")
@option("--metrics-port", type=click.IntRange(0, 65535), default=None,
        help="Serve Prometheus /metrics on this port.")
@option("--linger-seconds", type=click.FloatRange(0), default=0.0,
        help="Keep serving /metrics this long after the run ends, so Prometheus scrapes the final values.")
@log_level_option
@log_format_option
def main(server, shard, client_id, device, threads, max_reconnect_seconds, ca, tls_cert, tls_key,
         tls_server_name, token_file, metrics_port, linger_seconds, log_level, log_format) -> None:
    """Register with the server and execute its train/evaluate tasks on the local shard until the
    server ends the run. Exit 0 when the run completed, non-zero on any fatal error."""
    setup_logging(log_level, log_format, "client")
    credentials = _credentials(ca, tls_cert, tls_key, tls_server_name)
    token = _read_token(token_file) if token_file is not None else None
    if token is not None and credentials is None:
        log.warning("--token-file without TLS: the token crosses the network in plaintext; add --ca")
    if threads:
        torch.set_num_threads(threads)
    try:
        data = load_shard(shard)
    except ShardError as error:
        log.error("cannot use shard: %s", error)
        sys.exit(2)
    client_id = client_id or data.client_id
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        log.error("bad --device %r: %s", device, error)
        sys.exit(2)
    metrics = ClientMetrics(client_id)
    if metrics_port is not None:
        try:
            log.info("Prometheus metrics on :%d/metrics", metrics.serve(metrics_port))
        except OSError as error:  # in use, not permitted: a usage problem, like a bad --device
            log.error("cannot serve metrics on --metrics-port %d: %s", metrics_port, error.strerror or error)
            sys.exit(2)
    log.info("client %s: %d train / %d held-out %s samples from %s", client_id, data.num_train,
             data.num_heldout, data.dataset, shard)
    runner = ClientRunner(server, client_id, TaskExecutor(data, torch_device), metrics, dataset=data.dataset,
                          max_reconnect_seconds=max_reconnect_seconds, credentials=credentials,
                          tls_server_name=tls_server_name, token=token)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = runner.run()
    except FatalClientError as error:
        log.error("%s", error)
        code = 3
    except KeyboardInterrupt:
        code = 130
    finally:
        runner.close()
    if code == 1:
        log.error("the server reported that the run failed")
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


def _read_token(path: Path) -> str:
    try:
        return read_token_file(path)
    except SecurityError as error:
        raise click.BadParameter(str(error), param_hint="--token-file") from None


if __name__ == "__main__":
    main()
