"""genfl-sweep: the plan, the statistics, and real sweeps (server + client processes per cell) at
tiny sizes: reports that match the raw results, resuming finished and interrupted cells, failures."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genfl_experiments.poster import POSTER
from genfl_experiments.reports import CellResult, fmt_pct, load_results, mean_std, write_table
from genfl_experiments.sweep.arms import ARM_CHOICES, ARM_SPECS, MITIGATIONS, Arm, build_arms
from genfl_experiments.sweep.plan import Distribution, PrivacyLevel, parse_distributions, plan_cells
from genfl_experiments.sweep.run import cell_args
from genfl_shared.checkpoint import load_checkpoint, save_checkpoint
from genfl_shared.config import PRESETS, RunConfig
from genfl_shared.models import initial_state
from genfl_shared.runfiles import METRICS_JSONL, round_events
from helpers import wait_until

TINY = ["--clients", "2", "--train-subset", "600", "--rounds", "2", "--synthetic-samples", "200",
        "--cas-epochs", "1", "--pretrain-epochs", "1", "--server-threads", "1", "--log-level", "warning"]


def sweep(out: Path, data: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfl_experiments.sweep.cli", "--data-root", str(data),
                           "--out", str(out), "--preset", "quick", *TINY, *args],
                          capture_output=True, text=True, timeout=timeout)


# -- plan and statistics (no processes) -------------------------------------------------------


def sweep_settings(**changes) -> RunConfig:
    """A sweep's settings for planning: the quick preset with 2 rounds of each phase."""
    return PRESETS["quick"].replace_settings(**{"cvae_rounds": 2, "classifier_rounds": 2, **changes})


@pytest.mark.unit
def test_distributions_parse_in_order_and_reject_bad_input():
    assert [d.name for d in parse_distributions("iid,100,0.1,0.01")] == ["iid", "alpha-100", "alpha-0.1",
                                                                          "alpha-0.01"]
    assert parse_distributions(" IID , 1 ")[1].alpha == 1.0
    for bad in ("0", "-1", "abc", "iid,iid", "0.1,0.10", "nan", ""):
        with pytest.raises(ValueError):
            parse_distributions(bad)


@pytest.mark.unit
def test_plan_shares_one_cvae_and_one_pretraining_per_group(tmp_path):
    arms = build_arms(["baseline", "pretrained-only", "pretrained"], ["fedprox", "fedavg"])
    assert [a.name for a in arms] == ["pretrained", "pretrained-fedprox", "pretrained-only", "baseline",
                                      "baseline-fedprox"]
    cells = plan_cells(tmp_path, [Distribution(None), Distribution(0.1)], [0, 1], arms,
                       sweep=sweep_settings(cvae_rounds=3), centralised=True)
    keys = {c.key: c for c in cells}
    assert len(cells) == 2 * 2 * (1 + 5) + 2
    primary = keys["alpha-0.1/seed1/pretrained"]
    assert primary.deps == ["alpha-0.1/seed1/cvae"]
    assert "--cvae-checkpoint" in cell_args(primary)
    assert (primary.rounds, keys["alpha-0.1/seed1/cvae"].rounds) == (2, 3)
    for name in ("pretrained-fedprox", "pretrained-only"):
        cell = keys[f"alpha-0.1/seed1/{name}"]
        assert cell.deps == [primary.key]
        args = cell_args(cell)
        assert args[args.index("--pretrained-checkpoint") + 1] == str(primary.out / "pretrained_classifier.pt")
    only = cell_args(keys["alpha-0.1/seed1/pretrained-only"])
    assert only[only.index("--local-epochs") + 1] == "0"
    base = keys["iid/seed0/baseline-fedprox"]
    assert cell_args(base) == ["--phase", "classifier", "--strategy", "fedprox", "--no-pretrain"] and base.deps == []
    # Group by group: a group's cells come before the next group's, so groups finish in order.
    assert [c.key for c in cells][:6] == [f"iid/seed0/{n}" for n in ("cvae", "pretrained", "pretrained-fedprox",
                                                                     "pretrained-only", "baseline",
                                                                     "baseline-fedprox")]
    with pytest.raises(ValueError):
        build_arms(["pretrained"], ["fedsgd"])
    assert Arm.named("pretrained", "fedavgm").label == "pre-trained + FedAvgM"
    assert Arm.named("baseline", "fedprox").name == "baseline-fedprox"


