"""--cvae-aggregation: how the clients' CVAEs become the server's generator (genfl_server/generator.py,
genfl_shared/ensemble.py), through the round engine with in-process clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genfl_server.engine import RoundModels
from genfl_server.generator import (LABEL_INPUT, MIN_CLASS_IMAGES, ClassShares, ClasswiseConditioning,
                                    DistilledDecoder, NoLabelCountsError, OwnModels, capped_shares)
from genfl_server.phases import PhaseContext, cvae_phase, synthetic_set
from genfl_server.runstate import RunState
from genfl_server.strategy import FedAvg
from genfl_shared.checkpoint import load_checkpoint
from genfl_shared.config import RunConfig
from genfl_shared.ensemble import ENSEMBLE_KIND, CVAEEnsemble, largest_remainder
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.partition import Shard
from helpers import run_rounds
from inprocess import federation

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
TINY = RunConfig().override(cvae_rounds=2, local_epochs=1, batch_size=16, synthetic_samples=60, seed=3)


def shard(client_id: str, classes: dict[int, int], seed: int = 0) -> Shard:
    """A shard of random images holding ``classes`` (class -> train images), 8 held out."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array(list(classes), dtype=np.int64), list(classes.values()))
    return Shard(client_id, seed, "mnist", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), labels,
                 rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), labels[:8].copy())


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- shares ------------------------------------------------------------------------------------------
def test_shares_follow_the_counts_and_no_client_takes_more_than_the_cap_of_a_class_others_hold():
    counts = torch.tensor([900.0, 100.0, 0.0], dtype=torch.float64)
    assert capped_shares(counts, 1.0).tolist() == pytest.approx([0.9, 0.1, 0.0])
    assert capped_shares(counts, 0.5).tolist() == pytest.approx([0.5, 0.5, 0.0])
    # The excess goes to the others by their counts, and cascades until nobody is above the cap.
    assert capped_shares(torch.tensor([800.0, 150.0, 50.0], dtype=torch.float64), 0.5).tolist() == pytest.approx(
        [0.5, 0.375, 0.125])
    assert capped_shares(torch.tensor([100.0, 0.0], dtype=torch.float64), 0.5).tolist() == [1.0, 0.0]  # sole holder
    assert capped_shares(torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64), 0.1).tolist() == pytest.approx(
        [1 / 3] * 3)  # three holders cannot stay below 1/3
    assert capped_shares(torch.zeros(2, dtype=torch.float64), 0.5).tolist() == [0.0, 0.0]


def test_class_shares_ignore_a_handful_beside_a_real_holder_and_clients_that_share_no_counts():
    few = MIN_CLASS_IMAGES - 1
    shares = ClassShares.from_counts({"a": [500, few] + [0] * 8, "b": [0, few, 300] + [0] * 7,
                                      "c": None}, cap=1.0)
    assert shares.clients == ("a", "b")  # c draws nothing
    assert shares.weights[:, 0].tolist() == [1.0, 0.0]
    assert shares.weights[:, 1].tolist() == [0.5, 0.5]  # nobody holds more than a handful: those few count
    assert shares.weights[:, 2].tolist() == [0.0, 1.0]
    assert shares.unheld == list(range(3, 10))
    kept = shares.restricted(["b"])
    assert kept.clients == ("b",) and kept.weights[0, :3].tolist() == [0.0, 1.0, 1.0]


# -- the ensemble generator ----------------------------------------------------------------------------
def _pattern_member(top_half: bool) -> dict[str, torch.Tensor]:
    """A CVAE whose decoder draws the same image whatever it is asked: the top or the bottom half lit."""
    state = initial_state("cvae", 0)
    state["decoder.4.weight"] = torch.zeros_like(state["decoder.4.weight"])
    bias = torch.full((28, 28), -20.0)
    bias[:14] = 20.0
    state["decoder.4.bias"] = (bias if top_half else bias.flip(0)).flatten()
    return state


