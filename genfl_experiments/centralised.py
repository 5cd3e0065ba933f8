"""``genfl-centralised``: the CAS reference point, a CVAE trained centrally on all the training data.

Not federated on purpose: it is the upper bound that federated CVAEs are compared with in
genfl-sweep's ``cas.md``. It trains on as many images as the clients train on together (the
partitioner's pool, i.e. the same ``--train-subset`` draw, less the 10 % the clients hold out), makes
as many passes over them as each client makes in the federated CVAE phase (rounds x local epochs),
then samples and scores exactly like the server (same sample count, CAS epochs, optimiser and seeds).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import torch

from genfl_shared.checkpoint import save_checkpoint
from genfl_shared.cli import log_level_option, option, setup_logging
from genfl_shared.cli_settings import given_run_options, resolve_config, run_options
from genfl_shared.config import PRESETS, RunConfig
from genfl_shared.data import DATASETS, DataFormatError, DatasetNotFoundError, load_dataset, to_float_images
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.partition import HELDOUT_FRACTION, training_pool
from genfl_shared.runfiles import SUMMARY_JSON, write_json_atomic
from genfl_shared.seeding import derive_seed
from genfl_shared.synthetic import sample_synthetic, save_grid, train_on_synthetic
from genfl_shared.training import evaluate_classifier, train_cvae


log = logging.getLogger("genfl_centralised")

# The run settings that shape the centralised reference besides the seed (the rest keep the preset's
# values); genfl-sweep gives its centralised cells the sweep's values of these.
CENTRALISED_FIELDS = ("train_subset", "cvae_rounds", "local_epochs", "synthetic_samples", "cas_epochs")


def training_images(dataset: str, data_root: Path, cfg: RunConfig, seed: int,
                    heldout_fraction: float = HELDOUT_FRACTION):
    """As many images as the federated clients train on together: the partitioner's pool (the whole
    train split, or its --train-subset draw) less a random ``heldout_fraction``, the share each
    client holds out for evaluation."""
    images, labels = load_dataset(dataset, data_root, "train")
    pool = torch.from_numpy(training_pool(labels.numpy(), cfg.data.train_subset, seed))
    images, labels = images[pool], labels[pool]
    keep = len(labels) - int(round(len(labels) * heldout_fraction))
    generator = torch.Generator().manual_seed(derive_seed(seed, "centralised-heldout"))
    rows = torch.randperm(len(labels), generator=generator)[:keep].sort().values
    return images[rows], labels[rows]


def run_centralised(dataset: str, data_root: Path, cfg: RunConfig, out: Path, device: torch.device) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    images, labels = training_images(dataset, data_root, cfg, cfg.reproducibility.seed)
    test_images, test_labels = load_dataset(dataset, data_root, "test")
    test_set = (to_float_images(test_images, binarize=cfg.data.binarize).to(device), test_labels.to(device))
    epochs = cfg.training.cvae_rounds * cfg.training.local_epochs
    started = time.perf_counter()
    cvae = model_from_state("cvae", initial_state("cvae", cfg.reproducibility.seed), device)

    def progress(epoch: int, loss: float) -> None:
        log.info("centralised CVAE: epoch %d/%d, loss %.4f (%.1f s)", epoch, epochs, loss,
                 time.perf_counter() - started)

    train_cvae(cvae, to_float_images(images, binarize=cfg.data.binarize), labels, epochs=epochs,
               batch_size=cfg.training.batch_size, lr=cfg.training.cvae_lr,
               seed=derive_seed(cfg.reproducibility.seed, "centralised"), device=device, progress=progress)
    cvae_seconds = time.perf_counter() - started
    save_checkpoint(out / "cvae.pt", "cvae", cvae.state_dict())

    started = time.perf_counter()
    synthetic_images, synthetic_labels = sample_synthetic(cvae, cfg.pretraining.synthetic_samples,
                                                          seed=derive_seed(cfg.reproducibility.seed, "synthetic"),
                                                          device=device)
    save_grid(synthetic_images, synthetic_labels, out / "synthetic_samples.png")
    cas_state = train_on_synthetic(cfg, synthetic_images, synthetic_labels, epochs=cfg.pretraining.cas_epochs,
                                   purpose="cas", device=device)
    cas = evaluate_classifier(model_from_state("classifier", cas_state, device), *test_set, device=device)["accuracy"]
    summary = {"dataset": dataset, "seed": cfg.reproducibility.seed, "train_images": len(labels), "cvae_epochs": epochs,
               "cvae_seconds": cvae_seconds, "cas": cas, "cas_seconds": time.perf_counter() - started,
               "config": cfg.to_dict(), "device": str(device)}
    write_json_atomic(out / SUMMARY_JSON, summary)
    log.info("centralised CVAE (%d images, %d epochs): CAS %.4f", len(labels), epochs, cas)
    return summary


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--dataset", type=click.Choice(sorted(DATASETS)), default="mnist")
@option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@option("--preset", type=click.Choice(sorted(PRESETS)), default="paper")
@run_options(*CENTRALISED_FIELDS, "seed")
@option("--device", default="cpu")
@option("--threads", type=click.IntRange(0), default=0, help="Torch CPU threads (0: torch's default).")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@log_level_option
def main(dataset, data_root, preset, device, threads, out, log_level, **run_settings):
    """Train a CVAE on all the training data in one place and score its samples (CAS)."""
    setup_logging(log_level, "text", "centralised")
    if threads:
        torch.set_num_threads(threads)
    cfg = resolve_config(preset, given_run_options(run_settings))
    try:
        run_centralised(dataset, data_root, cfg, out, torch.device(device))
    except (DatasetNotFoundError, DataFormatError) as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
