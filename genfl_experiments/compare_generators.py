"""Set a --cvae-aggregation sweep beside the poster's FedAvg generator on the same shards.

Both folders are genfl-sweep outputs of the same dataset, preset, seeds and distributions; the
generator sweep runs with ``--cvae-aggregation MODE``. Per distribution: CAS and federated CAS (from
the cells' summaries, or, for a folder whose ``runs/`` is not kept, the mean ± std its cas.md
recorded), the pre-trained arm's weighted client accuracy and real-test accuracy after the last
round, their difference from FedAvg paired per seed (the same seed gives the same shards), and the
per-round slope of the weighted client accuracy (the poster's "abnormal behaviour" at α = 0.01 is
a negative slope)::

    python -m genfl_experiments.compare_generators --fedavg results/mnist-quick-grid \\
        --generator results/mnist-quick-ensemble --out results/mnist-quick-ensemble/generators.md

Beside the table: ``generator_per_round.png`` (the pre-trained arm's weighted client accuracy per
round, mean ± std over seeds, both generators, one panel per distribution) and, given two sample
grids (``--samples FEDAVG.png MODE.png``, e.g. the ``synthetic_samples.png`` of an α = 0.01
pre-trained cell of each), ``generator_samples.png`` with them side by side.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import click

from .reports import distribution_label, distribution_order, fmt_pct, load_results

ARM = "pretrained"


def round_curves(folder: Path, arm: str = ARM) -> dict[str, dict[int, list[tuple[int, float, float]]]]:
    """{distribution: {seed: [(round, weighted client accuracy, test accuracy)]}} of the classifier
    phase of ``arm``, from the folder's results.csv."""
    curves: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    with open(folder / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["arm"] == arm and row["phase"] == "classifier" and not row.get("epsilon"):
                curves[row["distribution"]][int(row["seed"])].append(
                    (int(row["round"]), float(row["weighted_client_accuracy"]), float(row["test_accuracy"])))
    return {dist: {seed: sorted(points) for seed, points in seeds.items()} for dist, seeds in curves.items()}


def slope(points: list[tuple[int, float, float]]) -> float:
    """Least-squares slope of the weighted client accuracy per round (fraction per round)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return statistics.linear_regression(xs, ys).slope if len(points) > 1 else 0.0


def cas_by_seed(folder: Path) -> dict[str, dict[int, tuple[float | None, float | None]]]:
    """{distribution: {seed: (CAS, federated CAS)}} from the cells a folder keeps (empty without runs/)."""
    found: dict[str, dict[int, tuple]] = defaultdict(dict)
    if not (folder / "runs").is_dir():
        return found
    for cell in load_results(folder):
        if cell.kind == "classifier" and "cas" in cell.summary and cell.distribution and cell.epsilon is None:
            found[cell.distribution][cell.seed] = (cell.summary.get("cas"), cell.summary.get("cas_federated"))
    return found


def recorded_cas(folder: Path) -> dict[str, tuple[str, str]]:
    """{distribution label: (CAS, federated CAS)} as a folder's cas.md printed them (mean ± std)."""
    rows = {}
    for line in (folder / "cas.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.match(r"^[\d.]+( ± [\d.]+)?$", cells[1]):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def _pp(values: list[float]) -> str:
    return fmt_pct(values) if values else "–"


class NotComparable(ValueError):
    """Two sweep folders whose cells cannot be paired."""


def check_comparable(fedavg: Path, generator: Path) -> str:
    """The generator folder's mode; NotComparable unless ``fedavg`` is a FedAvg-generator sweep and
    both fixed every other setting alike (the same seed then means the same shards)."""
    fixed = {name: json.loads((folder / "sweep.json").read_text())["fixed"] for name, folder in
             (("fedavg", fedavg), ("generator", generator))}
    if _mode_of(fedavg) != "fedavg":
        raise NotComparable(f"{fedavg} is a --cvae-aggregation {_mode_of(fedavg)} sweep, not FedAvg's")
    mode = _mode_of(generator)
    if mode == "fedavg":
        raise NotComparable(f"{generator} is a FedAvg-generator sweep: nothing to compare")
    others = [{k: v for k, v in f.items() if k != "generator_options"} for f in fixed.values()]
    if others[0] != others[1]:
        differ = sorted(k for k in {**others[0], **others[1]} if others[0].get(k) != others[1].get(k))
        raise NotComparable(f"the two sweeps differ in {', '.join(differ)}: their cells cannot be paired")
    return mode


def compare(fedavg: Path, generator: Path) -> list[str]:
    mode = check_comparable(fedavg, generator)
    fed_curves, gen_curves = round_curves(fedavg), round_curves(generator)
    fed_cas, gen_cas = cas_by_seed(fedavg), cas_by_seed(generator)
    fed_recorded = recorded_cas(fedavg) if not fed_cas else {}
    lines = [
        f"| Distribution | Generator | CAS | Federated CAS | Pre-trained, weighted client acc | Real test acc "
        f"| Δ client acc vs FedAvg (pp, paired) | Δ real test acc (pp, paired) | Slope (pp/round) | Seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dist in sorted(set(gen_curves) | set(gen_cas), key=distribution_order):
        label = distribution_label(dist)
        for name, curves, cas, recorded in (("fedavg", fed_curves, fed_cas, fed_recorded),
                                            (mode, gen_curves, gen_cas, {})):
            seeds = sorted(curves.get(dist, {}))
            final = {s: curves[dist][s][-1] for s in seeds}
            if cas.get(dist):
                cas_text = _pp([c for c, _ in cas[dist].values() if c is not None])
                fed_text = _pp([f for _, f in cas[dist].values() if f is not None])
            else:
                cas_text, fed_text = recorded.get(label, ("–", "–"))
            delta_client = delta_test = "–"
            if name != "fedavg":
                base = {s: p[-1] for s, p in fed_curves.get(dist, {}).items()}
                paired = [s for s in seeds if s in base]
                if paired:
                    delta_client = _pp([final[s][1] - base[s][1] for s in paired])
                    delta_test = _pp([final[s][2] - base[s][2] for s in paired])
            lines.append(f"| {label} | {name} | {cas_text} | {fed_text} | {_pp([final[s][1] for s in seeds])} "
                         f"| {_pp([final[s][2] for s in seeds])} | {delta_client} | {delta_test} "
                         f"| {_pp([slope(curves[dist][s]) for s in seeds])} | {','.join(map(str, seeds))} |")
    return lines


def _mode_of(folder: Path) -> str:
    fixed = json.loads((folder / "sweep.json").read_text())["fixed"]
    for option in fixed.get("generator_options", []):
        if option[0] == "--cvae-aggregation":
            return option[1]
    return "fedavg"


def plot_per_round(fedavg: Path, generator: Path, path: Path) -> Path:
    """The pre-trained arm's weighted client accuracy per round for both generators."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mode = _mode_of(generator)
    curves = {"fedavg": round_curves(fedavg), mode: round_curves(generator)}
    dists = sorted(curves[mode], key=distribution_order)
    fig, axes = plt.subplots(1, len(dists), figsize=(3.6 * len(dists), 3.2), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        for name, color in (("fedavg", "tab:orange"), (mode, "tab:blue")):
            seeds = curves[name].get(dist, {})
            if not seeds:
                continue
            rounds = [p[0] for p in next(iter(seeds.values()))]
            values = np.array([[100 * p[1] for p in points] for points in seeds.values()
                               if [p[0] for p in points] == rounds])
            mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(rounds))
            ax.plot(rounds, mean, marker="o", color=color, label=f"{name} generator")
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.2)
        ax.set_title(distribution_label(dist))
        ax.set_xlabel("classifier round")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("weighted client accuracy (%)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(fedavg_png: Path, generator_png: Path, mode: str, path: Path) -> Path:
    """Two synthetic-sample grids (one row per class) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, png, title in ((axes[0], fedavg_png, "fedavg generator"), (axes[1], generator_png, f"{mode} generator")):
        ax.imshow(mpimg.imread(png), cmap="gray")
        ax.set_title(f"{title} (row = class 0-9)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@click.command()
@click.option("--fedavg", "fedavg", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A genfl-sweep folder of the poster's FedAvg generator.")
@click.option("--generator", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A genfl-sweep folder of the same grid with --cvae-aggregation.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The markdown table.")
@click.option("--samples", type=click.Path(exists=True, dir_okay=False, path_type=Path), nargs=2, default=None,
              help="Two sample grids (FedAvg's, then the mode's) to set side by side.")
def main(fedavg: Path, generator: Path, out: Path, samples: tuple[Path, Path] | None) -> None:
    """Write the table of a --cvae-aggregation sweep beside FedAvg's, and its figures."""
    try:
        table = compare(fedavg, generator)
    except NotComparable as error:
        raise click.ClickException(str(error)) from None
    out.write_text("\n".join(table) + "\n")
    click.echo("\n".join(table))
    figures = out.parent / "figures"
    figures.mkdir(exist_ok=True)
    written = [plot_per_round(fedavg, generator, figures / "generator_per_round.png")]
    if samples:
        written.append(plot_samples(samples[0], samples[1], _mode_of(generator), figures / "generator_samples.png"))
    click.echo(f"figures: {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    main()
