"""The arms of a sweep's classifier phase, as data: one entry of ``ARM_SPECS`` per ``--arms`` choice.

An entry names the arm, says how tables label it, which run settings it changes (RunConfig field
-> value) and what its cells start from; the ``--arms`` choices, the labels and the arms whose
server samples synthetic data during federation all follow from the entries, so a new
mitigation arm is one entry.

The mitigations of label skew are pre-trained FedAvg arms that start from the group's shared
pre-training: the balanced-softmax local loss, server-side fine-tuning on the synthetic set,
server-side distillation towards the clients' models on the synthetic inputs, and synthetic images
of the classes a client lacks; and the poster's Figs 6-7 experiment, a skewed federation pre-trained
on the synthetic data of the IID federation's CVAE of the same seed (how much of the skew's harm is a
worse generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from genfl_server.strategy import strategy_labels
from genfl_shared.config import RunConfig

STRATEGY_LABELS = strategy_labels()  # {name: label}, from the strategy registry; the sweep's one use of it

PRETRAINED_PREFIX = "pretrained-"


@dataclass(frozen=True, eq=False)  # one object per entry: compared and hashed by identity
class ArmSpec:
    """One ``--arms`` choice.

    ``settings``: the RunConfig fields the arm sets, in the order its server is given them.
    ``sweep_settings``: fields the arm takes from the sweep's own settings (options of genfl-sweep
    that reach only this arm's cells); where the arm also sets the field, the sweep's value replaces
    the arm's only when it is on (not 0), as the arm's value is what makes the arm.
    """

    name: str  # as --arms spells it
    label: str  # in tables; "{strategy}" stands for the strategy's label
    settings: Mapping[str, Any] = field(default_factory=dict)
    sweep_settings: tuple[str, ...] = ()
    pretrained: bool = True  # starts from the classifier pre-trained on the CVAE's synthetic data
    per_strategy: bool = False  # runs once per --strategies entry (the others: FedAvg)
    samples_synthetic: bool = False  # its server samples the synthetic set during federation: needs the CVAE
    iid_generator: bool = False  # pre-trains from the IID federation's CVAE of its seed, not its own group's
    is_mitigation: bool = True  # a mitigation of label skew (reports compare it with the plain pre-trained arm)

    def __post_init__(self):
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @property
    def mitigation(self) -> str | None:
        """The mitigation a pre-trained arm adds (its name after "pretrained-"), None for the others."""
        return self.name.removeprefix(PRETRAINED_PREFIX) if self.is_mitigation else None

    def resolve(self, sweep: RunConfig) -> dict[str, Any]:
        """The arm's settings with the sweep's ``sweep_settings`` applied (a None setting has no
        spelling, so it is left out)."""
        resolved = {}
        for name in dict.fromkeys([*self.settings, *self.sweep_settings]):
            if name in self.sweep_settings and (sweep.setting(name) or name not in self.settings):
                value = sweep.setting(name)
            else:
                value = self.settings[name]
            if value is not None:
                resolved[name] = value
        return resolved


# The fine-tuning arm's steps when the sweep is not given --server-finetune-steps (its RunConfig
# default, 0, means off): benchmarks/bench_server_finetune.py measured 200 steps at +74 to +77 pp on
# a one-class model (25 steps: +0 to +11 pp).
FINETUNE_ARM_STEPS = 200
# The synthetic-mix arm's ratio when the sweep is not given --client-synthetic-mix (its RunConfig
# default, 0, means off): as many synthetic as real samples per epoch at most.
SYNTHMIX_ARM_RATIO = 0.5

# The --arms choices, in the order --help lists them.
ARM_SPECS: dict[str, ArmSpec] = {spec.name: spec for spec in (
    ArmSpec("pretrained", "pre-trained + {strategy}", per_strategy=True, is_mitigation=False),
    ArmSpec("baseline", "baseline + {strategy}", {"pretrain": False}, pretrained=False, per_strategy=True,
            is_mitigation=False),
    ArmSpec("pretrained-only", "pre-training only (no local training)", {"local_epochs": 0}, is_mitigation=False),
    ArmSpec("pretrained-balanced", "pre-trained + balanced softmax (local loss)", {"local_loss": "balanced"}),
    ArmSpec("pretrained-finetune", "pre-trained + server fine-tuning on synthetic data",
            {"server_finetune_steps": FINETUNE_ARM_STEPS},
            ("server_finetune_steps", "server_finetune_lr", "server_finetune_batch_size"), samples_synthetic=True),
    ArmSpec("pretrained-iid-synthetic", "pre-trained on the IID CVAE's samples + FedAvg", iid_generator=True),
    ArmSpec("pretrained-distill", "pre-trained + server distillation on synthetic inputs", {"server_distill": True},
            ("server_distill_teacher", "server_distill_max_teachers", "server_distill_steps", "server_distill_lr",
             "server_distill_temperature", "server_distill_batch_size"), samples_synthetic=True),
    ArmSpec("pretrained-synthmix", "pre-trained + synthetic images of missing classes (clients)",
            {"client_synthetic_mix": SYNTHMIX_ARM_RATIO}, ("client_synthetic_mix",), samples_synthetic=True),
)}


def _run_order(spec: ArmSpec) -> tuple[bool, bool, bool]:
    """Pre-trained arms before the baseline ones, and of them: the per-strategy arm first (it
    pre-trains for the others of its group), the arms on another federation's generator last."""
    return (not spec.pretrained, not spec.per_strategy, spec.iid_generator)


