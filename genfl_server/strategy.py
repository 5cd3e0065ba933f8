"""Aggregation strategies: what each client is asked, and how their updates become the next global model.

A strategy sees a round as Flower's do: ``configure_train`` (each client's task and the model it
starts from), then ``begin(global_state)``, ``accumulate(update, weight)`` once per accepted update
(in arrival order, from gRPC threads, serialised by the caller) and ``finish() -> new global state``;
``configure_evaluate`` asks for the evaluations. FedAvg and its variants fold updates into a running
sum as they arrive, so the server holds one model's worth of accumulator, never K updates. The robust
strategies (coordinate-wise median, trimmed mean, Krum) need every update of a round at once: they
hold all K of them until ``finish()``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Mapping

import torch

from genfl_shared.config import ROUND_HOLDING_STRATEGIES, STRATEGY_NAMES, StrategySettings
from genfl_shared.tasks import EvaluateTask, TaskSettings, TrainTask

from .updates import Update, as_update

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientTrainSettings:
    """The genfl_shared.tasks.TrainTask fields a strategy sets on every client's training task
    (same names; the round engine applies them with ``dataclasses.replace``)."""

    prox_mu: float = 0.0  # FedProx's proximal weight; 0: no proximal term


@dataclass(frozen=True)
class Instruction:
    """What one client is asked: its task, and the model it starts from. Clients given the very
    same model object share one encoded download."""

    task: TaskSettings
    model: Mapping[str, torch.Tensor]


class Strategy:
    """The base of every strategy: one shared model for all clients, each task as the phase set it
    plus the strategy's ``client_config``."""

    name: str
    label: str
    # The settings it is built from: its constructor's keyword arguments, the names under which
    # genfl_shared.config.StrategySettings carries them. build_strategy refuses any other.
    takes: tuple[str, ...] = ()
    # Settings every client's training task must carry for this strategy (e.g. FedProx's mu).
    client_config = ClientTrainSettings()

    def configure_train(self, rnd: int, model: Mapping[str, torch.Tensor],
                        tasks: Mapping[str, TrainTask]) -> dict[str, Instruction]:
        """client_id -> what it trains in round ``rnd``, from each client's seeded task."""
        settings = asdict(self.client_config)
        return {client_id: Instruction(replace(task, **settings), model) for client_id, task in tasks.items()}

    def configure_evaluate(self, rnd: int, model: Mapping[str, torch.Tensor],
                           tasks: Mapping[str, EvaluateTask]) -> dict[str, Instruction]:
        """client_id -> what it evaluates after round ``rnd``."""
        return {client_id: Instruction(task, model) for client_id, task in tasks.items()}

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def accumulate(self, update: Update | Mapping[str, torch.Tensor], num_samples: float) -> None:
        raise NotImplementedError

    def finish(self) -> State:
        raise NotImplementedError

    def state_dict(self) -> State:
        """What carries over between rounds (FedAvgM's velocity), so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state between rounds, got {sorted(state)[:3]}")


# name -> strategy class; every --strategy/--strategies choice list and label derives from it.
STRATEGIES: dict[str, type] = {}


def register_strategy(cls: type) -> type:
    """Class decorator: make a strategy available by its ``name`` (with its ``label`` in reports).
    ``build_strategy`` builds it as ``cls(**options)``, options among its ``takes``; their defaults
    are the run settings' (genfl_shared.config.AggregationSettings), so the constructor has none."""
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Float tensors sum in their own precision (float32 for these models: the rounding error of a
    # weighted mean of a few dozen float32 values is far below training noise, and it keeps the
    # accumulator at one model's size). Half precisions widen to float32; integer buffers such as
    # BatchNorm's num_batches_tracked sum exactly in float64 and are rounded back to integers.
    # A float32 sum can overflow only through absurd values (a hostile client's 3e38s): the sum
    # is then non-finite, and the update guard's aggregate check (guard.py) refuses it and has
    # the round redone without that client, so an overflow never reaches the global model.
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float64


@register_strategy
class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): the sample-weighted mean of every state_dict entry,
    BatchNorm running statistics and counters included; integer entries stay integer."""

    name = "fedavg"
    label = "FedAvg"

    def __init__(self) -> None:
        self._sum: State | None = None
        self._template: State | None = None
        self._total_samples = 0

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._template = {k: v for k, v in global_state.items()}
        self._sum = {k: torch.zeros(v.shape, dtype=_accumulator_dtype(v.dtype)) for k, v in global_state.items()}
        self._total_samples = 0

    def accumulate(self, update: Mapping[str, torch.Tensor], num_samples: float) -> None:
        if self._sum is None:
            raise RuntimeError("accumulate() before begin()")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        as_update(update).fold_into(self._sum, num_samples)  # an upload folds piece by piece from its chunks
        self._total_samples += num_samples

    @property
    def total_samples(self) -> int:
        return self._total_samples

    def finish(self) -> State:
        if self._sum is None or self._template is None:
            raise RuntimeError("finish() before begin()")
        if self._total_samples == 0:
            raise RuntimeError("no update was accumulated this round")
        result: State = {}
        for name, acc in self._sum.items():
            target = self._template[name].dtype
            mean = acc.div_(self._total_samples)
            if not target.is_floating_point:
                mean = mean.round_()
            result[name] = mean.to(target)
        self._sum = None
        return result


@register_strategy
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; each client adds (mu/2)·||w - w_global||²
    to its local objective, which limits client drift on skewed data."""

    name = "fedprox"
    label = "FedProx"

    takes = ("prox_mu",)

    def __init__(self, prox_mu: float) -> None:
        super().__init__()
        if prox_mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {prox_mu}")
        self.client_config = ClientTrainSettings(prox_mu=prox_mu)


