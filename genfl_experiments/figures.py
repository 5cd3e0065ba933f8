"""A sweep's figures (PNG, matplotlib), from the same finished cells as the tables.

- ``accuracy_per_round.png``: weighted client accuracy per classifier round, mean ± std band over
  seeds, pre-trained vs baseline, one panel per distribution (the poster's Figs 2-5); with more arms
  than those two, ``mitigation_per_round.png`` shows all of them the same way.
- ``cas_vs_alpha.png``: CAS and federated CAS against the Dirichlet alpha, IID at the right, the
  centralised CVAE's CAS as a band.
- ``class_distribution.png``: clients x classes training-image counts, one panel per distribution.
- ``synthetic_samples.png``: the server's grid of synthetic samples (one row per class), per distribution.
- ``privacy_utility.png`` (with a privacy axis): CAS, federated CAS and the pre-trained arm's weighted
  client accuracy against ε, mean ± std over seeds, one panel per distribution, no DP at the right,
  the baseline as a dashed line.

Every figure but the last covers the runs without DP-SGD only.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from genfl_shared.partition import PARTITION_JSON  # noqa: E402

from .reports import (CellResult, arm_order, distribution_label, distribution_order, epsilon_label,  # noqa: E402
                      epsilon_order, privacy_levels)
from .sweep.plan import Distribution  # noqa: E402

MAIN_ARMS = {"pretrained": ("pre-trained", "tab:blue"), "baseline": ("baseline", "tab:orange")}


def _panels(n: int, *, width: float = 3.6, height: float = 3.0, min_width: float = 0.0, extra_height: float = 0.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, min_width), height * rows + extra_height),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves(runs: list[CellResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rounds, mean %, std %) of weighted client accuracy over the runs' common rounds."""
    series = []
    for r in runs:
        acc = {x["round"]: x["weighted_client_accuracy"] for x in r.summary["rounds"]
               if x["phase"] == "classifier" and x["weighted_client_accuracy"] is not None}
        series.append(acc)
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return None
    values = np.array([[100 * s[k] for k in common] for s in series])
    std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(common))
    return np.array(common), values.mean(axis=0), std


