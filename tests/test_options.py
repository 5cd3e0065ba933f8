"""One source for run options: every CLI spells, bounds, documents and reads (GENFL_*) a run setting
the same way; presets apply in one place; to_argv round-trips through the server's parser; renamed
options and fields still work; --resume refuses a setting that would change the run's results."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from conftest import dataset_dir
from genfl_experiments import centralised, launch
from genfl_experiments.sweep import cli as sweep_cli
from genfl_experiments.centralised import CENTRALISED_FIELDS
from genfl_experiments.sweep.arms import STRATEGY_LABELS
from genfl_experiments.sweep.run import FIXED_SERVER_FIELDS
from genfl_server import cli as server_cli
from genfl_server.app import new_run_state, settings_from_saved
from genfl_server.strategy import STRATEGIES, FedAvg, build_strategy, register_strategy, strategy_labels, strategy_names
from genfl_shared import partition_cli
from genfl_shared.cli_settings import given_run_options, resolve_config
from genfl_shared.config import (LEGACY_FIELD_NAMES, PRESETS, ROUNDS, STRATEGY_NAMES, PathSettings, RunConfig,
                                 StrategySettings, UnknownSettingError, setting_fields)

pytestmark = pytest.mark.unit

COMMANDS = {"genfl-server": server_cli.main, "genfl-launch": launch.main, "genfl-sweep": sweep_cli.main,
            "genfl-centralised": centralised.main, "genfl-partition": partition_cli.main}
RUN_OPTION_NAMES = RunConfig.field_names() | {ROUNDS}
FIELD_HELP = {name: f.metadata["option"].help for name, f in setting_fields().items()}
RESULTS = Path(__file__).resolve().parent.parent / "results"


def _run_params(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name in RUN_OPTION_NAMES}


def _spelling(param: click.Option) -> tuple:
    return (tuple(param.opts), tuple(param.secondary_opts), json.dumps(param.type.to_info_dict(), sort_keys=True),
            param.envvar, param.default, param.is_flag)


def test_every_cli_spells_each_run_option_the_same():
    seen: dict[str, dict[str, tuple]] = {}
    for command_name, command in COMMANDS.items():
        for name, param in _run_params(command).items():
            seen.setdefault(name, {})[command_name] = _spelling(param)
            assert param.envvar == "GENFL_" + name.upper()
            if name != ROUNDS:
                assert param.help.startswith(FIELD_HELP[name]), (command_name, name)
    for name, spellings in seen.items():
        assert len(set(spellings.values())) == 1, f"{name} differs between CLIs: {spellings}"
    # The options that had drifted are now shared by every CLI that takes them.
    assert set(seen["train_subset"]) == {"genfl-launch", "genfl-sweep", "genfl-centralised", "genfl-partition"}
    assert {"genfl-server", "genfl-launch", "genfl-sweep", "genfl-centralised"} <= set(seen["cvae_rounds"])
    assert {"genfl-server", "genfl-launch", "genfl-sweep", "genfl-centralised"} <= set(seen["local_epochs"])
    local_epochs = _run_params(sweep_cli.main)["local_epochs"].type
    assert (local_epochs.min, local_epochs.max) == (0, None)  # 0: the pretrained-only arm
    # genfl-sweep gives its centralised cells exactly the settings genfl-centralised takes.
    assert set(_run_params(centralised.main)) == {*CENTRALISED_FIELDS, "seed"}


def test_help_of_a_run_option_states_the_presets_values():
    cvae_rounds = _run_params(server_cli.main)["cvae_rounds"]
    assert "[preset: paper 20, quick 10]" in cvae_rounds.help
    assert "[preset" not in _run_params(partition_cli.main)["train_subset"].help  # genfl-partition has no presets


def test_strategy_choices_and_labels_come_from_the_registry():
    assert strategy_names()[:3] == ["fedavg", "fedprox", "fedavgm"]  # FedAvg first; others may follow
    assert list(_run_params(server_cli.main)["strategy"].type.choices) == strategy_names()
    assert list(_run_params(launch.main)["strategy"].type.choices) == strategy_names()
    assert list(STRATEGY_LABELS) == strategy_names() and STRATEGY_LABELS["fedavgm"] == "FedAvgM"


def test_a_registered_strategy_is_built_by_name_from_its_settings():
    @register_strategy
    class Halving(FedAvg):
        name, label = "test-halving", "Halving"
        takes = ("prox_mu",)

        def __init__(self, prox_mu: float):
            super().__init__()
            self.mu = prox_mu

    try:
        built = build_strategy(StrategySettings("test-halving", {"prox_mu": 0.25}))
        assert isinstance(built, Halving) and built.mu == 0.25
        assert strategy_labels()["test-halving"] == "Halving"
        with pytest.raises(ValueError, match="registered twice"):
            register_strategy(Halving)
        with pytest.raises(ValueError, match="takes prox_mu, not prox_nu"):
            build_strategy(StrategySettings("test-halving", {"prox_nu": 0.25}))
    finally:
        del STRATEGIES["test-halving"]
    run = RunConfig().override(strategy="fedavgm", fedavgm_lr=0.5, fedavgm_momentum=0.25)
    fedavgm = build_strategy(run.aggregation.strategy_settings())
    assert (fedavgm.lr, fedavgm.momentum) == (0.5, 0.25)


def test_every_strategy_takes_exactly_the_run_settings_given_for_it():
    """The run settings that feed a strategy (``strategy_option``) and the settings the strategy
    declares (``takes``) name the same parameters; another strategy's are never passed."""
    for name in STRATEGY_NAMES:
        chosen = RunConfig().override(strategy=name).aggregation.strategy_settings()
        assert chosen.name == name and set(chosen.options) == set(STRATEGIES[name].takes), name
        build_strategy(chosen)
    with pytest.raises(ValueError, match="'fedavg' takes no settings, not prox_mu"):
        build_strategy(StrategySettings("fedavg", {"prox_mu": 0.5}))