@pytest.mark.unit
def test_each_arm_is_one_registry_entry_whose_flags_match_its_settings():
    assert ARM_CHOICES == tuple(ARM_SPECS) and ARM_CHOICES[:3] == ("pretrained", "baseline", "pretrained-only")
    assert MITIGATIONS == ("balanced", "finetune", "distill", "synthmix", "iid-synthetic")  # reports' order
    for name, spec in ARM_SPECS.items():
        assert set(spec.settings) | set(spec.sweep_settings) <= RunConfig.field_names(), name
        arm = Arm(spec)
        settings = arm.settings(RunConfig())
        # The flag that gives an arm the CVAE is the one the server checks its settings by.
        uses_synthetic = RunConfig().replace_settings(**settings).mitigations.federated_synthetic_options()
        assert spec.samples_synthetic == bool(uses_synthetic), name
        assert arm.record() == {"name": name, "label": arm.label, "pretrain": spec.pretrained, "strategy": "fedavg",
                                "local_epochs": 0 if name == "pretrained-only" else None,
                                "mitigation": name.removeprefix("pretrained-") if spec.is_mitigation else None}
    # An arm's own value stands where the sweep's setting is off; the sweep's replaces it when on.
    finetune = Arm.named("pretrained-finetune")
    assert finetune.settings(RunConfig())["server_finetune_steps"] == 200
    assert finetune.settings(RunConfig().override(server_finetune_steps=7))["server_finetune_steps"] == 7
    assert Arm.named("pretrained-synthmix").settings(RunConfig().override(client_synthetic_mix=2.0))["client_synthetic_mix"] == 2.0
    assert list(Arm.named("pretrained-distill").settings(RunConfig())) == [
        "strategy", "server_distill", "server_distill_teacher", "server_distill_max_teachers", "server_distill_steps",
        "server_distill_lr", "server_distill_temperature", "server_distill_batch_size"]


@pytest.mark.integration
def test_mitigation_arms_start_from_the_shared_pretraining_with_their_one_option(tmp_path):
    arms = build_arms(["pretrained-finetune", "baseline", "pretrained-balanced", "pretrained"], ["fedavg"])
    assert [a.name for a in arms] == ["pretrained", "pretrained-balanced", "pretrained-finetune", "baseline"]
    assert arms[1].label == "pre-trained + balanced softmax (local loss)"
    cells = {c.key: c for c in plan_cells(tmp_path, [Distribution(0.01)], [0], arms, sweep=sweep_settings(),
                                          centralised=False)}
    primary, cvae = cells["alpha-0.01/seed0/pretrained"], cells["alpha-0.01/seed0/cvae"]
    balanced, finetune = cells["alpha-0.01/seed0/pretrained-balanced"], cells["alpha-0.01/seed0/pretrained-finetune"]
    assert balanced.deps == [primary.key]
    assert cell_args(balanced)[cell_args(balanced).index("--local-loss") + 1] == "balanced"
    assert "--server-finetune-steps" not in cell_args(balanced) and "--local-loss" not in cell_args(primary)
    assert finetune.deps == [primary.key, cvae.key]  # the CVAE samples its fine-tuning set
    # --server-finetune-steps not given: the arm's own default steps, the sweep's learning rate and batch size.
    assert cell_args(finetune) == ["--phase", "classifier", "--strategy", "fedavg", "--server-finetune-steps", "200",
                                   "--server-finetune-lr", "0.01", "--server-finetune-batch-size", "50",
                                   "--pretrained-checkpoint", str(primary.out / "pretrained_classifier.pt"),
                                   "--cvae-checkpoint", str(cvae.out / "cvae.pt")]
    # The real genfl-server takes the planned options: it gets past its checks and waits for clients.
    cvae.out.mkdir(parents=True)
    primary.out.mkdir(parents=True)
    save_checkpoint(cvae.out / "cvae.pt", "cvae", initial_state("cvae", 0))
    save_checkpoint(primary.out / "pretrained_classifier.pt", "classifier", initial_state("classifier", 0))
    for cell in (balanced, finetune):
        server = subprocess.run([sys.executable, "-m", "genfl_server.cli", *cell_args(cell), "--clients", "2", "--out",
                                 str(cell.out), "--address", "127.0.0.1:0", "--register-timeout", "1"],
                                capture_output=True, text=True, timeout=120)
        assert server.returncode == 4 and "clients registered" in server.stderr, server.stderr[-2000:]


