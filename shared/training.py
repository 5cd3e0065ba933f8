"""Training and evaluation loops over tensors that are already in memory.

Every data set GenFL touches (a client's MNIST shard, the server's synthetic set) is at
most 60,000 tiny images, i.e. under 200 MB as float32, so the loops take whole tensors,
move them to the device once, and slice batches out of a per-epoch permutation. That is
much faster than a ``DataLoader`` with per-sample transforms and makes runs reproducible:
the shuffling comes from a ``torch.Generator`` seeded by the caller.

Conventions shared by all functions here:

* ``images``: float32 ``[N, 1, 28, 28]`` in ``[0, 1]``; ``labels``: int64 ``[N]``.
* Results are plain ``dict``s of Python ``float``/``int`` so that they can be logged,
  serialised to JSON or put into protobuf messages without conversion.
* ``epochs == 0`` means "do not train": the model is left untouched and the result is
  ``{"loss": nan, "last_epoch_loss": nan, "samples": N, "steps": 0}``. (No evaluation pass
  is run instead: callers that want a loss for an untrained model should call the
  ``evaluate_*`` function explicitly, which keeps the cost of each call obvious.)
* Training functions put the model in ``train()`` mode and evaluation functions in
  ``eval()`` mode; both restore the mode the model had before the call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dp import ClientPrivacy, fit_dp
from .models import cvae_loss, cvae_loss_per_sample

__all__ = ["balanced_cross_entropy", "evaluate_classifier", "evaluate_cvae", "label_log_prior", "train_classifier",
           "train_cvae"]

logger = logging.getLogger(__name__)

DeviceLike = str | torch.device


def _prepare(
    images: Tensor, labels: Tensor, device: DeviceLike
) -> tuple[Tensor, Tensor, torch.device]:
    """Validate the inputs and move them to ``device`` (a no-op when already there)."""
    device = torch.device(device)
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be [N] with N == images.shape[0] ({images.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("cannot train or evaluate on an empty data set (N == 0)")
    images = images.to(device=device, dtype=torch.float32)
    labels = labels.to(device=device, dtype=torch.int64)
    return images, labels, device


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_hyperparameters(epochs: int, batch_size: int) -> None:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    _check_batch_size(batch_size)


def _batch_bounds(n: int, batch_size: int, *, avoid_singleton: bool = False) -> list[tuple[int, int]]:
    """``(start, end)`` of each batch of an epoch over ``n`` samples.

    With ``avoid_singleton`` a trailing batch of one sample is merged into the batch
    before it, because BatchNorm cannot compute batch statistics from a single value
    per channel (ExquisiteNetV1's last stage is 1x1 spatially).
    """
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if avoid_singleton and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def _permutations(n: int, epochs: int, seed: int, device: torch.device) -> Iterator[Tensor]:
    """One shuffled index tensor per epoch, drawn on CPU so the order is device-independent."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield torch.randperm(n, generator=generator).to(device)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Switch ``model`` to train/eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _to_device_channels_last(model: nn.Module, device: torch.device) -> None:
    """Move a conv net to ``device`` in channels-last layout: the same weights and maths, but
    oneDNN's convolutions (ExquisiteNetV1's 1x1 and depthwise 3x3) run about twice as fast on CPU
    in that layout. Single-channel inputs are channels-last already, so batches need no copy."""
    model.to(device=device, memory_format=torch.channels_last)


def _untrained_result(n: int) -> dict:
    return {"loss": math.nan, "last_epoch_loss": math.nan, "samples": n, "steps": 0}


class _StepRunner:
    """One optimisation step per batch, the same maths on every device.

    On CUDA, full-size batches replay one captured CUDA graph of forward + backward + optimiser
    step. Batch-32 steps of these small models are bound by kernel-launch overhead (hundreds of
    tiny kernels per step), so replaying the whole step as one graph is several times faster.
    Other batch sizes (an epoch's last batch) run eagerly on the same parameters, gradients and
    optimiser state. ``batch_loss(model, x, y) -> (loss to backpropagate, batch loss sum)``.
    """

    WARMUP_STEPS = 3

    def __init__(self, model, optimizer, batch_loss, batch_size: int, use_graph: bool):
        self.model, self.optimizer, self.batch_loss = model, optimizer, batch_loss
        self.batch_size = batch_size
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        if self.use_graph and x.shape[0] == self.batch_size:
            if self.graph is None:
                self._capture(x, y)
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            return self.static_sum
        # Eager step. Once a graph exists its gradient tensors must stay in place (the graph
        # writes into them), so they are zeroed rather than dropped.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        loss, batch_sum = self.batch_loss(self.model, x, y)
        loss.backward()
        self.optimizer.step()
        return batch_sum.detach()

    def _capture(self, x: Tensor, y: Tensor) -> None:
        # CUDA graphs need a few warm-up steps on a side stream before capture. They must not
        # count as training: parameters and buffers are restored in place afterwards (the graph
        # records their addresses) and the optimiser state is zeroed, which for Adam
        # (capturable) and SGD-with-momentum is exactly the state of a fresh optimiser.
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.static_x, self.static_y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                loss, _ = self.batch_loss(self.model, self.static_x, self.static_y)
                loss.backward()
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(saved[name])
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss, batch_sum = self.batch_loss(self.model, self.static_x, self.static_y)
            loss.backward()
            self.optimizer.step()
        self.static_sum = batch_sum.detach()


def _use_cuda_graph(device: torch.device, cuda_graphs: bool) -> bool:
    return cuda_graphs and device.type == "cuda"


def _fit(model, optimizer, batch_loss, images, labels, *, bounds, epochs, batch_size, seed, device,
         use_graph, progress) -> dict:
    """The shared epoch loop: shuffle, step through batches, report mean per-sample losses."""
    n = images.shape[0]
    runner = _StepRunner(model, optimizer, batch_loss, batch_size, use_graph)
    total_loss = 0.0
    epoch_loss = 0.0
    steps = 0
    with _mode(model, training=True):
        for epoch, perm in enumerate(_permutations(n, epochs, seed, device), start=1):
            # Accumulate on the device and synchronise once per epoch, not once per step.
            epoch_sum = torch.zeros((), device=device)
            for start, end in bounds:
                idx = perm[start:end]
                epoch_sum += runner.step(images[idx], labels[idx])
                steps += 1
            epoch_loss = epoch_sum.item() / n
            total_loss += epoch_loss
            if progress is not None:
                progress(epoch, epoch_loss)
    return {"loss": total_loss / epochs, "last_epoch_loss": epoch_loss, "samples": n, "steps": steps}


def _with_proximal_term(batch_loss, model: nn.Module, mu: float):
    """FedProx: add (mu/2)·||w - w_start||² to the loss, w_start being the weights the call began
    with (the global model a client received)."""
    if not mu:
        return batch_loss
    anchors = [p.detach().clone() for p in model.parameters()]

    def loss_with_proximal_term(m, x, y):
        loss, batch_sum = batch_loss(m, x, y)
        drift = sum((p - a).pow(2).sum() for p, a in zip(m.parameters(), anchors))
        return loss + 0.5 * mu * drift, batch_sum

    return loss_with_proximal_term


def _cvae_batch_loss(model, x, y):
    recon, mu, sigma = model(x, y)
    loss = cvae_loss(recon, x, mu, sigma)  # summed over the batch, as the paper does
    return loss, loss


def _cvae_per_sample_loss(model, x, y):
    recon, mu, sigma = model(x, y)
    return cvae_loss_per_sample(recon, x, mu, sigma)


def _classifier_batch_loss(model, x, y):
    loss = F.cross_entropy(model(x), y)  # mean over the batch
    return loss, loss * x.shape[0]


# A class the shard lacks has prior 0; its log is floored here (instead of -inf) so the adjusted
# logits stay finite: exp(-27.6) = 1e-12 leaves that class practically out of the softmax.
_PRIOR_FLOOR = 1e-12


def label_log_prior(labels: Tensor, num_classes: int) -> Tensor:
    """log of the empirical label distribution of ``labels`` (float32 ``[num_classes]``, on
    ``labels``' device), each class's share floored at 1e-12."""
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes].to(torch.float32)
    return torch.log((counts / labels.shape[0]).clamp_min(_PRIOR_FLOOR))


