"""What a sweep runs: distributions x seeds x arms, as cells with dependencies.

Per (distribution, seed) there is one partition (``shards/``) and:
- ``cvae``: the federated CVAE phase, run once and shared by every pre-trained arm;
- the first pre-trained arm samples, scores (CAS, federated CAS) and pre-trains from that CVAE;
  the other pre-trained arms start from its ``pretrained_classifier.pt``, so all of them start
  from the very same weights and differ only in what the arm changes;
- baseline arms start from the seeded random weights, on the same shards.
Per seed, a ``centralised`` cell trains a CVAE on all the data in one place (the CAS reference).

With a privacy axis (``--epsilons``), each level ε has its own CVAE phase (DP-SGD with
``--dp-target-epsilon ε``; ∞: without DP) and its own pre-trained arms, in ``<group>/eps-<ε>/``, on
the group's one partition; the baseline arms do not use the CVAE and run once per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from genfl_server.strategy import strategy_labels
from genfl_shared.config import argv_for

STRATEGY_LABELS = strategy_labels()  # {name: label}, from the strategy registry
ARM_CHOICES = ("pretrained", "baseline", "pretrained-only", "pretrained-balanced", "pretrained-finetune",
               "pretrained-iid-synthetic", "pretrained-distill", "pretrained-synthmix")
# Issue 14's mitigations of label skew, each a pre-trained FedAvg arm: the balanced-softmax local
# loss (--local-loss balanced), server-side fine-tuning on the synthetic set (--server-finetune-steps)
# and server-side distillation towards the clients' models on the synthetic inputs (--server-distill);
# and the poster's Figs 6-7 experiment: a skewed federation pre-trained on the synthetic data of the
# IID federation's CVAE of the same seed (how much of the skew's harm is a worse generator).
MITIGATION_LABELS = {"balanced": "balanced softmax (local loss)", "finetune": "server fine-tuning on synthetic data",
                     "distill": "server distillation on synthetic inputs",
                     "synthmix": "synthetic images of missing classes (clients)",
                     "iid-synthetic": "pre-trained on the IID CVAE's samples + FedAvg"}
IID_SYNTHETIC = "iid-synthetic"
# The arms whose server samples the synthetic set during federation (their cells take the CVAE).
SYNTHETIC_MITIGATIONS = ("finetune", "distill", "synthmix")
# The synthetic-mix arm's ratio when the sweep is not given --client-synthetic-mix (its RunConfig
# default, 0, means off): as many synthetic as real samples per epoch at most.
SYNTHMIX_ARM_RATIO = 0.5
# The fine-tuning arm's steps when the sweep is not given --server-finetune-steps (its RunConfig
# default, 0, means off): benchmarks/bench_server_finetune.py measured 200 steps at +74 to +77 pp on
# a one-class model (25 steps: +0 to +11 pp).
FINETUNE_ARM_STEPS = 200


@dataclass(frozen=True)
class Distribution:
    """A label split: IID, or Dirichlet(alpha)."""

    alpha: float | None

    @classmethod
    def from_name(cls, name: str) -> "Distribution":
        """The distribution a folder name (``name``) stands for."""
        return cls(None) if name == "iid" else cls(float(name.removeprefix("alpha-")))

    @property
    def _alpha_text(self) -> str:
        short = f"{self.alpha:g}"  # 0.1, 100, 1e-05
        return short if float(short) == self.alpha else repr(self.alpha)  # never two alphas, one folder

    @property
    def name(self) -> str:  # folder name
        return "iid" if self.alpha is None else f"alpha-{self._alpha_text}"

    @property
    def label(self) -> str:  # table row
        return "IID" if self.alpha is None else f"α={self._alpha_text}"


def parse_distributions(text: str) -> list[Distribution]:
    """``"iid,100,0.1"`` -> distributions in the given order (duplicates are an error)."""
    result: list[Distribution] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if item == "iid":
            dist = Distribution(None)
        else:
            try:
                alpha = float(item)
            except ValueError:
                raise ValueError(f"not a Dirichlet alpha or 'iid': {item!r}") from None
            if not alpha > 0 or alpha != alpha or alpha == float("inf"):
                raise ValueError(f"alpha must be a positive number, got {item!r}")
            dist = Distribution(alpha)
        if dist in result:
            raise ValueError(f"{dist.label} is listed twice")
        result.append(dist)
    if not result:
        raise ValueError("no distributions given")
    return result


@dataclass(frozen=True)
class PrivacyLevel:
    """A level of the privacy axis: DP-SGD in the CVAE phase calibrated to ε, or no DP (ε = ∞)."""

    epsilon: float  # math.inf: no DP

    @property
    def _text(self) -> str:
        if math.isinf(self.epsilon):
            return "inf"
        short = f"{self.epsilon:g}"
        return short if float(short) == self.epsilon else repr(self.epsilon)

    @property
    def name(self) -> str:  # folder name
        return f"eps-{self._text}"

    @property
    def label(self) -> str:  # table row
        return "ε = ∞ (no DP)" if math.isinf(self.epsilon) else f"ε = {self._text}"

    @property
    def marker(self) -> float | str:
        """How cell.json records it (strict JSON has no infinity)."""
        return "inf" if math.isinf(self.epsilon) else self.epsilon

    @classmethod
    def from_marker(cls, value: float | str) -> "PrivacyLevel":
        return cls(math.inf if value == "inf" else float(value))

    def server_args(self, dp_args: list[str]) -> list[str]:
        """The CVAE server's options at this level (``dp_args``: the sweep's other DP-SGD settings)."""
        return [] if math.isinf(self.epsilon) else [*argv_for(dp_target_epsilon=self.epsilon), *dp_args]


def parse_epsilons(text: str) -> list[PrivacyLevel]:
    """``"1,3,8,inf"`` -> privacy levels in the given order (duplicates are an error)."""
    result: list[PrivacyLevel] = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        try:
            epsilon = float(item)
        except ValueError:
            raise ValueError(f"not an epsilon or 'inf': {item!r}") from None
        if not epsilon > 0:  # also refuses NaN
            raise ValueError(f"epsilon must be positive (or inf: no DP), got {item!r}")
        level = PrivacyLevel(epsilon)
        if level in result:
            raise ValueError(f"{level.label} is listed twice")
        result.append(level)
    if not result:
        raise ValueError("no epsilons given")
    return result


@dataclass(frozen=True)
class Arm:
    """One way of running the classifier phase."""

    pretrain: bool
    strategy: str = "fedavg"
    local_epochs: int | None = None  # None: the preset's
    mitigation: str | None = None  # a key of MITIGATION_LABELS, or None

    @property
    def name(self) -> str:
        if self.local_epochs == 0:
            return "pretrained-only"
        base = "pretrained" if self.pretrain else "baseline"
        if self.mitigation is not None:
            return f"{base}-{self.mitigation}"
        return base if self.strategy == "fedavg" else f"{base}-{self.strategy}"

    @property
    def label(self) -> str:
        if self.local_epochs == 0:
            return "pre-training only (no local training)"
        if self.mitigation == IID_SYNTHETIC:
            return MITIGATION_LABELS[IID_SYNTHETIC]
        what = MITIGATION_LABELS[self.mitigation] if self.mitigation is not None else STRATEGY_LABELS[self.strategy]
        return f"{'pre-trained' if self.pretrain else 'baseline'} + {what}"


def build_arms(arms: list[str], strategies: list[str]) -> list[Arm]:
    """The arms to run, pre-trained ones first, FedAvg first (the first pre-trained arm pre-trains)."""
    for arm in arms:
        if arm not in ARM_CHOICES:
            raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARM_CHOICES)}")
    for strategy in strategies:
        if strategy not in STRATEGY_LABELS:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGY_LABELS)}")
    ordered = sorted(set(strategies), key=list(STRATEGY_LABELS).index)
    result = []
    if "pretrained" in arms:
        result += [Arm(True, s) for s in ordered]
    if "pretrained-only" in arms:
        result.append(Arm(True, "fedavg", local_epochs=0))
    result += [Arm(True, mitigation=m) for m in MITIGATION_LABELS if f"pretrained-{m}" in arms]
    if "baseline" in arms:
        result += [Arm(False, s) for s in ordered]
    if not result:
        raise ValueError("no arms to run")
    return result


@dataclass
class Cell:
    """One real run: a server with its client processes (or the centralised trainer)."""

    key: str  # "alpha-0.1/seed0/pretrained"
    kind: str  # "cvae" | "classifier" | "centralised"
    out: Path
    seed: int
    distribution: Distribution | None = None  # None for centralised
    arm: Arm | None = None
    args: list[str] = field(default_factory=list)  # kind-specific server / trainer options
    deps: list[str] = field(default_factory=list)
    rounds: int = 0
    privacy: PrivacyLevel | None = None  # on a privacy axis: the level of this CVAE / pre-trained cell
    group_out: Path | None = None  # the (distribution, seed) folder, when it is not out.parent

    @property
    def group(self) -> Path:
        """The (distribution, seed) folder: its shards are every cell's of the group."""
        return self.group_out if self.group_out is not None else self.out.parent