@register_strategy
class FedAvgM(FedAvg):
    """FedAvgM (Hsu et al. 2019): server momentum on the FedAvg pseudo-gradient.

    With d = global - mean(updates): v <- momentum·v + d, global <- global - lr·v, for floating
    entries; integer buffers take the plain mean. The velocity lives as long as the strategy
    (one phase), so build one strategy per phase, not per round.
    """

    name = "fedavgm"
    label = "FedAvgM"

    takes = ("lr", "momentum")

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum  # the server's learning rate and momentum
        self._velocity: State | None = None
        self._global: State | None = None

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> None:
        super().begin(global_state)
        self._global = dict(global_state)

    def state_dict(self) -> State:
        return {} if self._velocity is None else {k: v.clone() for k, v in self._velocity.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._velocity = {k: v.clone() for k, v in state.items()} or None

    def finish(self) -> State:
        mean = super().finish()
        if self._velocity is None:
            self._velocity = {k: torch.zeros_like(v) for k, v in mean.items() if v.is_floating_point()}
        result = {}
        for name, avg in mean.items():
            if name not in self._velocity:
                result[name] = avg
                continue
            velocity = self._velocity[name].mul_(self.momentum).add_(self._global[name] - avg)
            result[name] = self._global[name] - self.lr * velocity
        return result


class _HoldsRound(Strategy):
    """Base of the robust strategies: holds every update of the round (K models of memory) because
    a median, a trimmed mean or Krum's distances need them all at once. Sample counts are not
    used: a client's claimed count is exactly what a hostile client would inflate."""

    def __init__(self) -> None:
        self._global: State | None = None
        self._updates: list[Mapping[str, torch.Tensor]] = []

    def begin(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._global = dict(global_state)
        self._updates = []

    def accumulate(self, update: Mapping[str, torch.Tensor], num_samples: float) -> None:
        if self._global is None:
            raise RuntimeError("accumulate() before begin()")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self._updates.append(update)

    def finish(self) -> State:
        if self._global is None:
            raise RuntimeError("finish() before begin()")
        if not self._updates:
            raise RuntimeError("no update was accumulated this round")
        result = {}
        for name, reference in self._global.items():
            stacked = torch.stack([u[name].to(torch.float64) for u in self._updates])
            combined = self._combine(name, stacked)
            if not reference.is_floating_point():
                combined = combined.round()
            result[name] = combined.to(reference.dtype)
        self._updates = []
        return result

    def _combine(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_strategy
class CoordinateMedian(_HoldsRound):
    """Coordinate-wise median (Yin et al. 2018): each weight is the median of the clients' values
    (the mean of the two middle ones for an even count); robust to fewer than half bad clients."""

    name = "median"
    label = "Median"

    def _combine(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        ordered = stacked.sort(dim=0).values
        k = ordered.shape[0]
        return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


@register_strategy
class TrimmedMean(_HoldsRound):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per weight, drop the ``trim_fraction`` largest
    and smallest client values and average the rest."""

    name = "trimmed_mean"
    label = "Trimmed mean"

    takes = ("trim_fraction",)

    def __init__(self, trim_fraction: float) -> None:
        super().__init__()
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def _combine(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        cut = int(self.trim_fraction * k)
        return stacked.sort(dim=0).values[cut:k - cut].mean(dim=0)


@register_strategy
class Krum(_HoldsRound):
    """(Multi-)Krum (Blanchard et al. 2017): each update is scored by the summed squared distance to
    its K - F - 2 nearest others; the mean of the ``select`` best-scored updates becomes the model
    (select = 1: Krum). Tolerating F Byzantine clients needs K > 2F + 2 updates; a round with fewer
    tolerates (K - 3) // 2, with a warning."""

    name = "krum"
    label = "Krum"

    takes = ("byzantine", "select")

    def __init__(self, byzantine: int, select: int) -> None:
        super().__init__()
        if byzantine < 0 or select < 1:
            raise ValueError(f"Krum needs byzantine >= 0 and select >= 1, got {byzantine}, {select}")
        self.byzantine, self.select = byzantine, select
        self.chosen: list[int] = []  # indices (arrival order) of the updates last selected

    def finish(self) -> State:
        k = len(self._updates)
        byzantine = self.byzantine
        if k <= 2 * byzantine + 2:
            # Fewer updates than planned (clients missing, or rejected by the update guard, which
            # leaves fewer hostile ones too): tolerate as many as this round's count allows.
            byzantine = (k - 3) // 2
            if byzantine < 0:
                raise ValueError(f"Krum needs at least 3 updates, got {k}")
            log.warning("Krum: %d updates tolerate %d Byzantine clients, not %d", k, byzantine, self.byzantine)
        if self.select > k - byzantine:
            raise ValueError(f"Krum cannot select {self.select} of {k} updates with {byzantine} Byzantine")
        flat = torch.stack([torch.cat([u[n].to(torch.float64).reshape(-1) for n, ref in self._global.items()
                                       if ref.is_floating_point()]) for u in self._updates])
        distances = torch.cdist(flat, flat).pow(2)
        neighbours = k - byzantine - 2
        # Each row's smallest entry is its zero distance to itself: skip it.
        scores = distances.sort(dim=1).values[:, 1:neighbours + 1].sum(dim=1)
        self.chosen = scores.argsort()[:self.select].tolist()
        self._updates = [self._updates[i] for i in self.chosen]
        return super().finish()

    def _combine(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        return stacked.mean(dim=0)


def strategy_names() -> list[str]:
    """Registered strategy names, in registration order (FedAvg first)."""
    return list(STRATEGIES)


def strategy_holds_round(name: str) -> bool:
    """Whether a strategy is a robust one that holds every update and does not trust their mean."""
    return issubclass(STRATEGIES[name], _HoldsRound)


def strategy_labels() -> dict[str, str]:
    """{name: human-readable label}, e.g. {"fedavgm": "FedAvgM"}, in registration order."""
    return {name: cls.label for name, cls in STRATEGIES.items()}


def build_strategy(settings: StrategySettings) -> Strategy:
    """The strategy ``settings`` names, built from its options (e.g. the run's
    ``cfg.aggregation.strategy_settings()``); an option it does not take is refused, not ignored,
    and one not given keeps the strategy's default."""
    try:
        cls = STRATEGIES[settings.name]
    except KeyError:
        raise ValueError(f"unknown strategy {settings.name!r}; choose from {sorted(STRATEGIES)}") from None
    unknown = sorted(set(settings.options) - set(cls.takes))
    if unknown:
        takes = ", ".join(cls.takes) or "no settings"
        raise ValueError(f"strategy {settings.name!r} takes {takes}, not {', '.join(unknown)}")
    return cls(**settings.options)


# The run settings (genfl_shared.config) name the strategies without importing this module.
if (tuple(STRATEGIES), {name for name in STRATEGIES if strategy_holds_round(name)}) != (
        STRATEGY_NAMES, ROUND_HOLDING_STRATEGIES):
    raise RuntimeError(f"the strategy registry {list(STRATEGIES)} does not match genfl_shared.config's "
                       f"STRATEGY_NAMES {list(STRATEGY_NAMES)} and ROUND_HOLDING_STRATEGIES")
