"""Defences against hostile clients: what a client reports is bounded before it can reach the model.

* ``check_registered_samples``: a client may not claim more training samples than a dataset holds.
* ``PartitionCounts``: with ``--partition-info``, only the partition's clients, with its counts.
* ``validated_metrics``: a result's metrics are known names with finite, in-range values.
* ``UpdateGuard`` / ``RoundGuard``: each round, every update's distance ||w_client - w_global|| is
  recorded as it is folded in, each client's FedAvg weight is capped at a share of the round's
  total, and the aggregate is checked before it becomes the global model. The engine redoes a
  round without the clients a RoundGuard names as offenders, so a bad global model is never
  broadcast or checkpointed.

The adaptive norm bound is ``norm_factor`` times the median distance of the round's updates (with
at least 3 updates; with fewer, the median is not robust to one outlier). Honest updates of one
round differ in size by a small factor (benchmarks/bench_honest_update_norms.py measures it);
a poisoned one that moves the model far (scaled, huge or zeroed weights) is orders beyond.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Mapping

import torch

from genfl_shared.config import GuardSettings
from genfl_shared.errors import Rejected, RejectReason
from genfl_shared.tasks import TrainTask

from .logsafe import shown
from .updates import as_update

log = logging.getLogger(__name__)


# The metrics a genfl-client sends (genfl_client/executor.py), with the range each must lie in.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "loss": (0.0, math.inf),
    "accuracy": (0.0, 1.0),
    "train_seconds": (0.0, math.inf),
    "steps": (0.0, math.inf),
    "dp_epsilon": (0.0, math.inf),  # DP-SGD: the client's spent epsilon, over all its rounds so far
    # A TRAIN task with evaluate_first: the received model's evaluation before training (the
    # coordinator also checks eval_samples against the client's registered held-out count).
    "eval_loss": (0.0, math.inf),
    "eval_accuracy": (0.0, 1.0),
    "eval_samples": (0.0, math.inf),
}
MAX_METRICS = len(METRIC_RANGES)

# The defaults are GuardSettings' (the one source of run settings); why they are what they are:
DEFAULT_MAX_CLIENT_SAMPLES = GuardSettings.max_client_samples  # the training split of MNIST / Fashion-MNIST
# No honest quick/paper split comes near half of all samples (at alpha = 0.01 over 10 clients the
# largest share measured is 0.28; benchmarks/bench_honest_update_norms.py prints it); with fewer
# than 3 clients a cap of 1/2 would bind on honest runs, so it applies from 3 clients on.
DEFAULT_MAX_CLIENT_WEIGHT_SHARE = GuardSettings.max_client_weight_share
MIN_CLIENTS_FOR_SHARE_CAP = 3
# An update farther from the global model than this many times the round's median distance is
# rejected; honest rounds measured stay below 3 (see the module docstring).
DEFAULT_UPDATE_NORM_FACTOR = GuardSettings.update_norm_factor
MIN_UPDATES_FOR_ADAPTIVE_BOUND = 3
# No weight of these models comes near this; a larger aggregate value is a poisoned model even if
# it is finite (float32 overflows to Inf only at 3.4e38, long after the model is useless).
MAX_ABS_WEIGHT = 1e6


def checked_label_counts(client_id: str, label_counts, num_train_samples: int, num_classes: int
                         ) -> tuple[int, ...] | None:
    """A registration's label histogram (None when the client shares none), or Rejected
    ('bad_label_counts'): one count per class, summing to the registered train
    samples. It is what the client says and stays untrusted: it decides which synthetic classes the
    server sends it (--client-synthetic-mix) and, with --cvae-aggregation, which classes its CVAE
    draws or weighs in (genfl_server/generator.py); with --partition-info it must match the
    partition's (PartitionCounts.check)."""
    if not len(label_counts):
        return None
    if len(label_counts) != num_classes:  # before converting: the repeated field may be huge
        raise Rejected(RejectReason.BAD_LABEL_COUNTS, f"client {client_id!r} reports label counts for "
                                                      f"{len(label_counts)} classes; the dataset has {num_classes}")
    counts = tuple(int(n) for n in label_counts)
    if sum(counts) != num_train_samples:
        raise Rejected(RejectReason.BAD_LABEL_COUNTS, f"client {client_id!r} reports label counts summing to "
                                                      f"{sum(counts)}, but {num_train_samples} training samples")
    return counts


