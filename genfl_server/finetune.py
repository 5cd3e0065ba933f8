"""Server-side synthetic fine-tuning, a mitigation of label skew: after every classifier aggregation, a few
class-balanced SGD steps of the aggregate on the server's synthetic set, so the model broadcast
for the next round is pulled back from the clients' label skew towards every class.

The synthetic set is the one the server pre-trains on (class-balanced by construction, sampled
from the federated CVAE); no client data is involved. Each step's batch holds the same number of
images of every class (stratified draws without replacement within a class until its pool is used
up), so a step never favours a class, whatever the batch size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from genfl_shared.models import model_from_state
from genfl_shared.seeding import derive_seed

log = logging.getLogger(__name__)

State = dict[str, Tensor]

# Momentum of the fine-tuning SGD: a few hundred steps from a skewed aggregate need it to get far
# enough (benchmarks/bench_server_finetune.py measures the effect of steps and learning rate).
FINETUNE_MOMENTUM = 0.9


def class_balanced_batches(labels: Tensor, batch_size: int, steps: int, seed: int) -> Iterator[Tensor]:
    """``steps`` index tensors into ``labels``, each ``ceil(batch_size / C)`` images of every one
    of the C classes present (each class's pool shuffled, drawn in turn, reshuffled when used up);
    repeatable for a seed (a CPU generator; the global RNG is untouched)."""
    if batch_size < 1 or steps < 0:
        raise ValueError(f"need batch_size >= 1 and steps >= 0, got {batch_size}, {steps}")
    labels = labels.cpu()
    pools = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    per_class = math.ceil(batch_size / len(pools))
    generator = torch.Generator().manual_seed(seed)
    orders = [pool[torch.randperm(len(pool), generator=generator)] for pool in pools]
    cursors = [0] * len(pools)
    for _ in range(steps):
        batch = []
        for c, pool in enumerate(pools):
            taken = []
            need = per_class
            while need:
                if cursors[c] == len(pool):
                    orders[c], cursors[c] = pool[torch.randperm(len(pool), generator=generator)], 0
                chunk = orders[c][cursors[c]:cursors[c] + need]
                cursors[c] += len(chunk)
                need -= len(chunk)
                taken.append(chunk)
            batch.append(torch.cat(taken))
        yield torch.cat(batch)


def finetune_classifier(state: Mapping[str, Tensor], images: Tensor, labels: Tensor, *, steps: int, lr: float,
                        batch_size: int, seed: int, device: torch.device) -> tuple[State, dict]:
    """The classifier ``state`` after ``steps`` class-balanced SGD steps (cross-entropy, momentum
    FINETUNE_MOMENTUM) on (images, labels); returns (CPU state, {"steps", "seconds", "loss"}),
    loss being the mean batch loss over the steps (measured before each step's update)."""
    started = time.perf_counter()
    model = model_from_state("classifier", state, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=FINETUNE_MOMENTUM)
    images, labels = images.to(device), labels.to(device)
    loss_sum = torch.zeros((), device=device)
    torch.manual_seed(seed)  # dropout masks come from the global RNG, as in train_classifier
    model.train()
    for idx in class_balanced_batches(labels, batch_size, steps, seed):
        idx = idx.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    tuned = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return tuned, {"steps": steps, "seconds": time.perf_counter() - started,
                   "loss": loss_sum.item() / steps if steps else None}


@dataclass
class ServerFineTune:
    """The classifier phase's post-aggregation hook (RoundEngine.run_rounds' ``post_aggregation``):
    ``hook(round, aggregate, round_models) -> (fine-tuned state, what to record)``; it uses the
    aggregate alone."""

    images: Tensor  # the server's synthetic set (class-balanced)
    labels: Tensor
    steps: int
    lr: float
    batch_size: int
    seed: int  # the run's; each round's steps get their own seed from it
    device: torch.device

    keeps_updates = False

    def __call__(self, rnd: int, aggregate: Mapping[str, Tensor], _models=None) -> tuple[State, dict]:
        tuned, info = finetune_classifier(aggregate, self.images, self.labels, steps=self.steps, lr=self.lr,
                                          batch_size=self.batch_size, seed=derive_seed(self.seed, "finetune", rnd),
                                          device=self.device)
        log.info("server fine-tuning after round %d: %d class-balanced steps on synthetic data, loss %.4f (%.2f s)",
                 rnd, info["steps"], info["loss"], info["seconds"])
        return tuned, {"kind": "server_finetune", **info}