def balanced_cross_entropy(logits: Tensor, labels: Tensor, log_prior: Tensor) -> Tensor:
    """Balanced softmax (Ren et al. 2020; logit adjustment, Menon et al. 2021): cross-entropy of
    ``logits + log_prior``, mean over the batch. Training fits p(y|x) * prior(y), so the logits
    themselves learn the class-balanced posterior: a skewed shard's frequent classes do not win
    by frequency alone. A uniform prior shifts every logit alike, and the loss is plain CE."""
    return F.cross_entropy(logits + log_prior, labels)


def _balanced_classifier_batch_loss(log_prior: Tensor):
    def batch_loss(model, x, y):
        loss = balanced_cross_entropy(model(x), y, log_prior)
        return loss, loss * x.shape[0]

    return batch_loss


ProgressFn = Callable[[int, float], None]


def train_cvae(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: DeviceLike,
    cuda_graphs: bool = True,
    progress: ProgressFn | None = None,
    prox_mu: float = 0.0,
    privacy: ClientPrivacy | None = None,
) -> dict:
    """Train a :class:`~genfl_shared.models.CVAE` in place with a fresh Adam optimiser.

    A new Adam is created on every call because the paper builds a new optimiser every
    federated round (so no moment estimates carry over between rounds).

    Returns ``{"loss", "last_epoch_loss", "samples", "steps"}`` where ``loss`` is the mean
    per-sample :func:`cvae_loss` over every sample seen in all epochs (the losses are
    measured on each batch before its update), ``last_epoch_loss`` the same mean over
    the last epoch only, ``samples`` is ``N`` and ``steps`` the number of optimiser steps.
    ``progress(epoch, epoch_loss)`` is called after each epoch when given; ``prox_mu > 0`` adds
    FedProx's proximal term (reported losses exclude it).

    With ``privacy`` the epochs are DP-SGD (:func:`genfl_shared.dp.fit_dp`: Poisson-sampled
    batches, per-sample clipping and noise), and every step is counted by its accountant.
    """
    _check_hyperparameters(epochs, batch_size)
    images, labels, device = _prepare(images, labels, device)
    n = images.shape[0]
    if epochs == 0:
        return _untrained_result(n)

    torch.manual_seed(seed)  # reparameterisation noise comes from the global RNG
    model.to(device)
    if privacy is not None:
        return _train_cvae_dp(model, images, labels, epochs=epochs, lr=lr, seed=seed, device=device,
                              cuda_graphs=cuda_graphs, progress=progress, prox_mu=prox_mu, privacy=privacy)
    use_graph = _use_cuda_graph(device, cuda_graphs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, capturable=use_graph)
    result = _fit(model, optimizer, _with_proximal_term(_cvae_batch_loss, model, prox_mu), images, labels,
                  bounds=_batch_bounds(n, batch_size),
                  epochs=epochs, batch_size=batch_size, seed=seed, device=device, use_graph=use_graph,
                  progress=progress)
    logger.debug("train_cvae: %s", result)
    return result