def check_registered_samples(client_id: str, num_train_samples: int, max_client_samples: int | None) -> None:
    """Refuse a registration claiming more training samples than the dataset holds."""
    if max_client_samples is not None and num_train_samples > max_client_samples:
        raise Rejected(RejectReason.BAD_SAMPLE_COUNT,
                       f"client {client_id!r} reports {num_train_samples} training samples; this server "
                       f"accepts at most {max_client_samples} per client (--max-client-samples)")


@dataclass(frozen=True)
class PartitionCounts:
    """The sample counts ``partition.json`` records for each client: with ``--partition-info`` the
    server admits exactly these clients with exactly these counts (a client cannot claim more
    weight than its shard holds)."""

    by_client: Mapping[str, tuple[int, int]]  # client_id -> (train, held-out)
    source: str  # the file, for messages
    # client_id -> its train images per class, where partition.json records them: a client that
    # shares label counts must share these (the generator modes give it classes by them).
    class_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_partition(cls, partition: Mapping, source: str) -> "PartitionCounts":
        """From a partition.json's content; ValueError names what is missing or wrong."""
        clients = partition.get("clients")
        if not isinstance(clients, list) or not clients:
            raise ValueError(f"{source} lists no clients (a partition.json from genfl-partition has them)")
        counts: dict[str, tuple[int, int]] = {}
        classes: dict[str, tuple[int, ...]] = {}
        for entry in clients:
            try:
                cid, train, heldout = entry["client_id"], entry["num_train"], entry["num_heldout"]
            except (TypeError, KeyError) as error:
                raise ValueError(f"{source}: a client entry lacks {error}") from None
            if not (isinstance(cid, str) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                 for n in (train, heldout))):
                raise ValueError(f"{source}: client entry {shown(str(entry))} is not (client_id, num_train, num_heldout)")
            counts[cid] = (train, heldout)
            per_class = entry.get("train_class_counts")
            if per_class is not None:
                if not (isinstance(per_class, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                            for n in per_class) and sum(per_class) == train):
                    raise ValueError(f"{source}: client {shown(cid)!r}'s train_class_counts do not add up to its "
                                     "num_train")
                classes[cid] = tuple(per_class)
        return cls(counts, source, classes)

    def check(self, client_id: str, num_train: int, num_heldout: int,
              label_counts: tuple[int, ...] | None = None) -> None:
        """Refuse a registration that does not match the partition (its label counts too, where the
        client shares them and the partition records them)."""
        expected = self.by_client.get(client_id)
        if expected is None:
            raise Rejected(RejectReason.NOT_IN_PARTITION,
                           f"client {shown(client_id)!r} is not in this run's partition ({self.source})")
        if expected != (num_train, num_heldout):
            raise Rejected(RejectReason.PARTITION_MISMATCH,
                           f"client {client_id!r} reports {num_train} train / {num_heldout} held-out samples; "
                           f"the partition ({self.source}) gives it {expected[0]} / {expected[1]}")
        recorded = self.class_counts.get(client_id)
        if label_counts is not None and recorded is not None and tuple(label_counts) != recorded:
            raise Rejected(RejectReason.BAD_LABEL_COUNTS,
                           f"client {client_id!r} reports label counts {list(label_counts)}; the partition "
                           f"({self.source}) gives it {list(recorded)}")