def group_dir(out: Path, dist: Distribution, seed: int) -> Path:
    return out / "runs" / dist.name / f"seed{seed}"


def plan_cells(out: Path, distributions: list[Distribution], seeds: list[int], arms: list[Arm], *,
               cvae_rounds: int, classifier_rounds: int, centralised: bool,
               privacy: list[PrivacyLevel] | None = None, dp_args: list[str] = (),
               finetune_args: list[str] = (), distill_args: list[str] = (),
               synthmix_args: list[str] = ()) -> list[Cell]:
    """Every cell of the sweep, one (distribution, seed) group after another.

    The scheduler starts the first cell (in this order) whose dependencies are done, so earlier
    groups start first and tend to finish first, while independent cells (a baseline next to its
    CVAE phase, the next group's CVAE phase) fill the free slots. ``privacy``: the levels of the
    privacy axis (None: no axis, one CVAE phase per group without DP); ``dp_args``: the DP-SGD
    options of their CVAE servers besides the target epsilon (clipping bound, delta, accountant);
    ``finetune_args``: the fine-tuning arm's --server-finetune-* options (default: FINETUNE_ARM_STEPS
    steps at the RunConfig's learning rate and batch size); ``distill_args``: the distillation arm's
    --server-distill-* options besides --server-distill (default: the RunConfig's)."""
    finetune_args = list(finetune_args) or argv_for(server_finetune_steps=FINETUNE_ARM_STEPS)
    mitigation_args = {"finetune": finetune_args, "distill": [*argv_for(server_distill=True), *distill_args],
                       "synthmix": list(synthmix_args) or argv_for(client_synthetic_mix=SYNTHMIX_ARM_RATIO)}
    cells: list[Cell] = []
    pretrained_arms = [a for a in arms if a.pretrain and a.mitigation != IID_SYNTHETIC]
    baseline_arms = [a for a in arms if not a.pretrain]
    iid_synthetic_arms = [a for a in arms if a.mitigation == IID_SYNTHETIC]
    if iid_synthetic_arms and privacy is not None:
        raise ValueError("the pretrained-iid-synthetic arm cannot be combined with a privacy axis (--epsilons)")
    for seed in seeds:
        seed_start = len(cells)
        for dist in distributions:
            group = group_dir(out, dist, seed)
            prefix = f"{dist.name}/seed{seed}"
            if privacy is None:
                cells += _cvae_and_pretrained_cells(group, group, prefix, dist, seed, pretrained_arms,
                                                    cvae_rounds, classifier_rounds, None, [], mitigation_args)
            else:
                for level in privacy:
                    cells += _cvae_and_pretrained_cells(group / level.name, group, f"{prefix}/{level.name}", dist,
                                                        seed, pretrained_arms, cvae_rounds, classifier_rounds, level,
                                                        list(dp_args), mitigation_args)
            for arm in baseline_arms:
                cells.append(Cell(f"{prefix}/{arm.name}", "classifier", group / arm.name, seed, dist, arm,
                                  rounds=classifier_rounds, args=_arm_args(arm) + argv_for(pretrain=False)))
            for arm in iid_synthetic_arms if dist.alpha is not None else ():  # at IID: the plain pre-trained arm
                cells.append(_iid_synthetic_cell(out, prefix, dist, seed, arm, classifier_rounds))
        iid_cvae = _iid_cvae_cell(out, seed, cvae_rounds)
        if iid_synthetic_arms and all(c.key != iid_cvae.key for c in cells[seed_start:]):
            cells.insert(seed_start, iid_cvae)  # the arm's generator, also when IID itself is not run
        if centralised:
            cells.append(Cell(f"centralised/seed{seed}", "centralised", out / "runs" / "centralised" / f"seed{seed}",
                              seed))
    return cells


