"""A sweep's results, read back from its finished cells: ``results.csv``, ``table.md``, ``cas.md`` and,
with a privacy axis, ``privacy.md``. table.md and cas.md cover the runs without DP-SGD (on a
privacy axis, its ε = ∞ level); privacy.md sets every level against each other.

Everything here is computed from what is on disk (``runs/**/cell.json`` and each run's
``summary.json``), so the reports always cover every finished cell of the folder, including
arms or seeds run by an earlier invocation, and can be regenerated with ``--report-only``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from genfl_shared.runfiles import read_json

from .poster import POSTER, POSTER_ROUND, POSTER_RUNS
from .sweep.arms import MITIGATIONS, STRATEGY_LABELS
from .sweep.plan import Distribution
from .sweep.run import CELL_MARKER

log = logging.getLogger("genfl_sweep")

CSV_FIELDS = ["dataset", "preset", "distribution", "alpha", "seed", "arm", "pretrain", "strategy",
              "local_epochs", "phase", "round", "weighted_client_accuracy", "weighted_client_loss",
              "test_accuracy", "test_loss", "train_loss", "clients", "seconds", "epsilon"]


@dataclass
class CellResult:
    key: str
    kind: str  # cvae | classifier | centralised
    seed: int
    distribution: str | None  # Distribution.name
    alpha: float | str | None
    arm: dict | None
    seconds: float
    summary: dict
    out: Path
    epsilon: float | str | None = None  # the privacy axis' level (PrivacyLevel.marker); None: no axis

    @property
    def private(self) -> bool:
        """Built on a CVAE trained with DP-SGD (a finite level of the privacy axis)."""
        return self.epsilon not in (None, "inf")

    @property
    def arm_name(self) -> str:
        return self.arm["name"] if self.arm else self.kind

    def final(self, key: str) -> float | None:
        return (self.summary.get("final") or {}).get(key)


def load_results(out: Path) -> list[CellResult]:
    """Every finished cell whose inputs are still current (a cell built from a CVAE or pre-trained
    model that has since been re-run is out of date, and left out with a warning)."""
    results = []
    for marker in sorted((out / "runs").glob(f"**/{CELL_MARKER}")):
        cell = json.loads(marker.read_text())
        stale = [key for key, dep in (cell.get("inputs") or {}).items()
                 if (read_json(marker.parent / dep["path"] / CELL_MARKER) or {}).get("run_id") != dep["run_id"]]
        if stale:
            log.warning("leaving out %s: built from an earlier run of %s", cell["key"], ", ".join(stale))
            continue
        summary = json.loads((marker.parent / "summary.json").read_text())
        results.append(CellResult(cell["key"], cell["kind"], cell["seed"], cell["distribution"], cell["alpha"],
                                  cell["arm"], cell["seconds"], summary, marker.parent, cell.get("epsilon")))
    return results


def distribution_order(name: str) -> tuple[int, float]:
    """Poster order: IID, then alpha from large (mild skew) to small (extreme skew)."""
    alpha = Distribution.from_name(name).alpha
    return (0, 0.0) if alpha is None else (1, -alpha)


def distribution_label(name: str) -> str:
    return Distribution.from_name(name).label


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        raise ValueError("no values")
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def fmt_pct(values: list[float | None]) -> str:
    """'93.92 ± 0.28' in percent (mean ± sample std); '-' without values; no ± for one value."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std, _ = mean_std([100 * v for v in values])
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


# -- results.csv ------------------------------------------------------------------------------


