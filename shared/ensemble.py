"""A generator made of several CVAEs: each class drawn from the members that learnt it.

The ``ensemble`` CVAE aggregation (genfl_server/generator.py) keeps every client's CVAE instead of
averaging them. ``class_weights[m, c]`` is the share of class ``c``'s synthetic images that member
``m`` draws: each column sums to 1. The whole generator is one flat dict of tensors
(``member<m>.<parameter>`` and ``class_weights``), so it is saved, resumed and loaded as any
checkpoint is (weights only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .models import build_model, cvae_loss_per_sample, model_from_state
from .synthetic import balanced_labels, binarise

__all__ = ["ENSEMBLE_KIND", "CVAEEnsemble", "is_ensemble", "largest_remainder"]

ENSEMBLE_KIND = "cvae-ensemble"  # its checkpoint's model kind
CLASS_WEIGHTS = "class_weights"


def is_ensemble(state: Mapping[str, Tensor]) -> bool:
    """Whether a generator state is a ``CVAEEnsemble``'s (else it is one CVAE's)."""
    return CLASS_WEIGHTS in state


def largest_remainder(total: int, shares: Tensor) -> Tensor:
    """int64 counts summing to ``total``, proportional to ``shares`` (summing to 1), the rounding
    remainder going to the largest fractional parts (ties: the lower index)."""
    exact = shares.double() * total
    counts = exact.floor().long()
    left = total - int(counts.sum())
    if left:
        order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]).item(), i))
        for i in order[:left]:
            counts[i] += 1
    return counts


@dataclass
class CVAEEnsemble:
    """Members' CVAE states and each member's share of every class."""

    members: list[dict[str, Tensor]]
    class_weights: Tensor  # float64 [members, classes], every column sums to 1

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        weights = self.class_weights
        classes = build_model("cvae").num_classes
        if weights.ndim != 2 or tuple(weights.shape) != (len(self.members), classes):
            raise ValueError(f"class_weights must be [{len(self.members)}, {classes}], got {list(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("class_weights must be finite and non-negative")
        if not torch.allclose(weights.sum(0), torch.ones(weights.shape[1], dtype=weights.dtype), atol=1e-6):
            raise ValueError("every class's weights must sum to 1")
        reference = build_model("cvae").state_dict()
        for index, member in enumerate(self.members):
            if member.keys() != reference.keys() or any(member[k].shape != reference[k].shape for k in reference):
                raise ValueError(f"member {index} is not a CVAE state")

    # -- as one flat state (checkpoints, the run state) --------------------------------------------
    def to_state(self) -> dict[str, Tensor]:
        state = {f"member{index}.{name}": tensor for index, member in enumerate(self.members)
                 for name, tensor in member.items()}
        state[CLASS_WEIGHTS] = self.class_weights
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> "CVAEEnsemble":
        """The ensemble a ``to_state()`` dict holds; ValueError when it holds something else."""
        if CLASS_WEIGHTS not in state:
            raise ValueError("not an ensemble state: no class_weights")
        members: dict[int, dict[str, Tensor]] = {}
        for key, tensor in state.items():
            if key == CLASS_WEIGHTS:
                continue
            prefix, _, name = key.partition(".")
            number = prefix[6:]
            if not prefix.startswith("member") or not number.isdigit() or str(int(number)) != number or not name:
                raise ValueError(f"unexpected entry {key!r} in an ensemble state")
            members.setdefault(int(prefix[6:]), {})[name] = tensor
        if sorted(members) != list(range(len(members))):
            raise ValueError("ensemble members must be numbered 0..n-1")
        return cls([members[i] for i in range(len(members))], state[CLASS_WEIGHTS].double())

    # -- sampling and scoring ---------------------------------------------------------------------------
    def owners(self, labels: Tensor) -> Tensor:
        """The member that draws each of ``labels`` (sorted by class): each class's images split
        between its members by ``class_weights`` (largest remainder), in member order."""
        owner = torch.empty(len(labels), dtype=torch.int64)
        for cls in labels.unique().tolist():
            where = (labels == cls).nonzero().flatten()
            counts = largest_remainder(len(where), self.class_weights[:, cls])
            owner[where] = torch.repeat_interleave(torch.arange(len(self.members)), counts)
        return owner

    def sample(self, n: int, *, seed: int, device: str | torch.device) -> tuple[Tensor, Tensor]:
        """``n`` class-balanced binary images, as ``genfl_shared.synthetic.sample_synthetic`` draws
        them from one CVAE (the same labels and latents for a seed), each from its class's members."""
        classes = self.class_weights.shape[1]
        labels = balanced_labels(n, classes)
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn((n, build_model("cvae").latent_dim), generator=generator)
        images = torch.empty((n, 1, 28, 28), dtype=torch.float32)
        owner = self.owners(labels)
        device = torch.device(device)
        for index, member in enumerate(self.members):
            chosen = (owner == index).nonzero().flatten()
            if not len(chosen):
                continue
            cvae = model_from_state("cvae", member, device).eval()
            with torch.inference_mode():
                images[chosen] = binarise(cvae.decode(z[chosen].to(device), labels[chosen].to(device))).cpu()
        return images, labels

    def evaluate(self, images: Tensor, labels: Tensor, *, seed: int, device: str | torch.device) -> dict:
        """The ensemble's test loss: each image's CVAE loss (``evaluate_cvae``'s, with the same seeded
        noise) under each member of its class, weighted by the members' shares of that class, and
        averaged over the images. (A share-weighted mean of the members' losses, not the loss of
        the mixture distribution, which would be lower.)"""
        device = torch.device(device)
        images, labels = images.to(device), labels.to(device)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(labels), build_model("cvae").latent_dim), generator=generator).to(device)
        weights = self.class_weights.to(device)[:, labels]  # [members, n]
        total = torch.zeros(len(labels), dtype=torch.float64, device=device)
        for index, member in enumerate(self.members):
            chosen = (weights[index] > 0).nonzero().flatten()
            if not len(chosen):
                continue
            cvae = model_from_state("cvae", member, device).eval()
            with torch.inference_mode():
                for start in range(0, len(chosen), 2048):
                    part = chosen[start:start + 2048]
                    mu, sigma = cvae.encode(images[part])
                    recon = cvae.decode(mu + sigma * noise[part], labels[part])
                    loss = cvae_loss_per_sample(recon, images[part], mu, sigma)
                    total[part] += weights[index, part] * loss.double()
        return {"loss": float(total.mean()), "samples": len(labels)}
