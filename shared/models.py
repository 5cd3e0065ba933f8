"""The two networks GenFL trains, written to match the paper's code layer for layer.

* :class:`CVAE`: the conditional VAE that the server trains with the clients and then
  samples labelled synthetic images from (1,072,150 parameters).
* :class:`ExquisiteNetV1`: the small classifier that the server pre-trains on those
  synthetic images and that the clients then fine-tune (927,254 parameters).

The parameter counts are asserted by the tests: they are the cheapest check that the
architectures have not drifted from the paper's, which matters because model weights
travel between server and clients as flat tensors and both sides must agree exactly.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .seeding import derive_seed

__all__ = [
    "CVAE",
    "ExquisiteNetV1",
    "MODEL_KINDS",
    "build_model",
    "count_parameters",
    "cvae_loss",
]

IMAGE_SHAPE = (1, 28, 28)
_IMAGE_PIXELS = 28 * 28


class CVAE(nn.Module):
    """Conditional VAE over 1x28x28 images in [0, 1].

    As in the paper's code, only the decoder is conditioned on the label; the encoder
    sees the image alone (conditioning the encoder too would add ``10 * 512`` weights
    and break the reference parameter count).
    """

    def __init__(self, latent_dim: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_IMAGE_PIXELS, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            # One head for both moments: first half is mu, second half is pre-softplus sigma.
            nn.Linear(256, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + num_classes, 256),
            nn.ReLU(),
            nn.Linear(256, 512),
            nn.ReLU(),
            nn.Linear(512, _IMAGE_PIXELS),
            nn.Sigmoid(),
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the posterior's mean and standard deviation, each ``[B, latent_dim]``."""
        h = self.encoder(x)
        mu = h[:, : self.latent_dim]
        # softplus keeps sigma positive; the 1e-6 floor keeps log(sigma) finite in the KL.
        sigma = 1e-6 + F.softplus(h[:, self.latent_dim :])
        return mu, sigma

    def decode(self, z: Tensor, labels: Tensor) -> Tensor:
        """Map latents ``[B, latent_dim]`` and int64 labels ``[B]`` to images ``[B, 1, 28, 28]``."""
        one_hot = F.one_hot(labels, self.num_classes).to(z.dtype)
        out = self.decoder(torch.cat([z, one_hot], dim=1))
        return out.view(-1, *IMAGE_SHAPE)

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, reparameterise (noise from the global RNG), decode: ``(recon, mu, sigma)``."""
        mu, sigma = self.encode(x)
        z = mu + sigma * torch.randn_like(sigma)
        return self.decode(z, labels), mu, sigma


def cvae_loss(recon: Tensor, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """Summed (not averaged) CVAE loss of a batch, as in the paper.

    ``MSE(recon, x, reduction='sum') + KL(N(mu, sigma^2) || N(0, I))``, where the KL term
    ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)`` is also summed over the batch.
    Divide by the batch size to get a per-sample loss.
    """
    reconstruction = F.mse_loss(recon, x, reduction="sum")
    kl = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * torch.log(sigma))
    return reconstruction + kl


def cvae_loss_per_sample(recon: Tensor, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """:func:`cvae_loss` of each sample of the batch, ``[B]`` (DP-SGD clips each sample's gradient)."""
    reconstruction = (recon - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * torch.log(sigma)).sum(1)
    return reconstruction + kl


class _SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: rescale each channel by a gate computed from its global mean."""

    def __init__(self, channels: int, ratio: int = 3) -> None:
        super().__init__()
        hidden = channels // ratio
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.pool(x).flatten(1)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate[:, :, None, None]


class _DFSESubBlock(nn.Module):
    """One half of a DFSEB: pointwise conv, depthwise 3x3 conv, SE, plus its own residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=True),
            nn.Hardswish(),
            _SqueezeExcite(channels, ratio=3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _DFSEB(nn.Sequential):
    """Depthwise-feature SE block: two sub-blocks in sequence, each with its own weights."""

    def __init__(self, channels: int) -> None:
        super().__init__(_DFSESubBlock(channels), _DFSESubBlock(channels))


class _ME(nn.Sequential):
    """Max-pool-and-expand: halve the resolution (rounding up) and change the channel count."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(cin, cout, kernel_size=1, bias=False),
            nn.BatchNorm2d(cout),
        )


class ExquisiteNetV1(nn.Module):
    """ExquisiteNetV1 classifier for 28x28 inputs (five ME+DFSEB stages: 28->14->7->4->2->1).

    Because the last stage reaches 1x1 spatial size, its BatchNorm sees one value per
    channel per sample: training mode needs batches of at least 2 samples.
    """

    _WIDTHS = (12, 50, 100, 200, 350)

    def __init__(self, classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        cin = channels
        for cout in self._WIDTHS:
            stages += [_ME(cin, cout), _DFSEB(cout)]
            cin = cout
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.Conv2d(cin, 640, kernel_size=1, bias=True),
            nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(640, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``[B, classes]``."""
        return self.head(self.features(x))


MODEL_KINDS = ("cvae", "classifier")


def build_model(kind: str) -> nn.Module:
    """Build a freshly initialised model of one of :data:`MODEL_KINDS`."""
    if kind == "cvae":
        return CVAE(latent_dim=3, num_classes=10)
    if kind == "classifier":
        return ExquisiteNetV1(classes=10, channels=1)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def initial_state(kind: str, seed: int) -> dict[str, Tensor]:
    """Seeded random weights: the same start for a pre-trained run and its baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", kind))
        return build_model(kind).state_dict()


def model_from_state(kind: str, state: Mapping[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    model = build_model(kind)
    model.load_state_dict(state)
    return model.to(device)