def _train_cvae_dp(model, images, labels, *, epochs, lr, seed, device, cuda_graphs, progress, prox_mu,
                   privacy: ClientPrivacy) -> dict:
    if prox_mu:
        # The proximal term's gradient is not a per-sample gradient: DP-SGD would silently drop it.
        raise ValueError("DP-SGD cannot train with FedProx's proximal term (prox_mu > 0)")
    if _use_cuda_graph(device, cuda_graphs):
        # Poisson batches vary in size and Opacus' per-sample gradient hooks run in Python: no graph.
        _log_once("DP-SGD: CUDA graphs are not used (Poisson-sampled batches vary in size); eager CUDA steps")
    with _mode(model, training=True):
        result = fit_dp(model, images, labels, _cvae_per_sample_loss, epochs=epochs, lr=lr, seed=seed,
                        privacy=privacy, progress=progress)
    logger.debug("train_cvae (DP-SGD): %s", result)
    return result


_logged_once: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged_once:
        _logged_once.add(message)
        logger.info(message)


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    momentum: float = 0.0,
    seed: int,
    device: DeviceLike,
    cuda_graphs: bool = True,
    progress: ProgressFn | None = None,
    prox_mu: float = 0.0,
    loss: str = "ce",
) -> dict:
    """Train a classifier in place with cross-entropy and a fresh optimiser.

    ``loss`` is ``"ce"`` (plain cross-entropy) or ``"balanced"`` (:func:`balanced_cross_entropy`
    with the label prior of ``labels``, the data trained on; reported losses are that loss).

    ``optimizer`` is ``"sgd"`` (using ``momentum``) or ``"adam"`` (``momentum`` is ignored).
    A trailing batch of a single sample is merged into the previous batch (BatchNorm
    needs at least two samples), so ``N`` must be at least 2.

    Returns ``{"loss", "last_epoch_loss", "samples", "steps"}``: ``loss`` is the mean
    per-sample cross-entropy over all epochs' samples (each batch measured before its
    update), ``last_epoch_loss`` the same over the last epoch only.
    ``progress(epoch, epoch_loss)`` is called after each epoch when given.
    """
    _check_hyperparameters(epochs, batch_size)
    images, labels, device = _prepare(images, labels, device)
    n = images.shape[0]
    if epochs == 0:
        return _untrained_result(n)
    if n < 2:
        raise ValueError("train_classifier needs at least 2 samples (BatchNorm batch statistics)")

    torch.manual_seed(seed)  # dropout masks come from the global RNG
    _to_device_channels_last(model, device)
    use_graph = _use_cuda_graph(device, cuda_graphs)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, capturable=use_graph)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    if loss == "ce":
        batch_loss = _classifier_batch_loss
    elif loss == "balanced":
        batch_loss = _balanced_classifier_batch_loss(label_log_prior(labels, _num_classes(model)))
    else:
        raise ValueError(f"unknown loss {loss!r}; expected 'ce' or 'balanced'")
    result = _fit(model, opt, _with_proximal_term(batch_loss, model, prox_mu), images, labels,
                  bounds=_batch_bounds(n, batch_size, avoid_singleton=True), epochs=epochs,
                  batch_size=batch_size, seed=seed, device=device, use_graph=use_graph, progress=progress)
    logger.debug("train_classifier: %s", result)
    return result