@pytest.mark.unit
def test_the_iid_synthetic_arm_pretrains_from_the_iid_cvae_of_its_seed(tmp_path):
    arms = build_arms(["pretrained-iid-synthetic", "pretrained", "baseline"], ["fedavg"])
    assert [a.name for a in arms] == ["pretrained", "pretrained-iid-synthetic", "baseline"]
    assert arms[1].label == "pre-trained on the IID CVAE's samples + FedAvg"
    # IID not among the distributions: its CVAE phase is planned anyway, once per seed, and no
    # IID classifier cell; at IID itself the arm would be the plain pre-trained arm, so it is left out.
    for dists in ([Distribution(0.01)], [Distribution(None), Distribution(0.01)]):
        cells = plan_cells(tmp_path, dists, [0, 1], arms, sweep=sweep_settings(), centralised=False)
        keys = [c.key for c in cells]
        assert len(keys) == len(set(keys))
        for seed in (0, 1):
            cell = next(c for c in cells if c.key == f"alpha-0.01/seed{seed}/pretrained-iid-synthetic")
            iid_cvae = next(c for c in cells if c.key == f"iid/seed{seed}/cvae")
            assert cell.deps == [iid_cvae.key] and keys.index(iid_cvae.key) < keys.index(cell.key)
            assert cell_args(cell)[cell_args(cell).index("--cvae-checkpoint") + 1] == str(iid_cvae.out / "cvae.pt")
            assert "--pretrained-checkpoint" not in cell_args(cell)  # it samples, scores and pre-trains itself
            assert cell.out == tmp_path / "runs" / "alpha-0.01" / f"seed{seed}" / "pretrained-iid-synthetic"
            assert iid_cvae.distribution == Distribution(None) and cell_args(iid_cvae) == ["--phase", "cvae"]
        assert not any(k.startswith("iid/") and k.endswith("iid-synthetic") for k in keys)
        assert ("iid/seed0/pretrained" in keys) == (Distribution(None) in dists)
    # Only this arm: the skewed groups need no CVAE phase of their own.
    only = plan_cells(tmp_path, [Distribution(0.01)], [0], build_arms(["pretrained-iid-synthetic"], ["fedavg"]),
                      sweep=sweep_settings(), centralised=False)
    assert [c.key for c in only] == ["iid/seed0/cvae", "alpha-0.01/seed0/pretrained-iid-synthetic"]
    with pytest.raises(ValueError, match="privacy axis"):
        plan_cells(tmp_path, [Distribution(0.01)], [0], arms, sweep=sweep_settings(), centralised=False,
                   privacy=[PrivacyLevel(1.0)])


@pytest.mark.integration
def test_the_distillation_and_synthmix_arms_get_the_cvae_and_their_options_and_the_server_takes_them(tmp_path):
    arms = build_arms(["pretrained-distill", "pretrained", "pretrained-synthmix"], ["fedavg"])
    assert [a.name for a in arms] == ["pretrained", "pretrained-distill", "pretrained-synthmix"]
    assert arms[1].label == "pre-trained + server distillation on synthetic inputs"
    cells = {c.key: c for c in plan_cells(tmp_path, [Distribution(0.01)], [0], arms,
                                          sweep=sweep_settings(server_distill_steps=50), centralised=False)}
    primary, cvae = cells["alpha-0.01/seed0/pretrained"], cells["alpha-0.01/seed0/cvae"]
    distill, synthmix = cells["alpha-0.01/seed0/pretrained-distill"], cells["alpha-0.01/seed0/pretrained-synthmix"]
    assert distill.deps == [primary.key, cvae.key] == synthmix.deps  # the CVAE samples their synthetic set
    synthmix_args, distill_args = cell_args(synthmix), cell_args(distill)
    assert synthmix_args[synthmix_args.index("--client-synthetic-mix") + 1] == "0.5"
    assert "--server-distill" not in synthmix_args
    assert "--server-distill" in distill_args and "--server-distill" not in cell_args(primary)
    assert distill_args[distill_args.index("--server-distill-steps") + 1] == "50"
    assert distill_args[distill_args.index("--cvae-checkpoint") + 1] == str(cvae.out / "cvae.pt")
    cvae.out.mkdir(parents=True)
    primary.out.mkdir(parents=True)
    save_checkpoint(cvae.out / "cvae.pt", "cvae", initial_state("cvae", 0))
    save_checkpoint(primary.out / "pretrained_classifier.pt", "classifier", initial_state("classifier", 0))
    for cell in (distill, synthmix):
        server = subprocess.run([sys.executable, "-m", "genfl_server.cli", *cell_args(cell), "--clients", "2", "--out",
                                 str(cell.out), "--address", "127.0.0.1:0", "--register-timeout", "1"],
                                capture_output=True, text=True, timeout=120)
        assert server.returncode == 4 and "clients registered" in server.stderr, server.stderr[-2000:]


