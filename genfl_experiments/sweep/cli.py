"""``genfl-sweep``: the poster's experiment grid as one resumable command.

    genfl-sweep --dataset mnist --data-root DATA --alphas iid,100,10,1,0.1,0.01 --repeats 5 \\
                --preset paper --out sweeps/mnist [--device cuda] [--parallel 3]

Every cell is a real ``genfl-server`` with ``--clients`` real ``genfl-client`` processes over
loopback gRPC. Results go to OUT/results.csv, OUT/table.md, OUT/cas.md and OUT/figures/.
"""

from __future__ import annotations

import json
import os
import signal
import logging
import sys
import time
from pathlib import Path

import click

from genfl_shared.cli import log_level_option, option, setup_logging
from genfl_shared.cli_settings import given_run_options, resolve_config, run_options
from genfl_shared.data import DATASETS
from genfl_shared.config import DP_FIELDS, GENERATOR_FIELDS, PRESETS, ROUNDS, RunConfig
from genfl_shared.runfiles import write_json_atomic

from .arms import ARM_CHOICES, MITIGATION_FIELDS, STRATEGY_LABELS, SWEEP_ARM_FIELDS, build_arms
from .plan import SWEEP_DP_FIELDS, parse_distributions, parse_epsilons, plan_cells
from ..launch import clients_per_process_option
from ..reports import write_reports
from .run import FIXED_SERVER_FIELDS, SweepRunner, SweepSettings

log = logging.getLogger("genfl_sweep")

SWEEP_JSON = "sweep.json"

# The run settings genfl-sweep takes besides --seed (the rest keep the preset's values); the arms'
# own options (SWEEP_ARM_FIELDS) reach only their cells, so a change re-runs only those.
SWEEP_FIELDS = ("clients", "cvae_rounds", "classifier_rounds", "local_epochs", "cvae_local_epochs", "synthetic_samples", "cas_epochs",
                "pretrain_epochs", "prox_mu", "fedavgm_momentum", "fedavgm_lr", *GENERATOR_FIELDS, *SWEEP_DP_FIELDS,
                *SWEEP_ARM_FIELDS)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_same_sweep(out: Path, fixed: dict) -> None:
    """A folder holds one sweep: re-runs may add alphas, seeds or arms, never change what a cell means."""
    path = out / SWEEP_JSON
    if path.exists():
        recorded = json.loads(path.read_text())["fixed"]
        # Both ways: a setting recorded but not given now (e.g. the generator's) changed as well.
        changed = {k: (recorded.get(k), fixed.get(k)) for k in {**recorded, **fixed}
                   if recorded.get(k) != fixed.get(k)}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise click.ClickException(f"{out} holds a sweep with other settings ({details}); "
                                       "use another --out, or the same settings to resume it")


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--dataset", type=click.Choice(sorted(DATASETS)), default="mnist")
@option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
        help="Folder with the dataset's IDX files (train and test). Required unless --report-only.")
@option("--alphas", default="iid,100,10,1,0.1,0.01",
        help="Label distributions: 'iid' and/or Dirichlet concentrations, comma-separated.")
@option("--repeats", type=click.IntRange(1), default=5, help="Seeds per distribution: --seed, --seed+1, ...")
@run_options("seed")
@option("--preset", type=click.Choice(sorted(PRESETS)), default="quick")
@option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@option("--arms", default="pretrained,baseline",
        help=f"Classifier-phase arms, comma-separated, from: {', '.join(ARM_CHOICES)} "
        "(pretrained-only: the pre-trained model with --local-epochs 0, clients only evaluate).")
@option("--strategies", default="fedavg",
        help=f"Aggregation strategies of the classifier phase, comma-separated, from: "
        f"{', '.join(STRATEGY_LABELS)}; every pretrained/baseline arm runs with each.")
@option("--epsilons", default=None,
        help="A privacy axis: for each epsilon (comma-separated; 'inf': no DP, e.g. 1,3,8,inf) its own "
        "federated CVAE phase with DP-SGD calibrated to it (--dp-target-epsilon) and its own pre-trained "
        "arms; reported in privacy.md and figures/privacy_utility.png.")
@option("--centralised/--no-centralised", default=True,
        help="Also train one CVAE centrally on all the data per seed (the CAS reference in cas.md).")
@option("--device", default="cpu", help="Torch device of every server and client (cuda: clients share the GPU).")
@option("--parallel", type=click.IntRange(1), default=1, help="Cells (server + clients) running at once.")
@run_options("train_subset", ROUNDS, *SWEEP_FIELDS)
@option("--client-threads", type=click.IntRange(1), default=1, help="Torch threads per client process.")
@clients_per_process_option
@option("--server-threads", type=click.IntRange(0), default=0,
        help="Torch threads per server (0: this machine's cores / --parallel, so cells do not oversubscribe).")
@option("--cell-timeout", type=click.FloatRange(0), default=0, help="Fail a cell after this many seconds (0: never).")
@option("--report-only", is_flag=True, help="Only rewrite the tables and figures of --out from its finished "
        "cells (the sweep's settings come from its sweep.json).")
