"""``genfl-partition``: split MNIST / Fashion-MNIST into per-client shard files.

Every option can also come from an environment variable ``GENFL_<OPTION>`` (shown in
``--help``), which is how containers configure it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .cli_settings import run_options
from .data import DATASETS, NUM_CLASSES, DataFormatError
from .partition import PartitionError, partition_dataset

log = logging.getLogger(__name__)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _summary_table(summary: dict[str, Any]) -> str:
    """One line per client: sample counts and the per-class train counts (shows the skew at a glance)."""
    class_cols = "".join(f"{c:>6}" for c in range(NUM_CLASSES))
    lines = [f"{'client':<12}{'train':>7}{'heldout':>8} |{class_cols}"]
    for c in summary["clients"]:
        counts = "".join(f"{n:>6}" for n in c["train_class_counts"])
        lines.append(f"{c['client_id']:<12}{c['num_train']:>7}{c['num_heldout']:>8} |{counts}")
    total_train = sum(c["num_train"] for c in summary["clients"])
    total_heldout = sum(c["num_heldout"] for c in summary["clients"])
    lines.append(f"{'total':<12}{total_train:>7}{total_heldout:>8}")
    return "\n".join(lines)


def _source(ctx: click.Context, name: str) -> str:
    src = ctx.get_parameter_source(name)
    return "environment" if src is ParameterSource.ENVIRONMENT else "command line"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), required=True,
              envvar="GENFL_DATASET", show_envvar=True, help="Dataset to partition.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), required=True,
              envvar="GENFL_DATA_ROOT", show_envvar=True,
              help="Folder with the IDX files (or torchvision's MNIST/raw layout).")
@run_options("clients", preset_notes=False)  # required: checked in main (run options default to None)
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              envvar="GENFL_ALPHA", show_envvar=True,
              help="Dirichlet concentration; smaller = more label skew. Exclusive with --iid.")
@click.option("--iid", is_flag=True, default=False,
              envvar="GENFL_IID", show_envvar=True, help="Uniform random split. Exclusive with --alpha.")
@run_options("seed", preset_notes=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              envvar="GENFL_OUT", show_envvar=True, help="Output folder for shards and partition.json.")
@click.option("--heldout-fraction", type=click.FloatRange(min=0, max=1, max_open=True), default=0.1,
              envvar="GENFL_HELDOUT_FRACTION", show_envvar=True,
              help="Fraction of each client's samples kept as its local held-out set.")
@run_options("train_subset", preset_notes=False)
@click.option("--min-samples", type=click.IntRange(min=0), default=40,
              envvar="GENFL_MIN_SAMPLES", show_envvar=True,
              help="Redraw the Dirichlet split until every client has at least this many samples.")
@click.option("--download", is_flag=True, default=False,
              envvar="GENFL_DOWNLOAD", show_envvar=True,
              help="Download the dataset with torchvision if it is not under --data-root.")
@click.option("--log-level", type=click.Choice(_LOG_LEVELS, case_sensitive=False), default="INFO",
              envvar="GENFL_LOG_LEVEL", show_envvar=True, help="Logging verbosity (logs go to stderr).")
@click.pass_context
def main(
    ctx: click.Context,
    dataset: str,
    data_root: Path,
    clients: int | None,
    alpha: float | None,
    iid: bool,
    seed: int | None,
    out: Path,
    heldout_fraction: float,
    train_subset: int | None,
    min_samples: int,
    download: bool,
    log_level: str,
) -> None:
    """Partition a dataset's training split across federated clients.

    Writes one shard per client (client-000.npz, ...) holding only that client's train and
    held-out samples, plus partition.json describing the split.
    """
    # No force=True: when embedded (tests, a launcher) the host's logging setup is left alone.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if alpha is not None and iid:
        # Say where each came from: a stray GENFL_ALPHA / GENFL_IID in the environment is the usual cause.
        raise click.UsageError(
            f"--alpha (from the {_source(ctx, 'alpha')}) and --iid (from the {_source(ctx, 'iid')}) "
            "are mutually exclusive; give exactly one."
        )
    if alpha is None and not iid:
        raise click.UsageError("give exactly one of --alpha VALUE (Dirichlet split) or --iid.")
    if clients is None:
        raise click.UsageError("Missing option '--clients'.")
    seed = 0 if seed is None else seed

    started = time.perf_counter()
    try:
        summary = partition_dataset(
            dataset=dataset,
            data_root=data_root,
            num_clients=clients,
            alpha=None if iid else alpha,
            seed=seed,
            out_dir=out,
            heldout_fraction=heldout_fraction,
            train_subset=train_subset or None,  # 0: all, as in every tool
            min_samples=min_samples,
            download=download,
        )
    # Expected failures become a one-line message and exit status 1, not a traceback.
    except (OSError, PartitionError, DataFormatError) as exc:
        raise click.ClickException(str(exc)) from exc

    click.echo(_summary_table(summary))
    log.info(
        "%s split of %s (%d samples) into %d clients done in %.1f s -> %s",
        "IID" if iid else f"alpha={alpha}", dataset, summary["num_samples"], clients,
        time.perf_counter() - started, out,
    )


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="genfl-partition")