# The order a sweep runs the arms in, and reports list them in.
ARMS_IN_RUN_ORDER = tuple(sorted(ARM_SPECS.values(), key=_run_order))

ARM_CHOICES = tuple(ARM_SPECS)
MITIGATIONS = tuple(spec.mitigation for spec in ARMS_IN_RUN_ORDER if spec.mitigation)
# The sweep's settings that reach only the mitigation arms (options of genfl-sweep, not the poster's).
MITIGATION_FIELDS = tuple(dict.fromkeys(name for spec in ARM_SPECS.values() if spec.mitigation
                                        for name in (*spec.settings, *spec.sweep_settings)))
SWEEP_ARM_FIELDS = tuple(dict.fromkeys(name for spec in ARM_SPECS.values() for name in spec.sweep_settings))


@dataclass(frozen=True)
class Arm:
    """An arm as a sweep runs it: a registry entry with its strategy."""

    spec: ArmSpec
    strategy: str = "fedavg"

    @classmethod
    def named(cls, name: str, strategy: str = "fedavg") -> "Arm":
        return cls(ARM_SPECS[name], strategy)

    @property
    def name(self) -> str:  # folder name
        if self.spec.per_strategy and self.strategy != "fedavg":
            return f"{self.spec.name}-{self.strategy}"
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.label.format(strategy=STRATEGY_LABELS[self.strategy])

    @property
    def pretrain(self) -> bool:
        return self.spec.pretrained

    @property
    def mitigation(self) -> str | None:
        return self.spec.mitigation

    def settings(self, sweep: RunConfig) -> dict[str, Any]:
        """What this arm's server is given besides the sweep's settings (``sweep``), in order."""
        return {"strategy": self.strategy, **self.spec.resolve(sweep)}

    def record(self) -> dict[str, Any]:
        """How a finished cell's cell.json describes its arm."""
        return {"name": self.name, "label": self.label, "pretrain": self.pretrain, "strategy": self.strategy,
                "local_epochs": self.spec.settings.get("local_epochs"), "mitigation": self.mitigation}


def build_arms(arms: list[str], strategies: list[str]) -> list[Arm]:
    """The arms to run, pre-trained ones first, FedAvg first (the first pre-trained arm pre-trains)."""
    for arm in arms:
        if arm not in ARM_SPECS:
            raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARM_CHOICES)}")
    for strategy in strategies:
        if strategy not in STRATEGY_LABELS:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGY_LABELS)}")
    ordered = sorted(set(strategies), key=list(STRATEGY_LABELS).index)
    result = []
    for spec in ARMS_IN_RUN_ORDER:
        if spec.name in arms:
            result += [Arm(spec, s) for s in ordered] if spec.per_strategy else [Arm(spec)]
    if not result:
        raise ValueError("no arms to run")
    return result
