"""Server time of one CVAE round per --cvae-aggregation mode, and the memory the ensemble keeps.

A CVAE round's server-side work after the clients' updates arrive, on real CVAE weights and the
real MNIST test set: fold K updates into the strategy (FedAvg), the mode's post-aggregation step
(ensemble: keep each accepted update as its client's model; classwise: the label columns; distill:
``--cvae-distill-steps`` decoder steps), and the test-set evaluation of what the server samples
(one CVAE, or the ensemble's mixture). Target: the ensemble's round at most 2x FedAvg's. Each
client's update is a CVAE trained one epoch on a one-class shard of 100 images, so the class
shares are those of extreme skew.
"""

from __future__ import annotations

import time

import click
import torch

import _common as c


@click.command(context_settings={"show_default": True})
@click.option("--data-root", default="../shared/data/mnist", help="MNIST IDX folder.")
@click.option("--clients", type=click.IntRange(2), default=10)
@click.option("--repeats", type=click.IntRange(1), default=3)
@click.option("--threads", type=click.IntRange(0), default=0, help="Torch threads (0: torch's default).")
def main(data_root: str, clients: int, repeats: int, threads: int) -> None:
    """Time a CVAE round's server work for each --cvae-aggregation mode."""
    from genfl_server.engine import RoundModels
    from genfl_server.generator import (ClassShares, ClasswiseConditioning, DistilledDecoder, KeepClientModels,
                                        ensemble_of)
    from genfl_server.strategy import FedAvg
    from genfl_server.updates import TensorUpdate
    from genfl_shared.data import load_dataset, to_float_images
    from genfl_shared.models import initial_state, model_from_state
    from genfl_shared.training import evaluate_cvae, train_cvae

    if threads:
        torch.set_num_threads(threads)
    print(c.machine_line())
    cpu = torch.device("cpu")
    images, labels = load_dataset("mnist", data_root, "train")
    test_images, test_labels = load_dataset("mnist", data_root, "test")
    test = (to_float_images(test_images), test_labels)
    start = initial_state("cvae", 0)
    updates, counts = {}, {}
    for k in range(clients):
        cls = k % 10
        chosen = (labels == cls).nonzero().flatten()[:100]
        model = model_from_state("cvae", start, cpu)
        train_cvae(model, to_float_images(images[chosen]), labels[chosen], epochs=1, batch_size=32, lr=1e-3, seed=k,
                   device=cpu)
        updates[f"client-{k:03d}"] = {n: t.detach().clone() for n, t in model.state_dict().items()}
        counts[f"client-{k:03d}"] = [100 if c_ == cls else 0 for c_ in range(10)]
    shares = ClassShares.from_counts(counts, cap=1.0)

    def fold() -> dict:
        strategy = FedAvg()
        strategy.begin(start)
        for update in updates.values():
            strategy.accumulate(TensorUpdate(update), 100)
        return strategy.finish()

    def fedavg_round():
        aggregate = fold()
        evaluate_cvae(model_from_state("cvae", aggregate, cpu), *test, seed=0, device=cpu)

    def ensemble_round():
        aggregate = fold()
        models: dict = {}
        KeepClientModels(models)(1, aggregate, RoundModels(start, updates))
        ensemble_of(models, shares).evaluate(*test, seed=0, device=cpu)

    def classwise_round():
        aggregate = fold()
        new, _ = ClasswiseConditioning(shares)(1, aggregate, RoundModels(start, updates))
        evaluate_cvae(model_from_state("cvae", new, cpu), *test, seed=0, device=cpu)

    def distill_round():
        aggregate = fold()
        new, _ = DistilledDecoder(shares, 200, 0, cpu)(1, aggregate, RoundModels(start, updates))
        evaluate_cvae(model_from_state("cvae", new, cpu), *test, seed=0, device=cpu)

    timings = {}
    for name, work in (("fedavg", fedavg_round), ("classwise", classwise_round), ("ensemble", ensemble_round),
                       ("distill", distill_round)):
        work()  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        timings[name] = c.median(times)
    base = timings["fedavg"]
    c.result(f"fedavg CVAE round, server work ({clients} clients)", base, "s")
    for name in ("classwise", "ensemble", "distill"):
        c.result(f"{name} / fedavg server time per CVAE round", timings[name] / base, "x",
                 target=2.0 if name == "ensemble" else None, extra=f"{timings[name]:.3f} s")
    model_bytes = sum(t.numel() * t.element_size() for t in start.values())
    c.result(f"ensemble: server memory kept for {clients} client CVAEs", clients * model_bytes / 2**20, "MiB",
             extra=f"{model_bytes / 2**20:.2f} MiB per client, K x model")


if __name__ == "__main__":
    main()
