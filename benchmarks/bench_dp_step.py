"""CPU seconds per CVAE epoch: plain training, DP-SGD as fit_dp does it (Opacus' ghost clipping), and
DP-SGD with materialised per-sample gradients (Opacus' GradSampleModule: the alternative ghost clipping saves).

    python benchmarks/bench_dp_step.py [--samples 900] [--repeats 3] [--threads 1] [--device cpu]

900 samples is a quick-preset client's shard (10,000 training images over 10 clients, 10 % held
out); batch 32 as in the paper. The DP runs use noise multiplier 1.0 and clipping bound 1.0.
"""

from __future__ import annotations

import time
import warnings

import click
import torch

import _common as c
from genfl_shared.dp import ClientPrivacy, DPSettings, fit_dp
from genfl_shared.models import build_model, initial_state
from genfl_shared.training import _cvae_per_sample_loss, train_cvae

BATCH = 32


def per_sample_gradients_epoch(model, images, labels, privacy: ClientPrivacy, seed: int) -> int:
    """One epoch of DP-SGD with per-sample gradients materialised (B copies of the gradient)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    n = images.shape[0]
    sampler = torch.Generator().manual_seed(seed)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), noise_multiplier=privacy.noise_multiplier,
                            max_grad_norm=privacy.settings.max_grad_norm, expected_batch_size=None,
                            loss_reduction="sum", generator=torch.Generator().manual_seed(seed + 1))
    try:
        for _ in range(privacy.steps_per_epoch):
            chosen = (torch.rand(n, generator=sampler) < privacy.sample_rate).nonzero().squeeze(1)
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                _cvae_per_sample_loss(wrapped, images[chosen], labels[chosen]).sum().backward()
            optimizer.step()
    finally:
        wrapped._close()
    return privacy.steps_per_epoch


def timed(run) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


@click.command(context_settings={"show_default": True})
@click.option("--samples", type=click.IntRange(BATCH), default=900)
@click.option("--repeats", type=click.IntRange(1), default=3)
@click.option("--threads", type=click.IntRange(1), default=1, help="torch threads (a client host's default is 1).")
def main(samples: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    print(c.machine_line())
    images = torch.rand(samples, 1, 28, 28)
    labels = torch.randint(0, 10, (samples,))
    settings = DPSettings(max_grad_norm=1.0, delta=1e-5, accountant="rdp", noise_multiplier=1.0)

    def fresh():
        model = build_model("cvae")
        model.load_state_dict(initial_state("cvae", 0))
        return model

    def privacy():
        return ClientPrivacy(settings, num_samples=samples, batch_size=BATCH, epochs=1)

    runs = {
        "plain training": lambda: train_cvae(fresh(), images, labels, epochs=1, batch_size=BATCH, lr=1e-3, seed=1,
                                             device="cpu"),
        "DP-SGD, ghost clipping (fit_dp)": lambda: fit_dp(fresh(), images, labels, _cvae_per_sample_loss, epochs=1,
                                                          lr=1e-3, seed=1, privacy=privacy()),
        "DP-SGD, per-sample gradients (before)": lambda: per_sample_gradients_epoch(fresh(), images, labels,
                                                                                   privacy(), seed=1),
    }
    seconds = {name: [timed(run) for _ in range(repeats)] for name, run in runs.items()}
    for name, values in seconds.items():
        c.result(f"CVAE epoch of {samples} samples, batch {BATCH}: {name}", c.median(values), "CPU-s",
                 extra="runs: " + ", ".join(f"{v:.3f}" for v in values))
    plain = c.median(seconds["plain training"])
    for name in list(runs)[1:]:
        print(f"  {name}: {c.median(seconds[name]) / plain:.1f} x plain")


if __name__ == "__main__":
    main()