def plot_accuracy_per_round(results: list[CellResult], path: Path, arms: dict[str, tuple[str, str]],
                            title: str) -> Path | None:
    grouped: dict[str, dict[str, list[CellResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.kind == "classifier" and r.arm_name in arms:
            grouped[r.distribution][r.arm_name].append(r)
    if not grouped:
        return None
    dists = sorted(grouped, key=distribution_order)
    # Many arms: one legend under the panels (inside a panel it would hide the curves), the seeds
    # per arm in each panel's title.
    shared = len(arms) > 3
    legend_rows = math.ceil(len(arms) / 2) if shared else 0
    fig, axes = _panels(len(dists), min_width=9.0 if shared else 0.0, extra_height=0.25 * legend_rows)
    for ax, dist in zip(axes, dists):
        seeds = set()
        for name, (label, color) in arms.items():
            curve = _curves(grouped[dist].get(name, []))
            if curve is None:
                continue
            rounds, mean, std = curve
            n = len(grouped[dist][name])
            seeds.add(n)
            ax.plot(rounds, mean, marker="o", ms=3, color=color, label=label if shared else f"{label} (n={n})")
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        n_text = f"n = {min(seeds)}" if len(seeds) == 1 else f"n = {min(seeds)}-{max(seeds)}"
        ax.set_title(f"{distribution_label(dist)} ({n_text})" if shared and seeds else distribution_label(dist))
        ax.set_xlabel("classifier round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("weighted client accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if not shared:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    if not shared:
        return _save(fig, path)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=8, frameon=False)
    return _save(fig, path, rect=(0, 0.25 * legend_rows / fig.get_figheight() + 0.02, 1, 1))


def _mitigation_arms(results: list[CellResult]) -> dict[str, tuple[str, str]]:
    names = {r.arm_name: r.arm["label"] for r in results if r.kind == "classifier"}
    if not set(names) - set(MAIN_ARMS):
        return {}
    colors = plt.get_cmap("tab10").colors
    ordered = sorted(names, key=arm_order)
    return {a: (names[a], colors[i % len(colors)]) for i, a in enumerate(ordered)}


def plot_cas_vs_alpha(results: list[CellResult], path: Path) -> Path | None:
    by_dist = defaultdict(list)
    for r in results:  # the pretrained-iid-synthetic cells score the IID CVAE, not their own federation's
        if r.kind == "classifier" and r.summary.get("cas") is not None and not r.arm_name.endswith("iid-synthetic"):
            by_dist[r.distribution].append(r.summary)
    if not by_dist:
        return None
    dists = sorted(by_dist, key=distribution_order, reverse=True)  # smallest alpha left, IID right
    alphas = [Distribution.from_name(d).alpha for d in dists if d != "iid"]
    # IID sits one decade right of the largest alpha, on the same log axis.
    iid_x = 10 * max(alphas) if alphas else 1.0
    xs = [iid_x if d == "iid" else Distribution.from_name(d).alpha for d in dists]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, color in (("cas", "CAS (real test set)", "tab:blue"),
                              ("cas_federated", "federated CAS (clients' held-out)", "tab:green")):
        values = [[100 * s[key] for s in by_dist[d] if s.get(key) is not None] for d in dists]
        mean = [np.mean(v) for v in values]
        std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=color, label=label)
    central = [100 * r.summary["cas"] for r in results if r.kind == "centralised"]
    if central:
        m, s = float(np.mean(central)), float(np.std(central, ddof=1)) if len(central) > 1 else 0.0
        ax.axhline(m, color="gray", linestyle="--", label=f"centralised CVAE (n={len(central)})")
        ax.axhspan(m - s, m + s, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(xs, [distribution_label(d) for d in dists])
    ax.minorticks_off()
    ax.set_xlabel("label distribution (Dirichlet α; smaller is more skewed)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _first_seed_groups(out: Path) -> dict[str, Path]:
    """{distribution: the lowest seed's group folder} among the groups that have a partition."""
    groups = {}
    for info in sorted((out / "runs").glob(f"*/seed*/shards/{PARTITION_JSON}"),
                       key=lambda p: int(p.parent.parent.name.removeprefix("seed"))):
        groups.setdefault(info.parent.parent.parent.name, info.parent.parent)
    return groups


def plot_class_distribution(out: Path, path: Path) -> Path | None:
    groups = _first_seed_groups(out)
    if not groups:
        return None
    dists = sorted(groups, key=distribution_order)
    fig, axes = _panels(len(dists), width=3.8, height=3.4)
    for ax, dist in zip(axes, dists):
        info = json.loads((groups[dist] / "shards" / PARTITION_JSON).read_text())
        counts = np.array([c["train_class_counts"] for c in info["clients"]])
        image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{distribution_label(dist)} (seed {info['seed']})")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        ax.set_xticks(range(counts.shape[1]))
        ax.set_yticks(range(counts.shape[0]))
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="training images")
    return _save(fig, path)


def plot_synthetic_samples(results: list[CellResult], path: Path) -> Path | None:
    grids = {}
    for r in sorted(results, key=lambda r: r.seed):
        grid = r.out / "synthetic_samples.png"
        name = "centralised" if r.kind == "centralised" else r.distribution
        if grid.exists() and name not in grids:
            grids[name] = (grid, r.seed)
    if not grids:
        return None
    names = sorted((n for n in grids if n != "centralised"), key=distribution_order)
    names += ["centralised"] if "centralised" in grids else []
    fig, axes = _panels(len(names), width=3.2, height=3.4)
    for ax, name in zip(axes, names):
        grid, seed = grids[name]
        ax.imshow(plt.imread(grid), cmap="gray")
        ax.set_title(f"{'centralised CVAE' if name == 'centralised' else distribution_label(name)} (seed {seed})",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle("synthetic samples from the global CVAE (row = class 0-9)")
    return _save(fig, path)


def plot_privacy_utility(results: list[CellResult], path: Path) -> Path | None:
    grouped = privacy_levels(results)
    if not grouped:
        return None
    dists = sorted(grouped, key=distribution_order)
    fig, axes = _panels(len(dists), width=4.2, height=3.4)
    for ax, dist in zip(axes, dists):
        levels = sorted(grouped[dist], key=epsilon_order)
        finite = [float(lv) for lv in levels if lv != "inf"]
        # No DP sits one doubling right of the largest ε, on the same log axis.
        xs = [2 * max(finite, default=1.0) if lv == "inf" else float(lv) for lv in levels]
        for key, label, color in (("cas", "CAS", "tab:blue"), ("cas_federated", "federated CAS", "tab:green"),
                                  ("weighted_client_accuracy", "pre-trained arm, client acc", "tab:red")):
            means, stds, points = [], [], []
            for x, lv in zip(xs, levels):
                runs = grouped[dist][lv]["pretrained"]
                values = [100 * v for v in ((r.final(key) if key == "weighted_client_accuracy" else r.summary.get(key))
                                            for r in runs) if v is not None]
                if values:
                    points.append(x)
                    means.append(float(np.mean(values)))
                    stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
            if points:
                ax.errorbar(points, means, yerr=stds, marker="o", capsize=3, color=color, label=label)
        base = [100 * r.final("weighted_client_accuracy") for r in results
                if r.kind == "classifier" and r.arm_name == "baseline" and r.distribution == dist
                and r.final("weighted_client_accuracy") is not None]
        if base:
            ax.axhline(float(np.mean(base)), color="tab:orange", linestyle="--", label="baseline, client acc")
        ax.set_xscale("log")
        ax.set_xticks(xs, [epsilon_label(lv).replace(" (no DP)", "\n(no DP)") for lv in levels])
        ax.minorticks_off()
        ax.set_title(distribution_label(dist))
        ax.set_xlabel("ε (DP-SGD in the CVAE phase)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("privacy vs utility (mean ± std over seeds)")
    return _save(fig, path)


def write_figures(out: Path, results: list[CellResult], *, dataset: str) -> list[Path]:
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    made = [plot_privacy_utility(results, figures / "privacy_utility.png")]
    results = [r for r in results if not r.private]
    made += [
        plot_accuracy_per_round(results, figures / "accuracy_per_round.png", MAIN_ARMS,
                                f"{dataset.upper()}: pre-trained vs baseline (mean ± std over seeds)"),
        plot_cas_vs_alpha(results, figures / "cas_vs_alpha.png"),
        plot_class_distribution(out, figures / "class_distribution.png"),
        plot_synthetic_samples(results, figures / "synthetic_samples.png"),
    ]
    mitigation = _mitigation_arms(results)
    if mitigation:
        made.append(plot_accuracy_per_round(results, figures / "mitigation_per_round.png", mitigation,
                                            f"{dataset.upper()}: imbalance mitigation (mean ± std over seeds)"))
    return [p for p in made if p is not None]