@log_level_option
def main(dataset, data_root, alphas, repeats, preset, out, arms, strategies, epsilons, centralised, device, parallel,
         client_threads, clients_per_process, server_threads, cell_timeout, report_only, log_level, **run_settings):
    """Run the poster's grid (distributions x seeds x arms) as real federated runs, then report."""
    setup_logging(log_level, "text", "sweep")
    # SIGINT (also when started in the background, where it is inherited as ignored) and SIGTERM
    # (containers, `timeout`) stop the running cells cleanly; a re-run resumes them.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if report_only:
        recorded = _read_sweep(out)
        if not (out / "runs").is_dir():  # its tables would be rewritten empty
            raise click.ClickException(f"{out} holds no runs/ (the finished cells the reports are made from): "
                                       "nothing to report, and its tables are left as they are")
        _report(out, recorded["fixed"], recorded.get("differences_from_paper", []), failed=False)
        return
    if data_root is None:
        raise click.UsageError("--data-root is required (the folder with the dataset's IDX files)")
    try:
        distributions = parse_distributions(alphas)
        arm_list = build_arms(_list(arms), _list(strategies))
        privacy = parse_epsilons(epsilons) if epsilons is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    config = resolve_config(preset, given_run_options(run_settings))  # its seed: the first; each cell has its own
    for arm in arm_list:
        try:  # now, not when the arm's first cell starts after its CVAE and pre-training cells
            config.replace_settings(**arm.settings(config)).check_distill()
        except ValueError as error:
            raise click.UsageError(f"--arms {arm.name}: {error}") from None
    if centralised and config.pretraining.cas_epochs == 0:
        log.info("--cas-epochs 0: no CAS, so no centralised CVAE reference either")
        centralised = False
    # Everything that changes what a cell computes is fixed for the folder (see _check_same_sweep).
    fixed = {"dataset": dataset, "preset": preset, "clients": config.data.clients,
             "train_subset": config.data.train_subset,
             "server_options": [list(o) for o in config.to_options(FIXED_SERVER_FIELDS)]}
    if config.generator.cvae_aggregation != "fedavg":  # a folder of the poster's generator records none
        fixed["generator_options"] = [list(o) for o in config.to_options(GENERATOR_FIELDS)]
    if privacy is not None:  # the levels may grow on a re-run; what DP-SGD means may not
        fixed["dp_options"] = [list(o) for o in config.to_options(SWEEP_DP_FIELDS)]
    out.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, fixed)
    differences = _differences_from_paper(config)
    write_json_atomic(out / SWEEP_JSON, {"fixed": fixed, "data_root": str(data_root),
                                         "differences_from_paper": differences})

    seeds = list(range(config.reproducibility.seed, config.reproducibility.seed + repeats))
    cells = plan_cells(out, distributions, seeds, arm_list, sweep=config, centralised=centralised, privacy=privacy)
    settings = SweepSettings(dataset, data_root, preset, config, device=device,
                             client_threads=client_threads, clients_per_process=clients_per_process,
                             server_threads=server_threads or max(1, (os.cpu_count() or 1) // parallel),
                             cell_timeout=cell_timeout or None, log_level=log_level)
    log.info("sweep of %d cells: %s x seeds %s x arms %s%s%s, %d at a time on %s, in %s", len(cells),
             ",".join(d.label for d in distributions), seeds, ",".join(a.name for a in arm_list),
             "" if privacy is None else " x epsilons " + ",".join(level.label for level in privacy),
             " + centralised" if centralised else "", parallel, device, out)
    started = time.monotonic()
    runner = SweepRunner(settings, cells, parallel=parallel)
    try:
        outcome = runner.run()
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopped the running cells; finished cells are kept, re-run to resume",
                   err=True)
        sys.exit(130)
    log.info("ran %d cells, skipped %d finished, %d failed, %d not run, in %.0f s", len(outcome.ran),
             len(outcome.skipped), len(outcome.failed), len(outcome.not_run), time.monotonic() - started)
    _report(out, fixed, differences, failed=bool(outcome.failed or outcome.not_run))


def _read_sweep(out: Path) -> dict:
    path = out / SWEEP_JSON
    if not path.exists():
        raise click.ClickException(f"{out} holds no sweep ({SWEEP_JSON} is missing)")
    return json.loads(path.read_text())


def _differences_from_paper(config: RunConfig) -> list[str]:
    """The settings in which this sweep is not the poster's configuration (for table.md)."""
    paper = PRESETS["paper"]
    compared = [name for name in paper.to_dict()
                if name not in ("seed", "strategy", "pretrain", "prox_mu", "fedavgm_lr", "fedavgm_momentum",
                                  "deterministic", *DP_FIELDS, *MITIGATION_FIELDS)]
    # DP: privacy.md's, not the poster's; the mitigations' settings: those arms' own
    return [f"{name.replace('_', ' ')} {config.setting(name)} (poster: {paper.setting(name)})"
            for name in compared if config.setting(name) != paper.setting(name)]


def _report(out: Path, fixed: dict, differences: list[str], *, failed: bool) -> None:
    results = write_reports(out, dataset=fixed["dataset"], preset=fixed["preset"], differences=differences)
    from ..figures import write_figures  # matplotlib is only needed here

    figures = write_figures(out, results, dataset=fixed["dataset"])
    click.echo((out / "table.md").read_text())
    click.echo((out / "cas.md").read_text())
    privacy = out / "privacy.md"
    if privacy.exists():
        click.echo(privacy.read_text())
    click.echo(f"{len(results)} finished cells; results.csv, table.md, cas.md{', privacy.md' if privacy.exists() else ''} "
               f"and {len(figures)} figures in {out}")
    if failed:
        click.echo("Error: some cells failed (see the log above and each cell's logs/); re-run to retry them",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
