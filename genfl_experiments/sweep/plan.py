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
from typing import Any

from genfl_shared.config import RunConfig

from .arms import Arm

# The DP-SGD settings of the privacy axis' CVAE cells besides the target epsilon (--epsilons).
SWEEP_DP_FIELDS = ("dp_max_grad_norm", "dp_delta", "dp_accountant")


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

    def settings(self, sweep: RunConfig) -> dict[str, Any]:
        """The CVAE server's settings at this level: the target epsilon and the sweep's (``sweep``)
        other DP-SGD settings; none without DP."""
        if math.isinf(self.epsilon):
            return {}
        dp = {name: sweep.setting(name) for name in SWEEP_DP_FIELDS if sweep.setting(name) is not None}
        return {"dp_target_epsilon": self.epsilon, **dp}


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


@dataclass
class Cell:
    """One real run: a server with its client processes (or the centralised trainer).

    It holds what the run is, not how a process is told: the run settings it sets besides the
    sweep's own and the checkpoints it starts from; genfl_experiments.sweep.run spells them as
    command-line options where it starts the server."""

    key: str  # "alpha-0.1/seed0/pretrained"
    kind: str  # "cvae" | "classifier" | "centralised"; a federated cell's server runs this phase
    out: Path
    seed: int
    distribution: Distribution | None = None  # None for centralised
    arm: Arm | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # RunConfig field -> value, in the order given
    pretrained_checkpoint: Path | None = None  # the classifier it starts from, pre-trained by another cell
    cvae_checkpoint: Path | None = None  # the CVAE it samples its synthetic data from
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
               sweep: RunConfig, centralised: bool, privacy: list[PrivacyLevel] | None = None) -> list[Cell]:
    """Every cell of the sweep, one (distribution, seed) group after another.

    The scheduler starts the first cell (in this order) whose dependencies are done, so earlier
    groups start first and tend to finish first, while independent cells (a baseline next to its
    CVAE phase, the next group's CVAE phase) fill the free slots. ``sweep``: the sweep's settings
    (rounds of each phase, the DP-SGD settings of the privacy axis, the options of the arms that
    take the sweep's); ``privacy``: the levels of the privacy axis (None: no axis, one CVAE phase
    per group without DP)."""
    cells: list[Cell] = []
    pretrained_arms = [a for a in arms if a.pretrain and not a.spec.iid_generator]
    baseline_arms = [a for a in arms if not a.pretrain]
    iid_synthetic_arms = [a for a in arms if a.spec.iid_generator]
    if iid_synthetic_arms and privacy is not None:
        names = ", ".join(a.name for a in iid_synthetic_arms)
        raise ValueError(f"the {names} arm cannot be combined with a privacy axis (--epsilons)")
    for seed in seeds:
        seed_start = len(cells)
        for dist in distributions:
            group = group_dir(out, dist, seed)
            prefix = f"{dist.name}/seed{seed}"
            for level in [None] if privacy is None else privacy:
                folder, key_prefix = (group, prefix) if level is None else (group / level.name,
                                                                           f"{prefix}/{level.name}")
                cells += _cvae_and_pretrained_cells(folder, group, key_prefix, dist, seed, pretrained_arms, sweep,
                                                    level)
            for arm in baseline_arms:
                cells.append(Cell(f"{prefix}/{arm.name}", "classifier", group / arm.name, seed, dist, arm,
                                  arm.settings(sweep), rounds=sweep.training.classifier_rounds))
            for arm in iid_synthetic_arms if dist.alpha is not None else ():  # at IID: the plain pre-trained arm
                cells.append(_iid_synthetic_cell(out, prefix, dist, seed, arm, sweep))
        iid_cvae = _iid_cvae_cell(out, seed, sweep.training.cvae_rounds)
        if iid_synthetic_arms and all(c.key != iid_cvae.key for c in cells[seed_start:]):
            cells.insert(seed_start, iid_cvae)  # the arm's generator, also when IID itself is not run
        if centralised:
            cells.append(Cell(f"centralised/seed{seed}", "centralised", out / "runs" / "centralised" / f"seed{seed}",
                              seed))
    return cells


def _cvae_and_pretrained_cells(folder: Path, group: Path, prefix: str, dist: Distribution, seed: int,
                               arms: list[Arm], sweep: RunConfig, level: PrivacyLevel | None) -> list[Cell]:
    """One CVAE phase in ``folder`` and the pre-trained arms built on it (the first pre-trains)."""
    if not arms:
        return []
    group_out = None if folder == group else group
    cvae = Cell(f"{prefix}/cvae", "cvae", folder / "cvae", seed, dist, rounds=sweep.training.cvae_rounds,
                settings=level.settings(sweep) if level else {}, privacy=level, group_out=group_out)
    cvae_checkpoint = cvae.out / "cvae.pt"
    cells = [cvae]
    for arm in arms:
        cell = Cell(f"{prefix}/{arm.name}", "classifier", folder / arm.name, seed, dist, arm, arm.settings(sweep),
                    rounds=sweep.training.classifier_rounds, privacy=level, group_out=group_out)
        if len(cells) == 1:
            cell.deps.append(cvae.key)
            cell.cvae_checkpoint = cvae_checkpoint
        else:
            cell.deps.append(cells[1].key)
            cell.pretrained_checkpoint = cells[1].out / "pretrained_classifier.pt"
            if arm.spec.samples_synthetic:  # the CVAE samples their synthetic set
                cell.deps.append(cvae.key)
                cell.cvae_checkpoint = cvae_checkpoint
        cells.append(cell)
    return cells


def _iid_cvae_cell(out: Path, seed: int, cvae_rounds: int) -> Cell:
    """The IID federation's CVAE phase of ``seed`` (its group's own cvae cell when IID is run)."""
    iid = Distribution(None)
    return Cell(f"{iid.name}/seed{seed}/cvae", "cvae", group_dir(out, iid, seed) / "cvae", seed, iid,
                rounds=cvae_rounds)


def _iid_synthetic_cell(out: Path, prefix: str, dist: Distribution, seed: int, arm: Arm, sweep: RunConfig) -> Cell:
    """A classifier cell on this group's shards that samples, scores and pre-trains from the IID CVAE
    of the same seed (the poster's Figs 6-7) instead of its own federation's CVAE."""
    iid_cvae = _iid_cvae_cell(out, seed, 0)
    return Cell(f"{prefix}/{arm.name}", "classifier", group_dir(out, dist, seed) / arm.name, seed, dist, arm,
                arm.settings(sweep), cvae_checkpoint=iid_cvae.out / "cvae.pt", rounds=sweep.training.classifier_rounds,
                deps=[iid_cvae.key])
