"""Run settings and the two presets.

``paper`` is exactly the poster's configuration. ``quick`` keeps every step of the method but
shrinks the amounts so that ``genfl-launch --compare`` finishes in minutes on a 2-core CPU while
still showing the pre-training effect at alpha = 0.1; README.md lists its reductions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class RunConfig:
    # Data
    clients: int = 10
    train_subset: int | None = None  # use only this many training images (partitioning, launch)
    binarize: bool = True
    # Federated rounds
    cvae_rounds: int = 20
    classifier_rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 32
    cvae_lr: float = 1e-3
    classifier_lr: float = 1e-3
    classifier_momentum: float = 0.5
    strategy: str = "fedavg"  # fedavg | fedprox | fedavgm | median | trimmed_mean | krum
    prox_mu: float = 0.01  # FedProx proximal weight
    fedavgm_lr: float = 1.0  # FedAvgM server learning rate
    fedavgm_momentum: float = 0.9  # FedAvgM server momentum
    trim_fraction: float = 0.2  # trimmed mean: share of values dropped at each end
    krum_byzantine: int = 1  # Krum: Byzantine clients tolerated
    krum_select: int = 1  # Krum: updates averaged (1: Krum, more: multi-Krum)
    # Hostile-client bounds (genfl_server/guard.py); none of them binds on an honest run.
    max_update_norm: float | None = None  # bound on ||w_client - w_global||
    update_norm_factor: float | None = 10.0  # adaptive bound: factor x the round's median distance
    clip_updates: bool = False  # beyond max_update_norm: clip the step instead of rejecting the update
    max_client_samples: int | None = 60_000  # training samples one client may register
    max_client_weight_share: float | None = 0.5  # FedAvg weight share of one client (from 3 clients)
    # Server-side synthetic data
    synthetic_samples: int = 60_000
    cas_epochs: int = 20
    pretrain_epochs: int = 5
    server_lr: float = 1e-3
    server_batch_size: int = 32
    pretrain: bool = True
    seed: int = 0
    deterministic: bool = False

    def override(self, **changes) -> "RunConfig":
        """Apply the options a user set explicitly (None means 'not given')."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


PRESETS: dict[str, RunConfig] = {
    "paper": RunConfig(),
    # Quick: 1/6 of the training images (1,000 per client), half the CVAE rounds, 5 classifier
    # rounds, a 10,000-image synthetic set and short server-side training; same models, optimisers,
    # batch size, local epochs and learning rates as the paper.
    "quick": RunConfig(train_subset=10_000, cvae_rounds=10, classifier_rounds=5,
                       synthetic_samples=10_000, cas_epochs=2, pretrain_epochs=3),
}