def _arm_args(arm: Arm, mitigation_args: dict[str, list[str]] | None = None) -> list[str]:
    args = ["--phase", "classifier", *argv_for(strategy=arm.strategy)]
    if arm.local_epochs is not None:
        args += argv_for(local_epochs=arm.local_epochs)
    if arm.mitigation == "balanced":
        args += argv_for(local_loss="balanced")
    elif arm.mitigation in SYNTHETIC_MITIGATIONS:
        args += list((mitigation_args or {})[arm.mitigation])
    return args


def _cvae_and_pretrained_cells(folder: Path, group: Path, prefix: str, dist: Distribution, seed: int,
                               arms: list[Arm], cvae_rounds: int, classifier_rounds: int,
                               level: PrivacyLevel | None, dp_args: list[str],
                               mitigation_args: dict[str, list[str]]) -> list[Cell]:
    """One CVAE phase in ``folder`` and the pre-trained arms built on it (the first pre-trains)."""
    if not arms:
        return []
    group_out = None if folder == group else group
    cvae = Cell(f"{prefix}/cvae", "cvae", folder / "cvae", seed, dist, rounds=cvae_rounds,
                args=["--phase", "cvae", *(level.server_args(dp_args) if level else [])],  # --phase: the server's
                privacy=level, group_out=group_out)
    cells = [cvae]
    for arm in arms:
        cell = Cell(f"{prefix}/{arm.name}", "classifier", folder / arm.name, seed, dist, arm, rounds=classifier_rounds,
                    args=_arm_args(arm, mitigation_args), privacy=level, group_out=group_out)
        if len(cells) == 1:
            cell.deps.append(cvae.key)
            cell.args += ["--cvae-checkpoint", str(cvae.out / "cvae.pt")]
        else:
            cell.deps.append(cells[1].key)
            cell.args += ["--pretrained-checkpoint", str(cells[1].out / "pretrained_classifier.pt")]
            if arm.mitigation in SYNTHETIC_MITIGATIONS:  # the CVAE samples their synthetic set
                cell.deps.append(cvae.key)
                cell.args += ["--cvae-checkpoint", str(cvae.out / "cvae.pt")]
        cells.append(cell)
    return cells


def _iid_cvae_cell(out: Path, seed: int, cvae_rounds: int) -> Cell:
    """The IID federation's CVAE phase of ``seed`` (its group's own cvae cell when IID is run)."""
    iid = Distribution(None)
    return Cell(f"{iid.name}/seed{seed}/cvae", "cvae", group_dir(out, iid, seed) / "cvae", seed, iid,
                rounds=cvae_rounds, args=["--phase", "cvae"])


def _iid_synthetic_cell(out: Path, prefix: str, dist: Distribution, seed: int, arm: Arm,
                        classifier_rounds: int) -> Cell:
    """A classifier cell on this group's shards that samples, scores and pre-trains from the IID CVAE
    of the same seed (the poster's Figs 6-7) instead of its own federation's CVAE."""
    iid_cvae = _iid_cvae_cell(out, seed, 0)
    return Cell(f"{prefix}/{arm.name}", "classifier", group_dir(out, dist, seed) / arm.name, seed, dist, arm,
                rounds=classifier_rounds, args=_arm_args(arm) + ["--cvae-checkpoint", str(iid_cvae.out / "cvae.pt")],
                deps=[iid_cvae.key])
