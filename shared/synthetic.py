"""Synthetic data from the trained CVAE: the server's pre-training set for the classifier.

Following the paper, each decoded image is scaled by its own maximum and rounded, so the
synthetic images are binary (0/1). Labels are class-balanced by construction.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from .config import RunConfig
from .models import initial_state, model_from_state
from .seeding import derive_seed
from .training import train_classifier

__all__ = ["balanced_labels", "binarise", "sample_synthetic", "save_grid", "train_on_synthetic"]

logger = logging.getLogger(__name__)


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """int64 ``[n]`` labels sorted by class: ``n // num_classes`` of each, the remainder
    going one each to the first ``n % num_classes`` classes."""
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    counts = torch.full((num_classes,), n // num_classes, dtype=torch.int64)
    counts[: n % num_classes] += 1
    return torch.repeat_interleave(torch.arange(num_classes), counts)


def binarise(decoded: Tensor) -> Tensor:
    """The paper's synthetic image from a decoded one: scaled by its own maximum and rounded (an
    all-zero image stays zero)."""
    peak = decoded.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return torch.round(decoded / peak)


def sample_synthetic(
    cvae: nn.Module,
    n: int,
    *,
    num_classes: int = 10,
    seed: int,
    device: str | torch.device,
    batch_size: int = 10000,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` labelled binary images from ``cvae``'s decoder.

    Labels are class-balanced (see :func:`balanced_labels`) and sorted by class; latents
    are ``z ~ N(0, I)`` from a CPU generator seeded by ``seed``, so the result is
    deterministic for a seed and does not touch the global RNG. Decoding runs in batches
    of ``batch_size`` on ``device``. Returns CPU tensors ``(images float32 [n, 1, 28, 28]
    with values in {0, 1}, labels int64 [n])``; they are ordinary (non-inference) tensors,
    so they can be trained on directly.
    """
    model_classes = getattr(cvae, "num_classes", num_classes)
    if model_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} but the CVAE is conditioned on {model_classes} classes")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    labels = balanced_labels(n, num_classes)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((n, cvae.latent_dim), generator=generator)
    # Allocated outside inference mode and filled in place: tensors created under
    # inference_mode cannot be used by autograd later, and these images are trained on.
    images = torch.empty((n, 1, 28, 28), dtype=torch.float32)

    was_training = cvae.training
    cvae.to(device).eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                decoded = cvae.decode(z[start:end].to(device), labels[start:end].to(device))
                images[start:end].copy_(binarise(decoded).cpu())
    finally:
        cvae.train(was_training)
    logger.debug("sampled %d synthetic images (seed=%d)", n, seed)
    return images, labels


def save_grid(
    images: Tensor,
    labels: Tensor,
    path: str | Path,
    *,
    per_class: int = 10,
    num_classes: int = 10,
    padding: int = 2,
) -> None:
    """Save a PNG with one row per class holding that class's first ``per_class`` images.

    Rows for classes with fewer images are padded with black tiles so that columns line up.
    With the defaults and 28x28 images, the PNG is ``302 x 302`` pixels.
    """
    images = images.detach().cpu()
    labels = labels.detach().cpu()
    tiles = torch.zeros((num_classes * per_class, *images.shape[1:]), dtype=torch.float32)
    for cls in range(num_classes):
        chosen = images[labels == cls][:per_class]
        tiles[cls * per_class : cls * per_class + len(chosen)] = chosen
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, path, nrow=per_class, padding=padding)


def train_on_synthetic(cfg: RunConfig, images, labels, *, epochs: int, purpose: str,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """ExquisiteNetV1 from the run's seeded start, trained on synthetic data with the server's
    settings (used for CAS, pre-training and the centralised baseline's CAS)."""
    model = model_from_state("classifier", initial_state("classifier", cfg.reproducibility.seed), device)
    started = time.perf_counter()

    def progress(epoch: int, loss: float) -> None:
        logger.info("%s on synthetic data: epoch %d/%d, loss %.4f (%.1f s)", purpose, epoch, epochs, loss,
                    time.perf_counter() - started)

    train_classifier(model, images, labels, epochs=epochs, batch_size=cfg.pretraining.pretrain_batch_size,
                     optimizer="adam", lr=cfg.pretraining.pretrain_lr, seed=derive_seed(cfg.reproducibility.seed, purpose),
                     device=device, progress=progress)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