def test_a_misspelt_setting_is_refused_not_ignored():
    for refuse in (lambda: RunConfig().override(prox_mew=0.5), lambda: RunConfig().replace_settings(prox_mew=1),
                   lambda: RunConfig.from_dict({"prox_mew": 0.5}), lambda: resolve_config("paper", {"prox_mew": 0.5}),
                   lambda: RunConfig().to_argv(["prox_mew"])):
        with pytest.raises(UnknownSettingError, match="unknown run setting 'prox_mew'; did you mean 'prox_mu'"):
            refuse()


def test_to_dict_is_the_flat_settings_in_definition_order_and_round_trips():
    config = _every_setting_changed()
    assert list(config.to_dict()) == list(setting_fields())
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict()["krum_select"] == config.aggregation.krum_select == config.setting("krum_select")


def test_preset_resolution():
    quick = PRESETS["quick"]
    assert resolve_config("quick", {}) == quick
    assert resolve_config("quick", {"cvae_rounds": None, "seed": None}) == quick
    both = resolve_config("paper", {ROUNDS: 3})
    assert (both.training.cvae_rounds, both.training.classifier_rounds) == (3, 3)
    one = resolve_config("paper", {ROUNDS: 3, "classifier_rounds": 7})
    assert (one.training.cvae_rounds, one.training.classifier_rounds) == (3, 7)  # an explicit phase's rounds win
    assert resolve_config("quick", {"train_subset": 0}).data.train_subset is None  # 0: all
    assert resolve_config("quick", {"train_subset": 500}).data.train_subset == 500
    assert resolve_config("paper", {"pretrain": False}).pretraining.pretrain is False
    with pytest.raises(click.BadParameter, match="unknown preset"):
        resolve_config("huge", {})


def _server_context(*args: str) -> click.Context:
    return server_cli.main.make_context("genfl-server", list(args))


def _resolve(ctx: click.Context):
    explicit = {n for n in ctx.params if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE}
    return server_cli.resolve_settings(dict(ctx.params), explicit)


def _every_setting_changed() -> RunConfig:
    changed = {}
    for name, value in RunConfig().to_dict().items():
        if isinstance(value, bool):
            changed[name] = not value
        elif name == "strategy":
            changed[name] = "fedavgm"
        elif isinstance(value, float):
            changed[name] = value / 3  # an inexact float: str() must round-trip it
        elif isinstance(value, int):
            changed[name] = value + 1
    return RunConfig().override(**changed)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_to_argv_round_trips_through_the_servers_parser(tmp_path, preset):
    config = _every_setting_changed()
    settings, _ = _resolve(_server_context("--out", str(tmp_path), "--preset", preset, *config.to_argv()))
    # The server records the partitioner's train_subset (none here), not one it is given.
    assert settings.config == config.replace_settings(train_subset=None)


def test_sweep_servers_get_the_options_recorded_sweeps_were_run_with():
    # sweep.json's "fixed" decides whether a folder's cells can be resumed: it must not change.
    recorded = json.loads((RESULTS / "mnist-quick-mitigation" / "sweep.json").read_text())["fixed"]
    assert [list(o) for o in PRESETS["quick"].to_options(FIXED_SERVER_FIELDS)] == recorded["server_options"]


