"""``genfl-client``: one federated client holding one data shard."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click
import torch

from genfl_shared.cli import log_format_option, log_level_option, option, setup_logging
from genfl_shared.partition import ShardError, load_shard

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
@option("--metrics-port", type=click.IntRange(0, 65535), default=None,
        help="Serve Prometheus /metrics on this port.")
@log_level_option
@log_format_option
def main(server, shard, client_id, device, threads, max_reconnect_seconds, metrics_port, log_level,
         log_format) -> None:
    """Register with the server and execute its train/evaluate tasks on the local shard until the
    server ends the run. Exit 0 when the run completed, non-zero on any fatal error."""
    setup_logging(log_level, log_format, "client")
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
        log.info("Prometheus metrics on :%d/metrics", metrics.serve(metrics_port))
    log.info("client %s: %d train / %d held-out %s samples from %s", client_id, data.num_train,
             data.num_heldout, data.dataset, shard)
    runner = ClientRunner(server, client_id, TaskExecutor(data, torch_device), metrics, dataset=data.dataset,
                          max_reconnect_seconds=max_reconnect_seconds)
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
    sys.exit(code)


if __name__ == "__main__":
    main()