def validated_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A result's metrics as floats, or Rejected('bad_metrics')."""
    if len(metrics) > MAX_METRICS:
        raise Rejected(RejectReason.BAD_METRICS,
                       f"a result carries at most {MAX_METRICS} metrics, got {len(metrics)}")
    checked = {}
    for name, value in metrics.items():
        if name not in METRIC_RANGES:
            shown = name if len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
            raise Rejected(RejectReason.BAD_METRICS, f"unknown metric {shown!r}; known: {sorted(METRIC_RANGES)}")
        low, high = METRIC_RANGES[name]
        value = float(value)
        if not (math.isfinite(value) and low <= value <= high):
            raise Rejected(RejectReason.BAD_METRICS, f"metric {name!r} = {value!r} is outside [{low}, {high}]")
        checked[name] = value
    return checked


def check_dp_epsilon(task_settings, metrics: Mapping[str, float]) -> None:
    """In a DP run, a training result must say how much privacy its client has spent; one that
    does not is refused (reason 'missing_dp_epsilon'), as the run's guarantee could not cover it."""
    if isinstance(task_settings, TrainTask) and task_settings.dp and "dp_epsilon" not in metrics:
        raise Rejected(RejectReason.MISSING_DP_EPSILON, f"a DP-SGD {task_settings.model} result must report "
                                                        f"its client's spent epsilon (metric 'dp_epsilon')")


def _scaled_towards(update, reference, factor: float) -> dict[str, torch.Tensor]:
    """reference + factor * (update - reference) on floating entries (clipping the step)."""
    return {name: (ref + (update[name].double() - ref.double()).mul_(factor).to(ref.dtype) if ref.is_floating_point()
                   else update[name]) for name, ref in reference.items()}


def capped_weights(sample_counts: Mapping[str, int], max_share: float | None) -> dict[str, float]:
    """Each client's FedAvg weight: its sample count, cut so that no client holds more than
    ``max_share`` of the total (water-filling: every client above the cut gets the cut).

    Unchanged when no client exceeds the share, or with fewer than MIN_CLIENTS_FOR_SHARE_CAP
    clients; a cap at or below 1/K cannot be met and gives equal weights.
    """
    weights = {cid: float(n) for cid, n in sample_counts.items()}
    if max_share is None or len(weights) < MIN_CLIENTS_FOR_SHARE_CAP:
        return weights
    if max_share * len(weights) <= 1.0:
        return {cid: 1.0 for cid in weights}
    ordered = sorted(weights.values(), reverse=True)
    for capped in range(len(ordered)):
        # ``capped`` clients at weight c, the rest summing to R: c = share * (capped * c + R).
        rest = sum(ordered[capped:])
        cut = max_share * rest / (1.0 - max_share * capped)
        if ordered[capped] <= cut:
            break
    if capped == 0:
        return weights  # nobody beyond the share: the weights stay exactly the sample counts
    return {cid: min(w, cut) for cid, w in weights.items()}


@dataclass(frozen=True)
class UpdateGuard:
    """The update bounds of a run (see the module docstring)."""

    max_update_norm: float | None = None  # explicit bound on ||w_client - w_global||
    norm_factor: float | None = DEFAULT_UPDATE_NORM_FACTOR  # adaptive bound: factor x median distance
    clip: bool = False  # beyond max_update_norm: scale the step down to the bound instead of rejecting
    max_weight_share: float | None = DEFAULT_MAX_CLIENT_WEIGHT_SHARE

    @classmethod
    def from_config(cls, settings: GuardSettings) -> "UpdateGuard":
        """The run's bounds from its guard settings (``cfg.guard``); 0 (factor) and 1 (share) switch
        a bound off."""
        share = settings.max_client_weight_share
        return cls(max_update_norm=settings.max_update_norm, norm_factor=settings.update_norm_factor or None,
                   clip=settings.clip_updates, max_weight_share=None if share is None or share >= 1 else share)

    def round(self, global_state: Mapping[str, torch.Tensor], sample_counts: Mapping[str, int]) -> "RoundGuard":
        return RoundGuard(self, global_state, capped_weights(sample_counts, self.max_weight_share))


