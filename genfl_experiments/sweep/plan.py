"""What a sweep runs: distributions x seeds x arms, as cells with dependencies.

Per (distribution, seed) there is one partition (``shards/``) and:
- ``cvae``: the federated CVAE phase, run once and shared by every pre-trained arm;
- the first pre-trained arm samples, scores (CAS, federated CAS) and pre-trains from that CVAE;
  the other pre-trained arms start from its ``pretrained_classifier.pt``, so all of them start
  from the very same weights and differ only in what the arm changes;
- baseline arms start from the seeded random weights, on the same shards.
Per seed, a ``centralised`` cell trains a CVAE on all the data in one place (the CAS reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from genfl_server.strategy import strategy_labels
from genfl_shared.config import argv_for

STRATEGY_LABELS = strategy_labels()  # {name: label}, from the strategy registry
ARM_CHOICES = ("pretrained", "baseline", "pretrained-only")


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
class Arm:
    """One way of running the classifier phase."""

    pretrain: bool
    strategy: str = "fedavg"
    local_epochs: int | None = None  # None: the preset's

    @property
    def name(self) -> str:
        if self.local_epochs == 0:
            return "pretrained-only"
        base = "pretrained" if self.pretrain else "baseline"
        return base if self.strategy == "fedavg" else f"{base}-{self.strategy}"

    @property
    def label(self) -> str:
        if self.local_epochs == 0:
            return "pre-training only (no local training)"
        return f"{'pre-trained' if self.pretrain else 'baseline'} + {STRATEGY_LABELS[self.strategy]}"


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

    @property
    def group(self) -> Path:
        return self.out.parent


def group_dir(out: Path, dist: Distribution, seed: int) -> Path:
    return out / "runs" / dist.name / f"seed{seed}"


def plan_cells(out: Path, distributions: list[Distribution], seeds: list[int], arms: list[Arm], *,
               cvae_rounds: int, classifier_rounds: int, centralised: bool) -> list[Cell]:
    """Every cell of the sweep, one (distribution, seed) group after another.

    The scheduler starts the first cell (in this order) whose dependencies are done, so earlier
    groups start first and tend to finish first, while independent cells (a baseline next to its
    CVAE phase, the next group's CVAE phase) fill the free slots."""
    cells: list[Cell] = []
    pretrained_arms = [a for a in arms if a.pretrain]
    for seed in seeds:
        for dist in distributions:
            group = group_dir(out, dist, seed)
            prefix = f"{dist.name}/seed{seed}"
            primary = None
            if pretrained_arms:
                cells.append(Cell(f"{prefix}/cvae", "cvae", group / "cvae", seed, dist, rounds=cvae_rounds,
                                  args=["--phase", "cvae"]))  # the server's, not a run setting
            for arm in arms:
                cell = Cell(f"{prefix}/{arm.name}", "classifier", group / arm.name, seed, dist, arm,
                            rounds=classifier_rounds, args=["--phase", "classifier", *argv_for(strategy=arm.strategy)])
                if arm.local_epochs is not None:
                    cell.args += argv_for(local_epochs=arm.local_epochs)
                if not arm.pretrain:
                    cell.args += argv_for(pretrain=False)
                elif primary is None:
                    primary = cell
                    cell.deps.append(f"{prefix}/cvae")
                    cell.args += ["--cvae-checkpoint", str(group / "cvae" / "cvae.pt")]
                else:
                    cell.deps.append(primary.key)
                    cell.args += ["--pretrained-checkpoint", str(primary.out / "pretrained_classifier.pt")]
                cells.append(cell)
        if centralised:
            cells.append(Cell(f"centralised/seed{seed}", "centralised", out / "runs" / "centralised" / f"seed{seed}",
                              seed))
    return cells
