"""Synthetic data for the classes a client lacks (``--client-synthetic-mix RATIO``).

A client may report its train part's label histogram at registration (RegisterRequest.label_counts,
checked by guard.checked_label_counts). For the classes it holds fewer than MISSING_BELOW images of,
the server attaches images of those classes from its own synthetic set (sampled from the global
CVAE: generated, not copied from any client; without DP-SGD in the CVAE phase a generator can still
come close to images it was trained on) to the client's classifier TrainTask; the client mixes them
into its local training at RATIO synthetic per real sample and epoch.

The histogram is untrusted: a client that lies about it gets other synthetic classes, which is no
more than it could train on anyway; its FedAvg weight stays its registered (real) sample count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from genfl_shared.seeding import derive_seed
from genfl_shared.tasks import MAX_SYNTHETIC_IMAGES, TrainTask, encode_synthetic

log = logging.getLogger(__name__)

# A class with fewer train images than this counts as missing from the client's shard.
MISSING_BELOW = 5
# Synthetic images sent per missing class (fewer when many classes are missing, so that a task
# never carries more than MAX_SYNTHETIC_IMAGES).
IMAGES_PER_CLASS = 50


def missing_classes(label_counts: tuple[int, ...] | None) -> list[int]:
    """The classes a reported histogram holds fewer than MISSING_BELOW images of ([] without one)."""
    return [] if label_counts is None else [c for c, n in enumerate(label_counts) if n < MISSING_BELOW]


@dataclass
class ClientSyntheticMix:
    """The classifier phase's per-client task step (RoundEngine.run_rounds' ``client_task``):
    ``step(client, round, task) -> task`` with the synthetic images of the client's missing classes."""

    images: Tensor  # the server's synthetic set, float [N, 1, 28, 28] in [0, 1]
    labels: Tensor
    ratio: float
    seed: int  # the run's; each client and round draws its own images
    _unreported: set = field(default_factory=set)

    def __call__(self, client, rnd: int, task: TrainTask) -> TrainTask:
        if client.label_counts is None:
            if client.client_id not in self._unreported:
                self._unreported.add(client.client_id)
                log.warning("client %s shares no label counts: it gets no synthetic images", client.client_id)
            return task
        missing = missing_classes(client.label_counts)
        if not missing:
            return task
        per_class = min(IMAGES_PER_CLASS, MAX_SYNTHETIC_IMAGES // len(missing))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "synthmix", rnd, client.client_id))
        chosen = []
        for c in missing:
            pool = torch.nonzero(self.labels == c).flatten()
            if len(pool):
                chosen.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
        if not chosen:
            return task
        idx = torch.cat(chosen)
        pixels = (self.images[idx].reshape(-1, 28, 28) * 255).round().clamp(0, 255).to(torch.uint8)
        images, labels = encode_synthetic(pixels.cpu().numpy(), self.labels[idx].cpu().numpy())
        return replace(task, synthetic_mix=self.ratio, synthetic_images=images, synthetic_labels=labels)