def write_results_csv(results: list[CellResult], path: Path, *, dataset: str, preset: str) -> int:
    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in sorted((r for r in results if r.kind != "centralised"),
                        key=lambda r: (distribution_order(r.distribution), r.seed, epsilon_order(r.epsilon),
                                       r.kind != "cvae", r.arm_name)):
            arm = r.arm or {}
            for rnd in r.summary["rounds"]:
                writer.writerow({
                    "dataset": dataset, "preset": preset, "distribution": r.distribution, "alpha": r.alpha,
                    "seed": r.seed, "arm": r.arm_name, "pretrain": arm.get("pretrain", ""),
                    "strategy": arm.get("strategy", "fedavg"),
                    "local_epochs": arm.get("local_epochs") if arm.get("local_epochs") is not None
                    else r.summary.get("config", {}).get("local_epochs", ""),
                    "phase": rnd["phase"], "round": rnd["round"],
                    **{k: rnd.get(k) for k in ("weighted_client_accuracy", "weighted_client_loss",
                                               "test_accuracy", "test_loss", "train_loss", "clients",
                                               "seconds")},
                    "epsilon": "" if r.epsilon is None else r.epsilon,
                })
                rows += 1
    return rows


# -- table.md ---------------------------------------------------------------------------------


def _by(results: list[CellResult], kind: str) -> dict[str, dict[str, list[CellResult]]]:
    """{distribution: {arm name: [results over seeds]}}"""
    grouped: dict[str, dict[str, list[CellResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.kind == kind:
            grouped[r.distribution][r.arm_name].append(r)
    return grouped


def _last_round(results: list[CellResult]) -> int | None:
    rounds = {r.final("round") for r in results if r.summary.get("final")}
    return rounds.pop() if len(rounds) == 1 else None


def _accs(runs: list[CellResult], key: str = "weighted_client_accuracy") -> list[float | None]:
    return [r.final(key) for r in sorted(runs, key=lambda r: r.seed)]


def _seeds(runs: list[CellResult]) -> str:
    return ",".join(str(s) for s in sorted({r.seed for r in runs}))


def write_table(results: list[CellResult], path: Path, *, dataset: str, preset: str,
                differences: list[str]) -> None:
    classifier = [r for r in results if r.kind == "classifier"]
    grouped = _by(results, "classifier")
    dists = sorted(grouped, key=distribution_order)
    last = _last_round(classifier)
    poster = POSTER.get(dataset, {})
    lines = [
        f"# GenFL sweep: {dataset.upper()}, preset `{preset}`",
        "",
        f"Weighted client accuracy (%) after the last classifier round (round {last or 'varies'}), "
        "mean ± sample std over seeds (n = number of seeds), pre-trained on synthetic data vs the "
        "baseline from random weights, FedAvg; the poster's numbers beside ours "
        f"(round {POSTER_ROUND}, {POSTER_RUNS} runs). Δ: pre-trained minus baseline per seed (both arms of a "
        "seed share its shards), over the seeds both arms finished; n: seeds (pre-trained / baseline where "
        "they differ).",
        "",
        "| Distribution | Pre-trained | Baseline | Δ (pp) | Poster pre-trained | Poster baseline "
        "| Pre-trained, real test set | Baseline, real test set | n | Seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dist in dists:
        arms = grouped[dist]
        pre, base = arms.get("pretrained", []), arms.get("baseline", [])
        delta = "–"
        paired = _paired_delta(pre, base)
        if paired:
            delta = fmt_pct(paired)
        ref = poster.get(dist)
        ref_pre = f"{ref[0][0]:.2f} ± {ref[0][1]:.2f}" if ref else "–"
        ref_base = f"{ref[1][0]:.2f} ± {ref[1][1]:.2f}" if ref else "–"
        n = str(len(pre)) if len(pre) == len(base) else f"{len(pre)} / {len(base)}"
        lines.append(f"| {distribution_label(dist)} | {fmt_pct(_accs(pre))} | {fmt_pct(_accs(base))} | {delta} "
                     f"| {ref_pre} | {ref_base} | {fmt_pct(_accs(pre, 'test_accuracy'))} "
                     f"| {fmt_pct(_accs(base, 'test_accuracy'))} | {n} | {_seeds(pre + base)} |")
    lines += ["", *EVALUATION_NOTE, ""]
    if differences:
        lines += [f"This sweep's settings differ from the poster's configuration ({'; '.join(differences)}; "
                  "see README.md, \"Presets\"): compare its numbers with the poster's with that in mind.", ""]

    other_arms = sorted({a for d in grouped.values() for a in d} - {"pretrained", "baseline"})
    if other_arms:
        lines += _mitigation_section(grouped, dists)
    lines += _timing_section(results)
    path.write_text("\n".join(lines) + "\n")


EVALUATION_NOTE = [
    "**How this evaluation differs from the poster's.** \"Weighted client accuracy\" is each client's "
    "accuracy on its own held-out 10 % of its shard, weighted by the size of that held-out set; "
    "GenFL holds that data out before training, so no client is ever scored on an image it trained on. "
    "The poster's clients were scored on data that overlapped 8/9 of their training data, which "
    "inflates its accuracies (most for skewed splits, where a client memorises its few classes). "
    "The \"real test set\" columns score the same global model on the dataset's official 10,000-image "
    "test split, which no client holds: the accuracy a user of the final model would see.",
]


def _paired_delta(pre: list[CellResult], base: list[CellResult]) -> list[float]:
    """Pre-trained minus baseline, per seed (both arms of a seed share the shards)."""
    base_by_seed = {r.seed: r.final("weighted_client_accuracy") for r in base}
    return [r.final("weighted_client_accuracy") - base_by_seed[r.seed] for r in pre
            if base_by_seed.get(r.seed) is not None and r.final("weighted_client_accuracy") is not None]


def arm_order(name: str) -> tuple:
    """Sort key of arm names: pre-trained before baseline, pre-training only after the pre-trained
    strategies, strategies in STRATEGY_LABELS' order, then the mitigations (the order build_arms() runs them)."""
    pretrain = not name.startswith("baseline")
    suffix = name.split("-", 1)[1] if "-" in name and name != "pretrained-only" else "fedavg"
    mitigations = list(MITIGATIONS)  # after the strategies and pre-training only, as build_arms() runs them
    return (not pretrain, suffix in mitigations, name == "pretrained-only",
            list(STRATEGY_LABELS).index(suffix) if suffix in STRATEGY_LABELS else
            mitigations.index(suffix) if suffix in mitigations else 99, name)


def _mitigation_section(grouped, dists) -> list[str]:
    arms = sorted({a for d in grouped.values() for a in d}, key=arm_order)
    labels = {}
    for d in grouped.values():
        for name, runs in d.items():
            labels[name] = runs[0].arm["label"]
    lines = [
        "## Imbalance mitigation",
        "",
        "Weighted client accuracy (%) after the last round, mean ± std (real test set accuracy in brackets) "
        "for each way of running the classifier phase. FedProx adds the proximal term μ/2·‖w − w_global‖² "
        "to every client's loss; FedAvgM applies the averaged update through server momentum; "
        "\"pre-training only\" broadcasts the pre-trained model and lets the clients only evaluate it "
        "(local epochs 0); balanced softmax trains every client on cross-entropy of the logits plus the log of "
        "its own label prior (--local-loss balanced); server fine-tuning takes class-balanced SGD steps of "
        "each aggregate on the synthetic set before it is broadcast (--server-finetune-steps); server distillation "
        "trains each aggregate on the synthetic inputs towards the mean logits of the round's accepted client "
        "models (FedDF, --server-distill); synthetic images of missing classes sends each client synthetic images of "
        "the classes its reported label counts lack, mixed into its local training (--client-synthetic-mix). Every "
        "pre-trained arm starts from the same pre-trained weights, every baseline arm from the same random "
        "weights, on the same shards.",
        "",
        "| Distribution | " + " | ".join(labels[a] for a in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for dist in dists:
        cells = []
        for a in arms:
            runs = grouped[dist].get(a, [])
            cells.append(f"{fmt_pct(_accs(runs))} ({fmt_pct(_accs(runs, 'test_accuracy'))}), n={len(runs)}"
                         if runs else "–")
        lines.append(f"| {distribution_label(dist)} | " + " | ".join(cells) + " |")
    lines += _paired_delta_table(grouped, dists, arms, labels)
    lines += ["", "**Which helps** (by mean weighted client accuracy; with few seeds a difference smaller "
              "than the std is not a finding):", ""]
    for dist in dists:
        verdicts = _verdicts(grouped[dist], labels)
        if verdicts:
            lines.append(f"- {distribution_label(dist)}: {verdicts}")
    return lines + [""]


def _paired_delta_table(grouped, dists, arms: list[str], labels: dict[str, str]) -> list[str]:
    """Each arm minus the plain arm of its start (pre-trained + FedAvg, or baseline + FedAvg), per
    seed: both ran on the same shards (and, pre-trained, from the same weights), so the seed's own
    luck cancels out of the difference."""
    others = [a for a in arms if a not in ("pretrained", "baseline")]
    if not others:
        return []
    lines = ["", "Paired Δ (pp) against the plain arm of the same start (pre-trained arms minus "
             "pre-trained + FedAvg, baseline arms minus baseline + FedAvg), per seed, mean ± std over the seeds "
             "both finished (n):", "",
             "| Distribution | " + " | ".join(labels[a] for a in others) + " |", "|---|" + "---|" * len(others)]
    for dist in dists:
        cells = []
        for a in others:
            reference = grouped[dist].get("baseline" if a.startswith("baseline") else "pretrained", [])
            paired = _paired_delta(grouped[dist].get(a, []), reference)
            cells.append(f"{_signed_pct(paired)}, n={len(paired)}" if paired else "–")
        lines.append(f"| {distribution_label(dist)} | " + " | ".join(cells) + " |")
    return lines


def _signed_pct(values: list[float]) -> str:
    mean, std, _ = mean_std(values)
    return f"{100 * mean:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _verdicts(arms: dict[str, list[CellResult]], labels: dict[str, str]) -> str:
    means = {a: mean_std([v for v in _accs(runs) if v is not None]) for a, runs in arms.items()
             if any(v is not None for v in _accs(runs))}
    if len(means) < 2:
        return ""
    best = max(means, key=lambda a: means[a][0])
    parts = [f"best is **{labels[best]}** ({100 * means[best][0]:.2f} %)"]
    for reference in ("pretrained", "baseline"):
        family = [a for a in means if (a.startswith("baseline")) == (reference == "baseline")
                  and a != reference]
        if reference not in means:
            continue
        for a in sorted(family, key=arm_order):
            diff = 100 * (means[a][0] - means[reference][0])
            pooled = [s for s in (means[a][1], means[reference][1]) if s is not None]
            noise = f", std {100 * max(pooled):.2f}" if pooled else ", n=1"
            parts.append(f"{labels[a]} vs {labels[reference]}: {diff:+.2f} pp{noise}")
    return "; ".join(parts)


def _timing_section(results: list[CellResult]) -> list[str]:
    rows = defaultdict(list)
    round_secs = defaultdict(list)
    for r in results:
        rows[r.kind if r.kind != "classifier" else f"classifier ({r.arm_name})"].append(r.seconds)
        for rnd in r.summary.get("rounds", []):
            round_secs[rnd["phase"]].append(rnd["seconds"])
    devices = sorted({str(r.summary.get("device_name") or r.summary.get("device")) for r in results})
    lines = ["## Wall time", "", f"Device: {', '.join(devices)}.", "",
             "| Cell | Runs | Median wall s | Total wall s |", "|---|---|---|---|"]
    for name in sorted(rows):
        lines.append(f"| {name} | {len(rows[name])} | {statistics.median(rows[name]):.1f} | {sum(rows[name]):.0f} |")
    lines += ["", "| Phase | Rounds | Median s per round |", "|---|---|---|"]
    for phase in sorted(round_secs):
        lines.append(f"| {phase} | {len(round_secs[phase])} | {statistics.median(round_secs[phase]):.2f} |")
    return lines + [""]


# -- cas.md -----------------------------------------------------------------------------------


def write_cas(results: list[CellResult], path: Path, *, dataset: str, preset: str) -> None:
    by_dist = defaultdict(list)
    from_iid_cvae = []  # the pretrained-iid-synthetic cells score the IID federation's CVAE, not their own
    for r in results:
        if r.kind == "classifier" and r.summary.get("cas") is not None:
            (from_iid_cvae if r.arm_name.endswith("iid-synthetic") else by_dist[r.distribution]).append(r)
    centralised = [r for r in results if r.kind == "centralised"]
    lines = [
        f"# Classification Accuracy Score: {dataset.upper()}, preset `{preset}`",
        "",
        "CAS: accuracy on the real test set of an ExquisiteNetV1 trained only on synthetic images "
        "sampled from the global CVAE (mean ± sample std over seeds, %). Federated CAS: the same "
        "classifier scored on the clients' held-out data (weighted by held-out size). The centralised "
        "row trains one CVAE in one place on as many images as the clients train on together, for as "
        "many passes as each client makes in the federated CVAE phase: the gap to it is what federation "
        "and label skew cost the generator.",
        "",
        "| Distribution | CAS | Federated CAS | n | Seeds |",
        "|---|---|---|---|---|",
    ]
    for dist in sorted(by_dist, key=distribution_order):
        runs = by_dist[dist]
        lines.append(f"| {distribution_label(dist)} | {fmt_pct([r.summary['cas'] for r in runs])} "
                     f"| {fmt_pct([r.summary.get('cas_federated') for r in runs])} | {len(runs)} | {_seeds(runs)} |")
    if from_iid_cvae:
        # Federated CAS here is on the skewed federation's held-out data that the arm trains on.
        for dist in sorted({r.distribution for r in from_iid_cvae}, key=distribution_order):
            runs = [r for r in from_iid_cvae if r.distribution == dist]
            lines.append(f"| IID CVAE, scored in the {distribution_label(dist)} federation (pretrained-iid-synthetic) "
                         f"| {fmt_pct([r.summary['cas'] for r in runs])} "
                         f"| {fmt_pct([r.summary.get('cas_federated') for r in runs])} | {len(runs)} | {_seeds(runs)} |")
    if centralised:
        lines.append(f"| Centralised CVAE (all data) | {fmt_pct([r.summary['cas'] for r in centralised])} | – "
                     f"| {len(centralised)} | {_seeds(centralised)} |")
    if not by_dist:
        lines += ["", "No CAS in this sweep's federated runs (it ran with `--cas-epochs 0`)."]
    path.write_text("\n".join(lines) + "\n")


def write_reports(out: Path, *, dataset: str, preset: str, differences: list[str]) -> list[CellResult]:
    results = load_results(out)
    write_results_csv(results, out / "results.csv", dataset=dataset, preset=preset)
    without_dp = [r for r in results if not r.private]
    write_table(without_dp, out / "table.md", dataset=dataset, preset=preset, differences=differences)
    write_cas(without_dp, out / "cas.md", dataset=dataset, preset=preset)
    if any(r.epsilon is not None for r in results):
        write_privacy(results, out / "privacy.md", dataset=dataset, preset=preset)
    return results


# -- privacy.md -------------------------------------------------------------------------------


def epsilon_order(epsilon: float | str | None) -> float:
    """Sort key of privacy levels: strongest privacy (smallest ε) first, no DP last."""
    return math.inf if epsilon in (None, "inf") else float(epsilon)


def epsilon_label(epsilon: float | str) -> str:
    return "∞ (no DP)" if epsilon == "inf" else f"{float(epsilon):g}"


def privacy_levels(results: list[CellResult]) -> dict[str, dict[float | str, dict[str, list]]]:
    """{distribution: {level: {"cvae": [cvae cells], "pretrained": [first pre-trained arm's cells]}}}
    over the privacy axis' cells."""
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        if r.epsilon is None:
            continue
        if r.kind == "cvae":
            grouped[r.distribution][r.epsilon]["cvae"].append(r)
        elif r.kind == "classifier" and r.arm_name == "pretrained":
            grouped[r.distribution][r.epsilon]["pretrained"].append(r)
    return grouped


def spent_epsilon(cvae: CellResult) -> float | None:
    """The run's guarantee ε (max over clients) that the CVAE phase recorded; None without DP."""
    return (cvae.summary.get("dp") or {}).get("epsilon")


def write_privacy(results: list[CellResult], path: Path, *, dataset: str, preset: str) -> None:
    grouped = privacy_levels(results)
    baselines = defaultdict(list)
    for r in results:
        if r.kind == "classifier" and r.arm_name == "baseline":
            baselines[r.distribution].append(r)
    deltas = sorted({(r.summary.get("dp") or {}).get("delta") for d in grouped.values() for lv in d.values()
                     for r in lv["cvae"]} - {None})
    lines = [
        f"# Privacy and utility: {dataset.upper()}, preset `{preset}`",
        "",
        "DP-SGD in the federated CVAE phase (README.md, \"Differential privacy\"): each client's noise "
        "multiplier calibrated so that its ε after the CVAE rounds is at most the target, at "
        f"δ = {', '.join(f'{d:g}' for d in deltas) or '–'}; sample-level DP of each client's records. "
        "ε spent: the run's guarantee (max over clients) the server recorded, mean over seeds. CAS and "
        "federated CAS score the synthetic data of that CVAE; the pre-trained arm is the classifier "
        "phase (FedAvg, without DP) from the model pre-trained on it: weighted client accuracy after the "
        "last round. Mean ± sample std over seeds (%); the baseline (random start, no CVAE, so no ε) "
        "is the row every level is measured against.",
        "",
        "| Distribution | Target ε | ε spent | CAS | Federated CAS | Pre-trained, client acc | "
        "Pre-trained, real test set | n | Seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dist in sorted(grouped, key=distribution_order):
        for level in sorted(grouped[dist], key=epsilon_order):
            runs = grouped[dist][level]
            pre = runs["pretrained"]
            spent = [e for e in (spent_epsilon(c) for c in runs["cvae"]) if e is not None]
            spent_text = f"{statistics.fmean(spent):.3f}" if spent else "–"
            lines.append(f"| {distribution_label(dist)} | {epsilon_label(level)} | {spent_text} "
                         f"| {fmt_pct([r.summary.get('cas') for r in pre])} "
                         f"| {fmt_pct([r.summary.get('cas_federated') for r in pre])} | {fmt_pct(_accs(pre))} "
                         f"| {fmt_pct(_accs(pre, 'test_accuracy'))} | {len(pre)} | {_seeds(pre)} |")
        base = baselines.get(dist, [])
        if base:
            lines.append(f"| {distribution_label(dist)} | baseline (no CVAE) | – | – | – | {fmt_pct(_accs(base))} "
                         f"| {fmt_pct(_accs(base, 'test_accuracy'))} | {len(base)} | {_seeds(base)} |")
    if not grouped:
        lines += ["", "No finished cells on the privacy axis yet."]
    else:
        lines += ["", "## Wall time of the CVAE phase", "",
                  "DP-SGD clips every sample's gradient (its norm, then a second backward pass): its CVAE rounds "
                  "cost more than those without DP (the classifier phase is the same at every level).", "",
                  "| Target ε | CVAE cells | Median wall s per cell | Median s per CVAE round |", "|---|---|---|---|"]
        by_level = defaultdict(list)
        for levels in grouped.values():
            for level, runs in levels.items():
                by_level[level] += runs["cvae"]
        for level in sorted(by_level, key=epsilon_order):
            cells = by_level[level]
            rounds = [x["seconds"] for c in cells for x in c.summary.get("rounds", [])]
            if cells:
                lines.append(f"| {epsilon_label(level)} | {len(cells)} | {statistics.median(c.seconds for c in cells):.1f} "
                             f"| {statistics.median(rounds) if rounds else math.nan:.2f} |")
    path.write_text("\n".join(lines) + "\n")
