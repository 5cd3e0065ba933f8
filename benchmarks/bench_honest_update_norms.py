"""Honest runs are never touched by the hostile-client bounds (genfl_server/guard.py).

For IID, alpha = 0.1 and alpha = 0.01, this runs the two federated phases (CVAE, then the
classifier from a seeded random start) in-process with the real models, the real local training
of genfl-client at the quick preset's settings (optimisers, learning rates, batch size, local
epochs) and the server's UpdateGuard + FedAvg, on a reduced training subset. Each round it records
every update's distance ||w_client - w_global|| and prints the largest ratio to the round's median
(the default adaptive bound rejects above DEFAULT_UPDATE_NORM_FACTOR) and the largest FedAvg
weight share of one client (capped at DEFAULT_MAX_CLIENT_WEIGHT_SHARE). Target: no update
rejected or clipped, no weight cut, in every round.

    python benchmarks/bench_honest_update_norms.py               # ~5 min on 2 CPU cores
    python benchmarks/bench_honest_update_norms.py --train-subset 10000 --rounds 5   # closer to quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from genfl_server.guard import DEFAULT_UPDATE_NORM_FACTOR, UpdateGuard
from genfl_server.strategy import FedAvg
from genfl_shared.config import PRESETS
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.partition import dirichlet_partition, iid_partition, split_train_heldout, training_pool
from genfl_shared.training import train_classifier, train_cvae

from _common import DEFAULT_DATA_ROOT


def client_shards(labels: np.ndarray, distribution: str, clients: int, subset: int, seed: int):
    pool = training_pool(labels, subset, seed)
    if distribution == "iid":
        parts = iid_partition(len(pool), clients, seed)
    else:
        parts = dirichlet_partition(labels[pool], clients, float(distribution), seed)
    return [split_train_heldout(pool[part], rng=seed + i)[0] for i, part in enumerate(parts)]


def local_training(kind: str, state, x, y, seed: int, cfg):
    model = model_from_state(kind, state, torch.device("cpu"))
    if kind == "cvae":
        train_cvae(model, x, y, epochs=cfg.training.local_epochs, batch_size=cfg.training.batch_size,
                   lr=cfg.training.cvae_lr, seed=seed, device="cpu")
    else:
        train_classifier(model, x, y, epochs=cfg.training.local_epochs, batch_size=cfg.training.batch_size,
                         optimizer="sgd", lr=cfg.training.classifier_lr, momentum=cfg.training.sgd_momentum,
                         seed=seed, device="cpu")
    return {k: v.detach() for k, v in model.state_dict().items()}


def measure(distribution: str, images, labels, args, cfg) -> dict:
    shards = client_shards(labels, distribution, args.clients, args.train_subset, args.seed)
    counts = {f"client-{i:03d}": len(s) for i, s in enumerate(shards)}
    guard = UpdateGuard()
    worst_ratio, worst_share, flagged, cut = 0.0, max(counts.values()) / sum(counts.values()), 0, 0
    for kind in ("cvae", "classifier"):
        state = initial_state(kind, args.seed)
        for rnd in range(1, args.rounds + 1):
            round_guard = guard.round(state, counts)
            strategy = FedAvg()
            strategy.begin(state)
            for i, (client_id, shard) in enumerate(zip(counts, shards)):
                update = local_training(kind, state, images[shard], labels_t[shard], 1000 * rnd + i, cfg)
                weight, update = round_guard.admit(client_id, len(shard), update)
                cut += weight != len(shard)
                strategy.accumulate(update, weight)
            flagged += len(round_guard.offenders()) + len(round_guard.clipped)
            ratio = round_guard.ratio_to_median()
            worst_ratio = max(worst_ratio, ratio)
            print(f"  {distribution:>5} {kind:<10} round {rnd}: max/median update distance {ratio:.2f} "
                  f"(median {round_guard.median_distance():.4g})", flush=True)
            state = strategy.finish()
    return {"ratio": worst_ratio, "share": worst_share, "flagged": flagged, "cut": cut,
            "sizes": sorted(counts.values())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--train-subset", type=int, default=3000, help="training images over all clients")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distributions", default="iid,0.1,0.01", help="comma-separated: iid or an alpha")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS["quick"]
    raw_images, raw_labels = load_dataset("mnist", args.data_root, "train")
    images, labels_t = to_float_images(raw_images, binarize=cfg.data.binarize), raw_labels
    labels = raw_labels.numpy()
    started = time.perf_counter()
    total_flagged = 0
    worst = 0.0
    for distribution in args.distributions.split(","):
        result = measure(distribution, images, labels, args, cfg)
        total_flagged += result["flagged"] + result["cut"]
        worst = max(worst, result["ratio"])
        print(f"{distribution:>5}: max update distance / round median = {result['ratio']:.2f} (bound "
              f"{DEFAULT_UPDATE_NORM_FACTOR:g}); largest client weight share {result['share']:.3f} (cap 0.5); "
              f"rejected or clipped {result['flagged']}, weights cut {result['cut']}; shard sizes {result['sizes']}")
    print(f"max norm ratio over all rounds: {worst:.2f} < {DEFAULT_UPDATE_NORM_FACTOR:g}: "
          f"{'PASS' if worst < DEFAULT_UPDATE_NORM_FACTOR and total_flagged == 0 else 'MISS'} "
          f"({time.perf_counter() - started:.0f} s)")