@pytest.mark.integration
def test_a_distillation_arm_that_cannot_run_is_refused_before_any_cell_starts(tmp_path, data_root):
    """--server-distill keeps each client's model as a teacher, up to --server-distill-max-teachers:
    a sweep asking for the arm with more clients fails at once, not after its CVAE and pre-training."""
    out = tmp_path / "sweep"
    sweep = subprocess.run([sys.executable, "-m", "genfl_experiments.sweep.cli", "--dataset", "mnist", "--data-root",
                            str(data_root("mnist")), "--alphas", "0.01", "--repeats", "1", "--clients", "40",
                            "--arms", "pretrained,pretrained-distill", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 2, sweep.stderr[-2000:]
    assert "--arms pretrained-distill" in sweep.stderr and "--server-distill-max-teachers 32" in sweep.stderr
    assert not (out / "runs").exists()


@pytest.mark.unit
def test_the_mitigation_table_pairs_each_arm_with_the_plain_pretrained_arm_per_seed(tmp_path):
    final = {("pretrained", 0): 0.60, ("pretrained", 1): 0.50, ("pretrained-balanced", 0): 0.70,
             ("pretrained-balanced", 1): 0.56, ("pretrained-finetune", 0): 0.80, ("pretrained-finetune", 1): 0.75,
             ("baseline", 0): 0.20, ("baseline", 1): 0.25}
    results = []
    for (name, seed), accuracy in final.items():
        arm = {"name": name, "label": Arm.named(name).label}
        summary = {"rounds": [], "final": {"round": 2, "weighted_client_accuracy": accuracy, "test_accuracy": accuracy}}
        results.append(CellResult(f"alpha-0.01/seed{seed}/{name}", "classifier", seed, "alpha-0.01", 0.01, arm, 1.0,
                                  summary, tmp_path))
    write_table(results, tmp_path / "table.md", dataset="mnist", preset="quick", differences=[])
    table = (tmp_path / "table.md").read_text()
    section = table[table.index("## Imbalance mitigation"):]
    assert "pre-trained + server fine-tuning on synthetic data" in section
    row = next(line for line in section.splitlines()[section.splitlines().index(
        next(line for line in section.splitlines() if line.startswith("Paired Δ"))):] if line.startswith("| α=0.01"))
    # balanced: +10, +6 pp; fine-tuning: +20, +25 pp (per seed, against pre-trained + FedAvg)
    assert row == "| α=0.01 | +8.00 ± 2.83, n=2 | +22.50 ± 3.54, n=2 |"
    assert "α=0.01: best is **pre-trained + server fine-tuning on synthetic data** (77.50 %)" in section


@pytest.mark.unit
def test_the_cas_table_keeps_the_iid_synthetic_arms_generator_apart(tmp_path):
    """A pretrained-iid-synthetic cell scores the IID federation's CVAE: its CAS is not the skewed
    federation's own (found when a real sweep pooled them: 37 % and 62 % into 49.7 ± 13.9 %)."""
    from genfl_experiments.reports import write_cas

    def cell(arm: str, seed: int, cas: float) -> CellResult:
        return CellResult(f"alpha-0.01/seed{seed}/{arm}", "classifier", seed, "alpha-0.01", 0.01, {"name": arm},
                          1.0, {"cas": cas, "cas_federated": cas}, tmp_path)

    results = [cell("pretrained", 0, 0.37), cell("pretrained", 1, 0.39),
               cell("pretrained-iid-synthetic", 0, 0.62), cell("pretrained-iid-synthetic", 1, 0.64)]
    write_cas(results, tmp_path / "cas.md", dataset="mnist", preset="quick")
    rows = [line for line in (tmp_path / "cas.md").read_text().splitlines() if line.startswith("| ")]
    own = next(r for r in rows if r.startswith("| α=0.01 |"))
    iid = next(r for r in rows if r.startswith("| IID CVAE, scored in the α=0.01 federation"))
    assert own.split(" | ")[1] == fmt_pct([0.37, 0.39]) and " | 2 | 0,1 |" in own
    assert iid.split(" | ")[1] == fmt_pct([0.62, 0.64])


@pytest.mark.unit
def test_mean_and_sample_std_like_the_poster():
    mean, std, n = mean_std([90.0, 92.0, 94.0])
    assert (mean, std, n) == (92.0, 2.0, 3)
    assert fmt_pct([0.9, 0.92, 0.94]) == "92.00 ± 2.00"
    assert fmt_pct([0.5]) == "50.00"  # one seed: no std is claimed
    assert fmt_pct([None]) == "–"


@pytest.mark.unit
def test_reports_leave_out_cells_built_from_a_since_replaced_dependency(tmp_path):
    def cell(path: Path, key: str, run_id: str, inputs: dict | None = None) -> None:
        path.mkdir(parents=True)
        (path / "cell.json").write_text(json.dumps({
            "key": key, "kind": "classifier" if inputs else "cvae", "seed": 0, "distribution": "iid",
            "alpha": "iid", "arm": None, "seconds": 1.0, "run_id": run_id, "inputs": inputs or {}}))
        (path / "summary.json").write_text(json.dumps({"rounds": [], "final": None}))

    group = tmp_path / "runs" / "iid" / "seed0"
    cell(group / "cvae", "iid/seed0/cvae", "new")
    cell(group / "pretrained", "iid/seed0/pretrained", "a", {"iid/seed0/cvae": {"path": "../cvae", "run_id": "new"}})
    cell(group / "pretrained-x", "iid/seed0/pretrained-x", "b", {"iid/seed0/cvae": {"path": "../cvae",
                                                                                   "run_id": "old"}})
    assert sorted(r.key for r in load_results(tmp_path)) == ["iid/seed0/cvae", "iid/seed0/pretrained"]


@pytest.mark.unit
def test_alpha_folder_names_never_collide():
    assert Distribution(0.1).name == "alpha-0.1" and Distribution(100.0).name == "alpha-100"
    assert Distribution(0.1000001).name != Distribution(0.1).name


# -- real sweeps --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("sweep")
    started = time.monotonic()
    result = sweep(out, data_root("mnist"), "--alphas", "iid,0.5", "--repeats", "2", "--parallel", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result, time.monotonic() - started


def _final_rows(out: Path) -> dict[tuple[str, str], list[float]]:
    """(distribution, arm) -> weighted client accuracy at the last classifier round, per seed."""
    rows = list(csv.DictReader(open(out / "results.csv")))
    last = max(int(r["round"]) for r in rows if r["phase"] == "classifier")
    finals: dict[tuple[str, str], list[float]] = {}
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        if r["phase"] == "classifier" and int(r["round"]) == last:
            finals.setdefault((r["distribution"], r["arm"]), []).append(float(r["weighted_client_accuracy"]))
    return finals


@pytest.mark.system
def test_every_cell_is_a_real_run_with_its_own_server_and_clients(small_sweep):
    out, _, _ = small_sweep
    for group in ("iid/seed0", "iid/seed1", "alpha-0.5/seed0", "alpha-0.5/seed1"):
        shards = json.loads((out / "runs" / group / "shards" / "partition.json").read_text())
        assert shards["alpha"] == ("iid" if group.startswith("iid") else 0.5)
        assert shards["seed"] == int(group[-1]) and shards["num_clients"] == 2
        for cell in ("cvae", "pretrained", "baseline"):
            folder = out / "runs" / group / cell
            assert (folder / "cell.json").exists()
            logs = {p.name for p in (folder / "logs").iterdir()}
            assert logs == {"server.log", "client-000.log", "client-001.log"}
            summary = json.loads((folder / "summary.json").read_text())
            assert summary["seed"] == int(group[-1]) and summary["clients"] == 2
        pretrained = json.loads((out / "runs" / group / "pretrained" / "summary.json").read_text())
        assert 0 <= pretrained["cas"] <= 1 and 0 <= pretrained["cas_federated"] <= 1
    # Baseline and pre-trained arms of one group train on the very same shards: each client reports
    # the held-out size its shard file has, identically in both arms.
    group = out / "runs" / "alpha-0.5" / "seed1"
    partition = json.loads((group / "shards" / "partition.json").read_text())
    expected = {c["client_id"]: c["num_heldout"] for c in partition["clients"]}
    for arm in ("pretrained", "baseline"):
        first_round = round_events(group / arm / METRICS_JSONL)[0]
        assert {cid: m["samples"] for cid, m in first_round["per_client"].items()} == expected, arm


@pytest.mark.system
def test_results_csv_has_one_row_per_run_and_round(small_sweep):
    out, _, _ = small_sweep
    rows = list(csv.DictReader(open(out / "results.csv")))
    # 4 groups x (2 CVAE rounds + 2 rounds x 2 classifier arms)
    assert len(rows) == 4 * (2 + 2 * 2)
    keys = {(r["distribution"], r["seed"], r["arm"], r["phase"], r["round"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["arm"] for r in rows} == {"cvae", "pretrained", "baseline"}
    for r in rows:
        if r["phase"] == "classifier":
            assert 0 <= float(r["weighted_client_accuracy"]) <= 1 and 0 <= float(r["test_accuracy"]) <= 1


@pytest.mark.system
def test_table_matches_the_raw_results_and_shows_the_poster(small_sweep):
    out, result, _ = small_sweep
    table = (out / "table.md").read_text()
    finals = _final_rows(out)
    for dist, label in (("iid", "IID"), ("alpha-0.5", "α=0.5")):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        for column, arm in ((1, "pretrained"), (2, "baseline")):
            values = [100 * v for v in finals[(dist, arm)]]
            assert len(values) == 2
            assert cells[column] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert cells[-2:] == ["2", "0,1"]
    iid = next(line for line in table.splitlines() if line.startswith("| IID |"))
    pre, base = POSTER["mnist"]["iid"]
    assert f"{pre[0]:.2f} ± {pre[1]:.2f}" in iid and f"{base[0]:.2f} ± {base[1]:.2f}" in iid
    assert "held-out" in table and "8/9" in table and "real test set" in table
    assert table in result.stdout


@pytest.mark.system
def test_cas_table_has_each_distribution_and_the_centralised_cvae(small_sweep):
    out, _, _ = small_sweep
    cas = (out / "cas.md").read_text()
    for label in ("IID", "α=0.5"):
        assert f"| {label} |" in cas
    central = [json.loads((out / "runs" / "centralised" / f"seed{s}" / "summary.json").read_text())["cas"]
               for s in (0, 1)]
    mean, std = statistics.fmean(100 * c for c in central), statistics.stdev(100 * c for c in central)
    assert f"| Centralised CVAE (all data) | {mean:.2f} ± {std:.2f} | – | 2 | 0,1 |" in cas


@pytest.mark.system
def test_figures_are_real_pngs(small_sweep):
    out, _, _ = small_sweep
    from PIL import Image

    for name in ("accuracy_per_round", "cas_vs_alpha", "class_distribution", "synthetic_samples"):
        with Image.open(out / "figures" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250
            # Not a blank canvas: plenty of distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


@pytest.mark.system
def test_rerun_skips_finished_cells_and_adds_new_arms_from_the_same_pretraining(small_sweep, data_root):
    out, _, _ = small_sweep
    group = out / "runs" / "alpha-0.5" / "seed0"
    old_pretrained = json.loads((group / "pretrained" / "cell.json").read_text())["run_id"]
    shutil.rmtree(group / "cvae")  # its CVAE must be trained again, and what was built on it re-run
    markers = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("**/cell.json")
               if p.parent.name != "pretrained" or p.parent.parent != group}
    result = sweep(out, data_root("mnist"), "--alphas", "0.5", "--repeats", "1",
                   "--arms", "pretrained,baseline,pretrained-only", "--strategies", "fedavg,fedavgm")
    assert result.returncode == 0, result.stderr[-5000:]
    assert {p: p.stat().st_mtime_ns for p in markers} == markers  # nothing else finished was re-run
    pretrained_cell = json.loads((group / "pretrained" / "cell.json").read_text())
    assert pretrained_cell["run_id"] != old_pretrained
    assert pretrained_cell["inputs"]["alpha-0.5/seed0/cvae"]["run_id"] == json.loads(
        (group / "cvae" / "cell.json").read_text())["run_id"]
    assert sorted(p.parent.name for p in group.glob("*/cell.json")) == [
        "baseline", "baseline-fedavgm", "cvae", "pretrained", "pretrained-fedavgm", "pretrained-only"]
    pretrained = load_checkpoint(group / "pretrained" / "pretrained_classifier.pt", "classifier")
    # Pre-training only: the clients only evaluate, so the model stays the pre-trained one.
    only = load_checkpoint(group / "pretrained-only" / "classifier.pt", "classifier")
    for k, v in pretrained.items():
        assert torch.allclose(only[k].float(), v.float(), atol=1e-6), k
    only_summary = json.loads((group / "pretrained-only" / "summary.json").read_text())
    assert len({r["weighted_client_accuracy"] for r in only_summary["rounds"]}) == 1
    assert only_summary["cas"] is None  # CAS comes from the arm that pre-trained, once per group
    fedavgm = json.loads((group / "pretrained-fedavgm" / "summary.json").read_text())
    assert fedavgm["config"]["strategy"] == "fedavgm"
    assert fedavgm["pretrained_checkpoint"] == str(group / "pretrained" / "pretrained_classifier.pt")
    table = (out / "table.md").read_text()
    assert "## Imbalance mitigation" in table
    for label in ("pre-trained + FedAvgM", "baseline + FedAvgM", "pre-training only (no local training)"):
        assert label in table
    assert "α=0.5: best is" in table
    assert (out / "figures" / "mitigation_per_round.png").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["arm"] for r in rows} >= {"pretrained-fedavgm", "baseline-fedavgm", "pretrained-only"}


@pytest.mark.system
def test_a_sweep_folder_moved_elsewhere_resumes_without_re_running_its_cells(small_sweep, data_root, tmp_path):
    out, _, _ = small_sweep
    moved = tmp_path / "moved" / "sweep"
    shutil.copytree(out, moved)  # a copy: the fixture's folder stays for the other tests
    markers = {p: p.read_text() for p in (moved / "runs").glob("**/cell.json")}
    pretrained = json.loads((moved / "runs" / "iid" / "seed0" / "pretrained" / "cell.json").read_text())
    assert "../cvae/cvae.pt" in pretrained["args"]  # recorded relative to the cell's folder
    result = sweep(moved, data_root("mnist"), "--alphas", "iid,0.5", "--repeats", "2", "--parallel", "2")
    assert result.returncode == 0, result.stderr[-5000:]
    assert {p: p.read_text() for p in (moved / "runs").glob("**/cell.json")} == markers  # none re-run


@pytest.mark.system
def test_the_iid_synthetic_arm_is_a_real_run_on_the_skewed_shards_from_the_iid_cvae(small_sweep, data_root):
    out, _, _ = small_sweep
    group, iid_cvae = out / "runs" / "alpha-0.5" / "seed1", out / "runs" / "iid" / "seed1" / "cvae"
    iid_marker = json.loads((iid_cvae / "cell.json").read_text())
    result = sweep(out, data_root("mnist"), "--alphas", "0.5", "--seed", "1", "--repeats", "1",
                   "--arms", "pretrained-iid-synthetic")
    assert result.returncode == 0, result.stderr[-5000:]
    assert json.loads((iid_cvae / "cell.json").read_text())["run_id"] == iid_marker["run_id"]  # reused as it was
    cell = json.loads((group / "pretrained-iid-synthetic" / "cell.json").read_text())
    assert cell["inputs"]["iid/seed1/cvae"]["run_id"] == iid_marker["run_id"]
    summary = json.loads((group / "pretrained-iid-synthetic" / "summary.json").read_text())
    assert summary["cvae_checkpoint"] == str(iid_cvae / "cvae.pt") and 0 <= summary["cas"] <= 1
    # Trained on the skewed group's shards: the clients report that partition's held-out sizes.
    partition = json.loads((group / "shards" / "partition.json").read_text())
    first_round = round_events(group / "pretrained-iid-synthetic" / METRICS_JSONL)[0]
    assert {cid: m["samples"] for cid, m in first_round["per_client"].items()} == {
        c["client_id"]: c["num_heldout"] for c in partition["clients"]}
    # Pre-trained from another generator than the group's own pre-trained arm.
    own = load_checkpoint(group / "pretrained" / "pretrained_classifier.pt", "classifier")
    other = load_checkpoint(group / "pretrained-iid-synthetic" / "pretrained_classifier.pt", "classifier")
    assert any(not torch.equal(own[k], other[k]) for k in own)
    assert "pre-trained on the IID CVAE's samples + FedAvg" in (out / "table.md").read_text()

@pytest.mark.system
def test_an_interrupted_cell_resumes_from_its_last_round(tmp_path, data_root):
    args = [sys.executable, "-m", "genfl_experiments.sweep.cli", "--data-root", str(data_root("mnist")), "--out",
            str(tmp_path), "--preset", "quick", "--alphas", "iid", "--repeats", "1", "--arms", "baseline",
            "--no-centralised", *TINY, "--classifier-rounds", "4", "--log-level", "info"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "iid" / "seed0" / "baseline" / METRICS_JSONL
    wait_until(lambda: len(round_events(metrics)) >= 2 or proc.poll() is not None, 300, "two rounds of the cell",
               interval=0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    done = round_events(metrics)
    assert 2 <= len(done) < 4
    assert not (metrics.parent / "cell.json").exists()

    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from its last finished round" in result.stderr
    rounds = json.loads((metrics.parent / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    # The cell's wall time covers both attempts.
    assert json.loads((metrics.parent / "cell.json").read_text())["seconds"] > sum(r["seconds"] for r in rounds)
    # The rounds before the interruption were not run again: their records (timings included) are the same.
    assert rounds[:len(done)] == [{k: v for k, v in e.items() if k not in ("event", "per_client")} for e in done]


@pytest.mark.system
def test_changed_settings_are_refused_and_failed_cells_fail_the_sweep(tmp_path, data_root):
    # 200 clients cannot each get 40 of 600 images: every partition fails, so nothing depending on it runs.
    result = sweep(tmp_path, data_root("mnist"), "--alphas", "0.5", "--repeats", "1", "--clients", "200",
                   "--no-centralised", timeout=120)
    assert result.returncode == 1
    assert "alpha-0.5/seed0/cvae failed" in result.stderr and "not run, a cell it needs failed" in result.stderr
    assert "some cells failed" in result.stderr
    changed = sweep(tmp_path, data_root("mnist"), "--alphas", "0.5", "--repeats", "1", "--clients", "3",
                    timeout=120)
    assert changed.returncode != 0
    assert "holds a sweep with other settings" in changed.stderr and "clients: 200 -> 3" in changed.stderr


@pytest.mark.system
def test_fashion_mnist_sweep_reports_against_the_fmnist_poster_numbers(tmp_path, data_root):
    result = sweep(tmp_path, data_root("fmnist"), "--dataset", "fmnist", "--alphas", "iid", "--repeats", "1",
                   "--arms", "baseline", "--no-centralised", "--classifier-rounds", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "iid" / "seed0" / "baseline" / "summary.json").read_text())
    assert summary["dataset"] == "fmnist" and len(summary["rounds"]) == 1
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# GenFL sweep: FMNIST")
    row = next(line for line in table.splitlines() if line.startswith("| IID |"))
    assert "78.21 ± 0.24" in row and "71.35 ± 1.02" in row  # the poster's Fashion-MNIST IID numbers


@pytest.mark.system
def test_an_ensemble_sweep_shares_label_counts_samples_every_clients_cvae_and_compares_with_fedavg(tmp_path, data_root):
    """--cvae-aggregation reaches every cell (the sweep's clients share their label counts for it), the
    folder records it, and compare_generators sets its pre-trained arm beside a FedAvg sweep's, seed by seed."""
    from genfl_experiments.compare_generators import compare
    from genfl_shared.ensemble import ENSEMBLE_KIND, CVAEEnsemble

    runs = {}
    for mode in ("fedavg", "ensemble"):
        runs[mode] = tmp_path / mode
        result = sweep(runs[mode], data_root("mnist"), "--alphas", "0.01", "--repeats", "1", "--arms", "pretrained",
                       "--no-centralised", "--cvae-aggregation", mode)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    fixed = json.loads((runs["ensemble"] / "sweep.json").read_text())["fixed"]
    assert ["--cvae-aggregation", "ensemble"] in fixed["generator_options"]
    assert "generator_options" not in json.loads((runs["fedavg"] / "sweep.json").read_text())["fixed"]
    cvae = runs["ensemble"] / "runs" / "alpha-0.01" / "seed0" / "cvae"
    ensemble = CVAEEnsemble.from_state(load_checkpoint(cvae / "cvae.pt", ENSEMBLE_KIND))
    # Both clients are members: they shared their label counts (without them the run fails).
    assert len(ensemble.members) == 2
    table = compare(runs["fedavg"], runs["ensemble"])
    assert table[2].startswith("| α=0.01 | fedavg |") and table[3].startswith("| α=0.01 | ensemble |")
    assert table[3].split("|")[-2].strip() == "0"  # paired on seed 0


@pytest.mark.unit
def test_report_only_refuses_a_folder_without_its_runs_and_leaves_its_tables(tmp_path):
    """A recorded folder keeps its tables but not runs/ (too large for the repository): reporting it
    again would overwrite them with empty ones."""
    from click.testing import CliRunner

    from genfl_experiments.sweep.cli import main

    (tmp_path / "sweep.json").write_text(json.dumps({"fixed": {"dataset": "mnist", "preset": "quick"}}))
    (tmp_path / "table.md").write_text("the recorded table\n")
    result = CliRunner().invoke(main, ["--out", str(tmp_path), "--report-only"])
    assert result.exit_code == 1 and "holds no runs/" in result.output
    assert (tmp_path / "table.md").read_text() == "the recorded table\n"