def test_deprecated_spellings_work_and_warn(tmp_path, capsys, monkeypatch):
    settings, _ = _resolve(_server_context("--out", str(tmp_path), "--server-lr", "0.01",
                                           "--classifier-momentum", "0.25", "--server-batch-size", "64"))
    config = settings.config
    assert (config.pretraining.pretrain_lr, config.training.sgd_momentum, config.pretraining.pretrain_batch_size) == \
        (0.01, 0.25, 64)
    err = capsys.readouterr().err
    for old, new in (("--server-lr", "--pretrain-lr"), ("--classifier-momentum", "--sgd-momentum"),
                     ("--server-batch-size", "--pretrain-batch-size")):
        assert f"{old} is deprecated" in err and f"use {new}" in err
    monkeypatch.setenv("GENFL_SERVER_LR", "0.02")  # a container's old variable
    settings, _ = _resolve(_server_context("--out", str(tmp_path)))
    assert settings.config.pretraining.pretrain_lr == 0.02 and "--server-lr is deprecated" in capsys.readouterr().err
    monkeypatch.delenv("GENFL_SERVER_LR")
    with pytest.raises(click.UsageError, match="same option"):
        given_run_options(dict(_server_context("--out", str(tmp_path), "--server-lr", "0.01",
                                               "--pretrain-lr", "0.02").params))


def test_saved_configs_with_old_field_names_still_load():
    old_name = {new: old for old, new in LEGACY_FIELD_NAMES.items()}
    old = {old_name.get(k, k): v for k, v in RunConfig().override(seed=4).to_dict().items()}
    assert {"server_lr", "server_batch_size", "classifier_momentum"} <= set(old)
    assert RunConfig.from_dict(old) == RunConfig().override(seed=4)
    with pytest.raises(ValueError, match="unknown run setting"):
        RunConfig.from_dict({**RunConfig().to_dict(), "no_such_setting": 1})


def _saved_run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "run"
    settings, _ = _resolve(_server_context("--out", str(out), "--dataset", "mnist", "--test-data", str(dataset_dir("mnist")),
                                           "--threads", "1", "--deterministic", "--seed", "3", *args))
    new_run_state(settings).save(recorder_state={})
    return out


def test_resume_reuses_the_saved_settings(tmp_path):
    out = _saved_run(tmp_path, "--cvae-rounds", "2")
    settings, _ = _resolve(_server_context("--resume", "--out", str(out), "--address", "127.0.0.1:0",
                                           "--log-level", "debug", "--round-retries", "5", "--threads", "1"))
    assert settings.resume and settings.threads == 1 and settings.paths.test_data is not None
    config = settings.config
    assert config.reproducibility.deterministic and config.reproducibility.seed == 3 and config.training.cvae_rounds == 2
    assert (settings.address, settings.round_retries) == ("127.0.0.1:0", 5)  # these may change


def test_saved_settings_keep_the_paths_flat_and_resume(tmp_path):
    # progress["settings"] of a run state, exactly as servers write it: a saved run must resume
    # whatever groups the settings are arranged in.
    saved = {"phase": "classifier", "preset": "quick", "config": PRESETS["quick"].override(seed=3).to_dict(),
             "dataset": "mnist", "alpha": 0.1, "test_data": "/data/mnist", "partition_info": "/shards/partition.json",
             "cvae_checkpoint": "/runs/cvae/cvae.pt", "pretrained_checkpoint": None, "device": "cpu", "threads": 1,
             "round_timeout": None, "min_fit_clients": None}
    settings = settings_from_saved(saved, out=tmp_path, resume=True)
    assert settings.paths == PathSettings(test_data=Path("/data/mnist"), partition_info=Path("/shards/partition.json"),
                                          cvae_checkpoint=Path("/runs/cvae/cvae.pt"))
    assert settings.config == PRESETS["quick"].override(seed=3) and settings.threads == 1
    assert settings.saved() == saved and list(settings.saved()) == list(saved)  # saved again the same way
    # A path left out was not given.
    older = {name: value for name, value in saved.items() if name not in PathSettings().saved()}
    assert settings_from_saved(older, out=tmp_path).paths == PathSettings()


@pytest.mark.parametrize("option", [["--threads", "2"], ["--seed", "4"], ["--no-deterministic"], ["--rounds", "2"],
                                    ["--device", "cuda"], ["--preset", "quick"], ["--strategy", "fedprox"]])
def test_resume_refuses_an_option_that_changes_results(tmp_path, option):
    out = _saved_run(tmp_path, "--cvae-rounds", "2")
    with pytest.raises(click.UsageError, match="differs from the run being resumed"):
        _resolve(_server_context("--resume", "--out", str(out), *option))