def test_an_ensemble_draws_each_class_from_its_members_by_their_shares():
    weights = torch.zeros((2, 10), dtype=torch.float64)
    weights[0, :5] = 1.0  # member 0 (top half) draws classes 0-4
    weights[1, 5:] = 1.0
    weights[:, 9] = torch.tensor([0.25, 0.75])  # class 9 split
    ensemble = CVAEEnsemble([_pattern_member(True), _pattern_member(False)], weights)
    images, labels = ensemble.sample(200, seed=1, device=CPU)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 20))
    top = images[:, 0, :14].flatten(1).mean(1) == 1.0
    assert top[labels < 5].all() and not top[(labels >= 5) & (labels < 9)].any()
    assert int(top[labels == 9].sum()) == 5  # a quarter of its 20 images
    assert torch.equal(ensemble.sample(200, seed=1, device=CPU)[0], images)  # seeded
    assert largest_remainder(7, torch.tensor([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75


def test_an_ensemble_state_round_trips_and_a_malformed_one_is_refused():
    weights = torch.full((2, 10), 0.5, dtype=torch.float64)
    ensemble = CVAEEnsemble([_pattern_member(True), _pattern_member(False)], weights)
    back = CVAEEnsemble.from_state(ensemble.to_state())
    assert same(back.members[1], ensemble.members[1]) and torch.equal(back.class_weights, weights)
    with pytest.raises(ValueError, match="sum to 1"):
        CVAEEnsemble(ensemble.members, torch.full((2, 10), 0.4, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a CVAE state"):
        CVAEEnsemble([{"x": torch.zeros(1)}, ensemble.members[1]], weights)
    with pytest.raises(ValueError, match="unexpected entry"):
        CVAEEnsemble.from_state({**ensemble.to_state(), "evil": torch.zeros(1)})
    with pytest.raises(ValueError, match="class_weights must be"):
        CVAEEnsemble(ensemble.members, torch.full((2, 12), 0.5, dtype=torch.float64))
    renumbered = {k.replace("member1.", "member01."): v for k, v in ensemble.to_state().items()}
    with pytest.raises(ValueError, match="unexpected entry 'member01"):
        CVAEEnsemble.from_state(renumbered)


def test_a_malformed_ensemble_checkpoint_is_refused_before_the_run_starts(tmp_path):
    from genfl_server.app import ServerSettings, new_run_state
    from genfl_shared.checkpoint import CheckpointError, save_checkpoint
    from genfl_shared.config import PathSettings

    state = CVAEEnsemble([_pattern_member(True)], torch.ones((1, 10), dtype=torch.float64)).to_state()
    state["class_weights"] = torch.full((1, 10), 2.0, dtype=torch.float64)
    path = save_checkpoint(tmp_path / "cvae.pt", ENSEMBLE_KIND, state)
    settings = ServerSettings(config=TINY, out=tmp_path / "run", phase="classifier", preset="quick",
                              paths=PathSettings(cvae_checkpoint=path))
    with pytest.raises(CheckpointError, match="sum to 1"):
        new_run_state(settings)


def test_own_models_carry_each_clients_model_through_a_saved_state_whatever_its_id():
    models = {"site.a/1": initial_state("cvae", 1), "b": initial_state("cvae", 2)}
    saved = OwnModels(FedAvg(), models).state_dict()
    restored = OwnModels(FedAvg(), {})
    restored.load_state_dict(saved)
    assert restored.models.keys() == models.keys() and all(same(restored.models[c], models[c]) for c in models)


# -- the phase with in-process clients -----------------------------------------------------------------
SHARDS = (("alice", {0: 24, 1: 8}), ("bob", {1: 24}), ("carol", {2: 16, 3: 16}))


def _phase(tmp_path, mode: str, *, share=True, **settings):
    config = TINY.override(cvae_aggregation=mode, **settings)
    shards = [shard(cid, classes, seed) for seed, (cid, classes) in enumerate(SHARDS)]
    with federation(tmp_path, shards, seed=config.reproducibility.seed, share_label_counts=share) as fed:
        ctx = PhaseContext(fed.engine, fed.recorder, fed.metrics, config, tmp_path, CPU, None,
                           RunState.in_dir(tmp_path))
        generator = cvae_phase(ctx)
        synthetic = synthetic_set(ctx, generator)
    return fed, generator, synthetic


def test_ensemble_clients_each_train_on_from_their_own_model_and_each_class_comes_from_its_holders(tmp_path):
    fed, generator, (images, labels) = _phase(tmp_path, "ensemble", class_share_cap=1.0)
    for client in fed.clients.values():
        (round1,), (round2,) = client.updates("cvae", 1), client.updates("cvae", 2)
        assert same(round2.task.weights, round1.weights)  # its own round-1 model, not an average
        final = client.tasks("cvae", train=False)[-1]
        assert same(final.weights, round2.weights)  # and it evaluates its own last model
    ensemble = CVAEEnsemble.from_state(load_checkpoint(tmp_path / "cvae.pt", ENSEMBLE_KIND))
    assert same(ensemble.to_state(), generator)
    for index, cid in enumerate(("alice", "bob", "carol")):
        assert same(ensemble.members[index], fed.clients[cid].updates("cvae", 2)[0].weights)
    # Class 1: alice holds 8, bob 24 -> 1/4 and 3/4; classes nobody holds: every member equally.
    assert ensemble.class_weights[:, 1].tolist() == [0.25, 0.75, 0.0]
    assert ensemble.class_weights[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert ensemble.class_weights[:, 9].tolist() == pytest.approx([1 / 3] * 3)
    assert len(labels) == TINY.pretraining.synthetic_samples


def test_a_mode_that_needs_label_counts_refuses_a_run_where_no_client_shares_them(tmp_path):
    with pytest.raises(NoLabelCountsError, match="--share-label-counts"):
        _phase(tmp_path, "ensemble", share=False)


def test_a_client_that_shares_no_label_counts_trains_but_draws_no_class(tmp_path):
    fed, generator, _ = _phase(tmp_path, "ensemble", share=("alice", "bob"))
    ensemble = CVAEEnsemble.from_state(generator)
    assert len(ensemble.members) == 2  # carol's model is not sampled
    assert fed.clients["carol"].updates("cvae", 2)  # though she trained
    assert ensemble.class_weights[:, 2].tolist() == [0.5, 0.5]  # carol's classes: nobody reports them


def test_an_ensemble_keeps_no_model_the_guard_refused(tmp_path):
    config = TINY.override(cvae_aggregation="ensemble", cvae_rounds=1)
    shards = [shard(cid, classes, seed) for seed, (cid, classes) in enumerate(SHARDS)] + [shard("mallory", {4: 32}, 9)]
    poison = {"mallory": lambda task, weights: {k: v * 1000 if v.is_floating_point() else v
                                                for k, v in weights.items()}}
    with federation(tmp_path, shards, seed=3, share_label_counts=True, tamper=poison) as fed:
        ctx = PhaseContext(fed.engine, fed.recorder, fed.metrics, config, tmp_path, CPU, None, RunState.in_dir(tmp_path))
        ensemble = CVAEEnsemble.from_state(cvae_phase(ctx))
    assert fed.metrics.updates_rejected.labels("update_norm_adaptive")._value.get() == 1
    assert len(ensemble.members) == 3  # mallory's update was refused: she has no model to sample
    # The class she alone holds has no member: drawn from every member, and the round says so.
    assert ensemble.class_weights[:, 4].tolist() == pytest.approx([1 / 3] * 3)
    (record,) = run_rounds(tmp_path)
    assert record["post_aggregation"]["classes_without_member"] == [4]
    assert record["post_aggregation"]["kept"] == ["alice", "bob", "carol"]


def test_classwise_sets_each_label_column_to_its_holders_weighted_mean_and_averages_the_rest():
    models = {cid: initial_state("cvae", seed) for seed, cid in enumerate(("a", "b"))}
    shares = ClassShares.from_counts({"a": [30, 10] + [0] * 8, "b": [0, 30] + [0] * 8}, cap=1.0)
    aggregate = initial_state("cvae", 7)
    new, info = ClasswiseConditioning(shares)(1, aggregate, RoundModels(previous=aggregate, accepted=models))
    latent = new[LABEL_INPUT].shape[1] - 10
    assert torch.equal(new[LABEL_INPUT][:, latent], models["a"][LABEL_INPUT][:, latent])
    assert torch.allclose(new[LABEL_INPUT][:, latent + 1], 0.25 * models["a"][LABEL_INPUT][:, latent + 1]
                          + 0.75 * models["b"][LABEL_INPUT][:, latent + 1])
    assert torch.equal(new[LABEL_INPUT][:, latent + 2], aggregate[LABEL_INPUT][:, latent + 2])  # nobody holds 2
    assert torch.equal(new[LABEL_INPUT][:, :latent], aggregate[LABEL_INPUT][:, :latent])
    assert all(torch.equal(new[k], aggregate[k]) for k in aggregate if k != LABEL_INPUT)
    assert info == {"kind": "classwise", "classes": [0, 1]}


def test_distill_fits_only_the_decoder_to_the_clients_and_the_next_round_starts_from_it(tmp_path):
    fed, generator, _ = _phase(tmp_path, "distill", cvae_distill_steps=5)
    for client in fed.clients.values():
        (round1,), (round2,) = client.updates("cvae", 1), client.updates("cvae", 2)
        assert not same(round2.task.weights, round1.weights)
    starts = [c.updates("cvae", 2)[0].task.weights for c in fed.clients.values()]
    assert same(starts[0], starts[1]) and same(starts[1], starts[2])  # one global model again
    records = fed.recorder.export()
    assert "cvae-ensemble" not in str(records)
    assert set(generator) == set(initial_state("cvae", 0))  # one CVAE, sampled as today


def test_distilled_decoder_leaves_the_encoder_as_aggregated():
    models = {cid: initial_state("cvae", seed) for seed, cid in enumerate(("a", "b"))}
    shares = ClassShares.from_counts({"a": [30] + [0] * 9, "b": [0, 30] + [0] * 8}, cap=1.0)
    aggregate = initial_state("cvae", 7)
    new, info = DistilledDecoder(shares, steps=40, seed=0, device=CPU)(1, aggregate,
                                                                          RoundModels(aggregate, models))
    assert all(torch.equal(new[k], aggregate[k]) for k in aggregate if k.startswith("encoder."))
    assert info["kind"] == "distill" and info["teachers"] == 2 and info["classes"] == [0, 1]
    assert info["last_loss"] < 0.5 * info["first_loss"]
    # Class 0 now decodes as its holder's decoder does, and closer than before.
    z, zeros = torch.randn((64, 3), generator=torch.Generator().manual_seed(1)), torch.zeros(64, dtype=torch.int64)
    decode = {name: model_from_state("cvae", state, CPU).eval().decode(z, zeros).detach()
              for name, state in (("before", aggregate), ("after", new), ("holder", models["a"]))}
    assert (decode["after"] - decode["holder"]).pow(2).mean() < (decode["before"] - decode["holder"]).pow(2).mean()


# -- the report beside FedAvg --------------------------------------------------------------------------
def _sweep_folder(path, mode, accuracies, cas_md=None):
    """A genfl-sweep folder's results.csv (pre-trained arm, α=0.01) and sweep.json."""
    import csv
    import json

    from genfl_experiments.reports import CSV_FIELDS

    path.mkdir()
    fixed = {"dataset": "mnist", "preset": "quick", "clients": 10}
    if mode != "fedavg":
        fixed["generator_options"] = [["--cvae-aggregation", mode]]
    (path / "sweep.json").write_text(json.dumps({"fixed": fixed}))
    with open(path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for seed, rounds in accuracies.items():
            for rnd, acc in enumerate(rounds, 1):
                writer.writerow({"distribution": "alpha-0.01", "seed": seed, "arm": "pretrained",
                                 "phase": "classifier", "round": rnd, "weighted_client_accuracy": acc,
                                 "test_accuracy": acc + 0.01, "epsilon": ""})
    if cas_md:
        (path / "cas.md").write_text(cas_md)
    return path


def test_the_generator_report_pairs_each_seed_with_fedavg_and_gives_the_slope_per_round(tmp_path):
    from genfl_experiments.compare_generators import NotComparable, compare, plot_per_round

    fedavg = _sweep_folder(tmp_path / "fedavg", "fedavg", {0: [0.40, 0.44], 1: [0.30, 0.32]},
                           "| Distribution | CAS | Federated CAS | n | Seeds |\n|---|---|---|---|---|\n"
                           "| α=0.01 | 39.24 ± 2.32 | 38.50 ± 1.83 | 3 | 0,1,2 |\n")
    ensemble = _sweep_folder(tmp_path / "ensemble", "ensemble", {0: [0.80, 0.78], 1: [0.70, 0.66]})
    lines = compare(fedavg, ensemble)
    fed_row, ens_row = lines[2], lines[3]
    assert fed_row.startswith("| α=0.01 | fedavg | 39.24 ± 2.32 | 38.50 ± 1.83 | 38.00 ± 8.49 ")
    # Δ per seed: 0.78 - 0.44 and 0.66 - 0.32, both 34 pp; slopes -2 and -4 pp per round.
    assert "| ensemble | – | – | 72.00 ± 8.49 | 73.00 ± 8.49 | 34.00 ± 0.00 | 34.00 ± 0.00 | -3.00 ± 1.41 | 0,1 |" in ens_row
    with pytest.raises(NotComparable, match="not FedAvg's"):
        compare(ensemble, ensemble)
    other = _sweep_folder(tmp_path / "other", "ensemble", {0: [0.5]})
    (other / "sweep.json").write_text((other / "sweep.json").read_text().replace('"clients": 10', '"clients": 20'))
    with pytest.raises(NotComparable, match="differ in clients"):
        compare(fedavg, other)
    png = plot_per_round(fedavg, ensemble, tmp_path / "per_round.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_genfl_launch_refuses_a_generator_comparison_it_cannot_run(tmp_path):
    from click.testing import CliRunner

    from genfl_experiments.launch import main

    base = ["--data-root", str(tmp_path), "--iid", "--out", str(tmp_path / "out")]
    alone = CliRunner().invoke(main, [*base, "--compare-generator", "ensemble"])
    assert alone.exit_code == 2 and "--compare-generator goes with --compare" in alone.output
    twice = CliRunner().invoke(main, [*base, "--compare", "--compare-generator", "ensemble",
                                      "--cvae-aggregation", "distill"])
    assert twice.exit_code == 2 and "leave out --cvae-aggregation" in twice.output


def test_the_one_shot_form_trains_one_cvae_round_of_its_own_epochs_and_the_classifier_keeps_local_epochs(tmp_path):
    fed, generator, _ = _phase(tmp_path, "ensemble", cvae_rounds=1, cvae_local_epochs=3)
    for client in fed.clients.values():
        (update,) = [s for s in client.sent if s.weights is not None]
        assert update.task.round == 1 and update.task.settings.epochs == 3
    assert len(CVAEEnsemble.from_state(generator).members) == 3
    from genfl_server.phases import train_task

    config = TINY.override(cvae_local_epochs=3)
    assert train_task(config, "classifier").epochs == TINY.training.local_epochs
