"""DP-SGD for the clients' CVAE training, with Opacus (README.md, "Differential privacy").

Each step samples a batch by Poisson sampling (every sample of the shard joins independently with
probability q = batch_size / n, so batch sizes vary and may be 0), clips every per-sample gradient
to L2 norm ``max_grad_norm`` (Opacus' GradSampleModule computes them, its DPOptimizer clips, sums
and adds Gaussian noise of std ``noise_multiplier * max_grad_norm``), then takes the Adam step.
Poisson sampling is what the accountants' subsampled-Gaussian analysis assumes, so the ε reported
is the guarantee of exactly the steps that ran.

A client keeps ONE ``ClientPrivacy`` (one accountant) for the life of its process: ε accumulates
over every CVAE round it trains in, retried rounds included.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn

# Opacus (and torch) are imported where they are used: Opacus takes seconds to import and only DP
# runs need it; the settings and constants here are read by torch-free tools (genfl_shared.config).

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")
# Below 1/n for every shard of MNIST / Fashion-MNIST (n <= 60,000): a δ of 1/n or more would allow
# a mechanism that publishes one record outright.
DEFAULT_DELTA = 1e-5
# get_noise_multiplier's binary search stops when the final ε is within this of the target (below it).
EPSILON_TOLERANCE = 0.01


@dataclass(frozen=True)
class DPSettings:
    """A run's DP-SGD settings, as the CVAE TrainTask carries them."""

    max_grad_norm: float
    delta: float
    accountant: str
    noise_multiplier: float | None = None  # given; or None: calibrated to target_epsilon
    target_epsilon: float | None = None
    planned_rounds: int = 0  # CVAE rounds the target ε is spread over

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DP-SGD needs exactly one of a noise multiplier and a target epsilon")
        if self.target_epsilon is not None and self.planned_rounds < 1:
            raise ValueError("a target epsilon needs the number of rounds it is planned over (>= 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; expected one of {ACCOUNTANTS}")


def poisson_sampling(num_samples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate q, steps per epoch): an epoch is ceil(n / batch_size) steps, as without DP,
    each step a Poisson batch of expected size q * n = batch_size (q at most 1)."""
    return min(1.0, batch_size / num_samples), math.ceil(num_samples / batch_size)


def calibrated_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                                accountant: str) -> float:
    """The smallest noise multiplier (to EPSILON_TOLERANCE) whose ε after ``steps`` steps at
    ``sample_rate`` is at most ``target_epsilon`` (Opacus' get_noise_multiplier)."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                steps=steps, accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE)


class ClientPrivacy:
    """One client's privacy accounting over the whole run (one per client process)."""

    def __init__(self, settings: DPSettings, *, num_samples: int, batch_size: int, epochs: int):
        self.settings = settings
        self.shape = (num_samples, batch_size, epochs)
        self.sample_rate, self.steps_per_epoch = poisson_sampling(num_samples, batch_size)
        if settings.noise_multiplier is not None:
            self.noise_multiplier = settings.noise_multiplier
        else:
            planned_steps = settings.planned_rounds * epochs * self.steps_per_epoch
            self.noise_multiplier = calibrated_noise_multiplier(
                settings.target_epsilon, settings.delta, self.sample_rate, planned_steps, settings.accountant)
            log.info("DP-SGD: noise multiplier %.4f for ε <= %g (δ %g) over %d rounds of %d steps at q = %.4g",
                     self.noise_multiplier, settings.target_epsilon, settings.delta, settings.planned_rounds,
                     epochs * self.steps_per_epoch, self.sample_rate)
        from opacus.accountants import create_accountant

        self.accountant = create_accountant(settings.accountant)
        self.steps = 0

    def check_same_run(self, settings: DPSettings, *, num_samples: int, batch_size: int, epochs: int) -> None:
        """One accountant covers one set of settings; a task that changes them is refused."""
        if settings != self.settings or (num_samples, batch_size, epochs) != self.shape:
            raise ValueError(f"DP-SGD settings changed within the run ({settings} on n, B, E = "
                             f"{(num_samples, batch_size, epochs)}; the accountant was set up for {self.settings} "
                             f"on {self.shape})")

    def step(self) -> None:
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1

    def epsilon(self) -> float:
        """ε spent so far at the run's δ (0 before the first step)."""
        return 0.0 if self.steps == 0 else float(self.accountant.get_epsilon(delta=self.settings.delta))


def fit_dp(model: nn.Module, images: Tensor, labels: Tensor, per_sample_loss, *, epochs: int, lr: float,
           seed: int, privacy: ClientPrivacy, progress=None) -> dict:
    """``epochs`` epochs of DP-SGD (with a fresh Adam, as without DP) on tensors already on the device.

    ``per_sample_loss(model, x, y) -> [B]`` losses. Each step is Opacus' ghost clipping (Li et al.
    2022, "Large language models can be strong differentially private learners"): a first backward
    pass gives each sample's gradient norm from the layers' activations and output gradients alone,
    a second one the sum of the gradients scaled by each sample's clipping factor min(1, C / norm);
    then Gaussian noise of std sigma * C. The same mechanism (and accounting) as clipping
    materialised per-sample gradients, without B copies of the model's gradient: 6.5 x faster for
    the CVAE on a CPU (benchmarks/bench_dp_step.py). Every layer of the CVAE is a Linear layer, which
    ghost clipping covers exactly; a model with a layer it does not know is refused by Opacus.

    The batches come from a CPU generator and the noise from a device generator, both seeded by
    ``seed``, so a run is repeatable. Returns what train_cvae returns; the losses are per sampled sample."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    device = images.device
    n = images.shape[0]
    max_grad_norm = privacy.settings.max_grad_norm
    sampler = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                   max_grad_norm=max_grad_norm, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(torch.optim.Adam(model.parameters(), lr=lr),
                                                noise_multiplier=privacy.noise_multiplier,
                                                max_grad_norm=max_grad_norm, expected_batch_size=None,
                                                loss_reduction="sum", generator=noise)
    total_loss = epoch_loss = 0.0
    steps = 0
    try:
        for epoch in range(1, epochs + 1):
            epoch_sum = torch.zeros((), device=device)
            seen = 0
            for _ in range(privacy.steps_per_epoch):
                chosen = (torch.rand(n, generator=sampler) < privacy.sample_rate).nonzero().squeeze(1).to(device)
                seen += len(chosen)
                optimizer.zero_grad(set_to_none=True)
                losses = per_sample_loss(wrapped, images[chosen], labels[chosen])
                with warnings.catch_warnings():
                    # The first layer's input (the images) needs no gradient, which torch's full
                    # backward hooks (Opacus') warn about on every step; nothing is wrong.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    DPTensorFastGradientClipping(wrapped, optimizer, losses, "sum").backward()
                # An empty batch still takes its step: the noise alone (the analysis counts it).
                optimizer.step()
                privacy.step()
                epoch_sum += losses.detach().sum()
                steps += 1
            epoch_loss = epoch_sum.item() / max(seen, 1)
            total_loss += epoch_loss
            if progress is not None:
                progress(epoch, epoch_loss)
    finally:
        wrapped._close()  # removes the hooks: the model object is reused by later tasks
    return {"loss": total_loss / epochs, "last_epoch_loss": epoch_loss, "samples": n, "steps": steps}