def _num_classes(model: nn.Module) -> int:
    """The classifier's number of outputs (its last linear layer's)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("a balanced loss needs a classifier ending in a linear layer")
    return linear[-1].out_features


def evaluate_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 2048,
    device: DeviceLike,
) -> dict:
    """Accuracy (fraction in ``[0, 1]``) and mean cross-entropy of a classifier.

    Returns ``{"accuracy", "loss", "samples"}``.
    """
    _check_batch_size(batch_size)
    images, labels, device = _prepare(images, labels, device)
    n = images.shape[0]
    _to_device_channels_last(model, device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), device=device)
    with _mode(model, training=False), torch.inference_mode():
        for start, end in _batch_bounds(n, batch_size):
            logits = model(images[start:end])
            y = labels[start:end]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n, "samples": n}


def evaluate_cvae(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 2048,
    seed: int,
    device: DeviceLike,
) -> dict:
    """Mean per-sample :func:`cvae_loss` of a CVAE on a data set.

    The reparameterisation noise is drawn from a local generator seeded by ``seed``
    (on CPU, then moved), so the result is reproducible, independent of ``batch_size``
    and of the device, and the global RNG is untouched.

    Returns ``{"loss", "samples"}``.
    """
    _check_batch_size(batch_size)
    images, labels, device = _prepare(images, labels, device)
    n = images.shape[0]
    model.to(device)
    # All the noise is drawn at once (N x latent_dim floats is tiny), so the result does not
    # depend on batch_size: chunked draws from a generator differ from one big draw.
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, model.latent_dim), generator=generator).to(device)
    loss_sum = torch.zeros((), device=device)
    with _mode(model, training=False), torch.inference_mode():
        for start, end in _batch_bounds(n, batch_size):
            x = images[start:end]
            mu, sigma = model.encode(x)
            recon = model.decode(mu + sigma * noise[start:end], labels[start:end])
            loss_sum += cvae_loss(recon, x, mu, sigma)
    return {"loss": loss_sum.item() / n, "samples": n}
