"""Robust aggregation under a poisoning client, with real training on real MNIST images.

Five clients train a small softmax classifier on 200 MNIST images each (plain SGD, in-process);
one of them replaces its update by a poisoned one. Every robust strategy must keep the test
accuracy within a few points of its clean run (Krum keeps one client's model, so its own clean run
is the reference), while plain FedAvg (with no update bounds) breaks.
The model is deliberately small so the whole matrix runs in well under a minute on one CPU core;
the strategies only see state_dicts, so nothing here depends on the model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genfl_server.strategy import build_strategy
from genfl_shared.config import RunConfig
from genfl_shared.data import load_dataset, to_float_images

pytestmark = pytest.mark.unit

CLIENTS, PER_CLIENT, ROUNDS, LOCAL_STEPS = 5, 200, 5, 20
TOLERANCE = 0.08  # "a few points": sign flips shift a median by one order statistic per weight
ATTACKS = ("scaled", "sign_flipped", "random")
ROBUST = {"median": {}, "trimmed_mean": {"trim_fraction": 0.2}, "krum": {"krum_byzantine": 1, "krum_select": 1},
          "multi_krum": {"krum_byzantine": 1, "krum_select": 3}}


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: on a shared machine, intra-op threads cost a hundred times what they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist(data_root):
    images, labels = load_dataset("mnist", data_root("mnist"), "train")
    test_images, test_labels = load_dataset("mnist", data_root("mnist"), "test")
    n = CLIENTS * PER_CLIENT
    return (to_float_images(images[:n]), labels[:n]), (to_float_images(test_images[:1000]), test_labels[:1000])


def _local_update(global_state, x, y, seed: int):
    torch.manual_seed(seed)
    model = _model()
    model.load_state_dict(global_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(LOCAL_STEPS):
        batch = torch.randint(0, len(y), (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _poisoned(attack: str, global_state, honest_update, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if attack == "scaled":  # boosted update (model replacement)
        return {k: g + 50.0 * (honest_update[k] - g) for k, g in global_state.items()}
    if attack == "sign_flipped":  # the update pushed the other way, boosted
        return {k: g - 10.0 * (honest_update[k] - g) for k, g in global_state.items()}
    return {k: 10.0 * torch.randn(g.shape, generator=gen) for k, g in global_state.items()}


def _accuracy(state, test) -> float:
    model = _model()
    model.load_state_dict(state)
    with torch.no_grad():
        return (model(test[0]).argmax(1) == test[1]).float().mean().item()


def _federated_accuracy(mnist, strategy_name: str, params: dict, attack: str | None) -> float:
    (x, y), test = mnist
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    strategy = build_strategy(RunConfig().override(strategy=strategy_name, **params).aggregation.strategy_settings())
    for rnd in range(ROUNDS):
        strategy.begin(state)
        for client in range(CLIENTS):
            part = slice(client * PER_CLIENT, (client + 1) * PER_CLIENT)
            update = _local_update(state, x[part], y[part], seed=100 * rnd + client)
            if attack is not None and client == 0:
                update = _poisoned(attack, state, update, seed=rnd)
            strategy.accumulate(update, PER_CLIENT)
        state = strategy.finish()
    return _accuracy(state, test)


@pytest.fixture(scope="module")
def clean_runs(mnist):
    """Clean-run accuracy by variant ('fedavg' and each of ROBUST), computed once each."""
    cache: dict[str, float] = {}

    def clean(variant: str) -> float:
        if variant not in cache:
            name, params = _variant(variant)
            cache[variant] = _federated_accuracy(mnist, name, params, None)
            assert cache[variant] > 0.7, f"the clean {variant} run must learn (accuracy {cache[variant]:.3f})"
        return cache[variant]
    return clean


def _variant(variant: str) -> tuple[str, dict]:
    if variant == "fedavg":
        return "fedavg", {}
    return ("krum" if variant == "multi_krum" else variant), ROBUST[variant]


@pytest.mark.parametrize("attack", ATTACKS)
def test_plain_fedavg_is_broken_by_one_poisoning_client(mnist, clean_runs, attack):
    accuracy = _federated_accuracy(mnist, "fedavg", {}, attack)
    clean = clean_runs("fedavg")
    assert accuracy < clean - 0.2, f"{attack}: fedavg {accuracy:.3f} vs clean {clean:.3f}"


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("variant", sorted(ROBUST))
def test_robust_strategies_withstand_one_poisoning_client(mnist, clean_runs, variant, attack):
    accuracy = _federated_accuracy(mnist, *_variant(variant), attack)
    clean = clean_runs(variant)
    assert accuracy > clean - TOLERANCE, f"{variant}/{attack}: {accuracy:.3f} vs clean {clean:.3f}"
    # And not far below what plain FedAvg reaches without any attacker.
    assert accuracy > clean_runs("fedavg") - 0.15, f"{variant}/{attack}: {accuracy:.3f}"