@dataclass
class RoundGuard:
    """One round's view: weights, each folded update's distance, and the verdict at its end."""

    bounds: UpdateGuard
    global_state: Mapping[str, torch.Tensor]
    weights: dict[str, float]
    distances: dict[str, float] = field(default_factory=dict)
    clipped: set[str] = field(default_factory=set)

    def admit(self, client_id: str, num_samples: int, update: Mapping[str, torch.Tensor],
              start: Mapping[str, torch.Tensor] | None = None) -> tuple[float, Mapping[str, torch.Tensor]]:
        """(FedAvg weight, update to fold in) for one arriving update; records its distance from
        ``start``, the model its client trained from (default: the round's global model)."""
        start = self.global_state if start is None else start
        distance = as_update(update).distance_from(start)
        self.distances[client_id] = distance
        limit = self.bounds.max_update_norm
        if self.bounds.clip and limit is not None and distance > limit:
            self.clipped.add(client_id)
            log.warning("client %s: update distance %.4g beyond --max-update-norm %.4g, clipped",
                        client_id, distance, limit)
            update = _scaled_towards(update, start, limit / distance)
        # The result's count never exceeds the registered one (checked when it arrived); the cap
        # scales it by the registered count's cut.
        registered = self.weights.get(client_id)
        weight = float(num_samples)
        if registered is not None:
            weight = min(weight, registered)
        return (num_samples if weight == num_samples else weight), update

    def adaptive_bound(self) -> float | None:
        if self.bounds.norm_factor is None or len(self.distances) < MIN_UPDATES_FOR_ADAPTIVE_BOUND:
            return None
        return self.bounds.norm_factor * statistics.median(self.distances.values())

    def offenders(self) -> dict[str, str]:
        """client -> reason, for updates beyond a bound (empty in an honest round)."""
        found = {}
        limit = self.bounds.max_update_norm
        adaptive = self.adaptive_bound()
        for client_id, distance in self.distances.items():
            if limit is not None and distance > limit and client_id not in self.clipped:
                found[client_id] = "update_norm"
            elif adaptive is not None and distance > adaptive:
                found[client_id] = "update_norm_adaptive"
        return found

    def check_aggregate(self, aggregate: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Empty when the aggregate may become the global model; otherwise the clients to redo the
        round without: the one whose update moved farthest (the likeliest cause)."""
        problem = aggregate_problem(aggregate)
        if problem is None:
            return {}
        if not self.distances:
            raise RuntimeError(f"aggregate {problem} with no update folded in")
        worst = max(self.distances, key=lambda cid: self.distances[cid])
        log.error("aggregate rejected: %s; redoing the round without %s (farthest update, distance %.4g)",
                  problem, worst, self.distances[worst])
        return {worst: "bad_aggregate"}

    def median_distance(self) -> float:
        return statistics.median(self.distances.values()) if self.distances else math.nan

    def ratio_to_median(self) -> float | None:
        """Largest distance over the median distance (for measurements)."""
        if len(self.distances) < 2:
            return None
        median = statistics.median(self.distances.values())
        return max(self.distances.values()) / median if median > 0 else math.inf


def aggregate_problem(aggregate: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``aggregate`` may not become the global model (a non-finite or absurd weight), or None."""
    for name, value in aggregate.items():
        if not value.is_floating_point():
            continue
        if not bool(torch.isfinite(value).all()):
            return f"{name!r} holds NaN or Inf"
        largest = float(value.abs().max()) if value.numel() else 0.0
        if largest > MAX_ABS_WEIGHT:
            return f"{name!r} holds |value| {largest:.3g} > {MAX_ABS_WEIGHT:g}"
    return None
