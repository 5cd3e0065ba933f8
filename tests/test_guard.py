"""The update guard's pieces, and that its defaults never touch an honest run (tiny size; the
measurement at a larger one is benchmarks/bench_honest_update_norms.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genfl_server.guard import DEFAULT_MAX_CLIENT_WEIGHT_SHARE, UpdateGuard, capped_weights, validated_metrics
from genfl_server.updates import update_distance
from genfl_server.strategy import FedAvg
from genfl_shared.config import PRESETS, GuardSettings
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.errors import Rejected
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.partition import dirichlet_partition, iid_partition
from genfl_shared.training import train_classifier, train_cvae

pytestmark = pytest.mark.unit


def test_capped_weights_cut_only_the_client_beyond_the_share():
    honest = {"a": 300, "b": 200, "c": 100}
    assert capped_weights(honest, 0.5) == {"a": 300.0, "b": 200.0, "c": 100.0}  # 0.5 exactly: untouched
    weights = capped_weights({**honest, "m": 10**6}, 0.5)
    assert weights["m"] == pytest.approx(600) and weights["a"] == 300
    assert weights["m"] / sum(weights.values()) == pytest.approx(0.5)
    two = capped_weights({"a": 1, "b": 1000}, 0.5)  # two clients: a cap would bind on honest splits
    assert two == {"a": 1.0, "b": 1000.0}
    three = capped_weights({"a": 1000, "b": 900, "c": 100}, 0.4)  # two clients above the cut
    assert three["a"] == pytest.approx(three["b"]) and max(three.values()) / sum(three.values()) == pytest.approx(0.4)
    assert capped_weights({"a": 5, "b": 1, "c": 1}, 0.2) == {"a": 1.0, "b": 1.0, "c": 1.0}  # share < 1/K


def test_the_guard_is_built_from_its_settings_group_where_0_and_1_switch_bounds_off():
    assert UpdateGuard.from_config(PRESETS["paper"].guard) == UpdateGuard()
    guard = UpdateGuard.from_config(GuardSettings(max_update_norm=2.5, clip_updates=True, update_norm_factor=0,
                                                  max_client_weight_share=1.0))
    assert (guard.max_update_norm, guard.clip, guard.norm_factor, guard.max_weight_share) == (2.5, True, None, None)


@pytest.mark.parametrize("metrics", [{"loss": math.nan}, {"loss": math.inf}, {"loss": -0.1}, {"accuracy": 1.5},
                                     {"accuracy": -1e9}, {"steps": -1.0}, {"name": 1.0}, {"x" * 10**6: 1.0},
                                     {"loss": 1.0, "accuracy": 0.5, "train_seconds": 1.0, "steps": 2.0, "more": 1.0}])
def test_validated_metrics_refuses(metrics):
    with pytest.raises(Rejected) as info:
        validated_metrics(metrics)
    assert info.value.reason == "bad_metrics"
    assert len(str(info.value)) < 300  # a 1 MB name is not echoed back


def test_validated_metrics_passes_what_the_client_sends():
    sent = {"loss": 0.25, "accuracy": 1.0, "train_seconds": 3.5, "steps": 62.0}
    assert validated_metrics(sent) == sent


def test_clipping_scales_the_step_to_the_bound():
    start = {"w": torch.zeros(4), "n": torch.tensor(3)}
    round_guard = UpdateGuard(max_update_norm=1.0, clip=True, norm_factor=None).round(start, {"a": 10})
    weight, clipped = round_guard.admit("a", 10, {"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "n": torch.tensor(5)})
    assert weight == 10 and round_guard.offenders() == {}
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert update_distance(clipped, start) == pytest.approx(1.0)
    assert int(clipped["n"]) == 5  # integer buffers are not part of the step


@pytest.fixture(scope="module")
def mnist(data_root):
    images, labels = load_dataset("mnist", data_root("mnist"), "train")
    return to_float_images(images[:2000]), labels[:2000]


@pytest.mark.parametrize("distribution", ["iid", 0.1, 0.01])
def test_default_bounds_never_touch_honest_updates(mnist, distribution):
    """Real local training (quick preset settings, one epoch) of both models on 5 tiny shards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = mnist
        cfg = PRESETS["quick"]
        pool = np.arange(400)
        parts = (iid_partition(len(pool), 5, 0) if distribution == "iid"
                 else dirichlet_partition(labels[pool].numpy(), 5, distribution, 0, min_samples=10))
        counts = {f"c{i}": len(p) for i, p in enumerate(parts)}
        guard = UpdateGuard()
        for kind in ("cvae", "classifier"):
            state = initial_state(kind, 0)
            round_guard = guard.round(state, counts)
            strategy = FedAvg()
            strategy.begin(state)
            for i, (client_id, part) in enumerate(zip(counts, parts)):
                model = model_from_state(kind, state, torch.device("cpu"))
                x, y = images[part], labels[part]
                if kind == "cvae":
                    train_cvae(model, x, y, epochs=1, batch_size=cfg.training.batch_size, lr=cfg.training.cvae_lr, seed=i, device="cpu")
                else:
                    train_classifier(model, x, y, epochs=1, batch_size=cfg.training.batch_size, optimizer="sgd",
                                     lr=cfg.training.classifier_lr, momentum=cfg.training.sgd_momentum, seed=i, device="cpu")
                update = {k: v.detach() for k, v in model.state_dict().items()}
                weight, admitted = round_guard.admit(client_id, len(part), update)
                assert max(counts.values()) / sum(counts.values()) < DEFAULT_MAX_CLIENT_WEIGHT_SHARE
                assert weight == len(part)  # no weight cut
                assert admitted is update
                strategy.accumulate(admitted, weight)
            assert round_guard.offenders() == {}, (kind, round_guard.distances)
            assert round_guard.check_aggregate(strategy.finish()) == {}
            assert round_guard.ratio_to_median() < guard.norm_factor / 2, round_guard.distances
    finally:
        torch.set_num_threads(threads)


def _float64_distance(update, reference) -> float:
    """The distance as a whole-tensor float64 computation: what the blocked one must agree with."""
    return math.sqrt(sum(float(torch.sum((update[k].double() - ref.double()) ** 2))
                         for k, ref in reference.items() if ref.is_floating_point()))


def test_update_distance_over_many_blocks_matches_float64_on_received_views():
    from genfl_server.updates import DISTANCE_BLOCK_ELEMENTS
    from genfl_shared.codec import decode_payload, encode_state_dict

    generator = torch.Generator().manual_seed(0)
    reference = {"big": torch.randn(3 * DISTANCE_BLOCK_ELEMENTS + 17, generator=generator),  # partial last block
                 "matrix": torch.randn(300, 7, generator=generator),
                 "count": torch.tensor(4), "empty": torch.zeros(0)}
    sent = {k: (v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 1)
            for k, v in reference.items()}
    payload = encode_state_dict(sent)
    received = decode_payload(payload.manifest, payload.chunks)  # views of the received bytes
    expected = _float64_distance(sent, reference)
    assert update_distance(received, reference) == pytest.approx(expected, rel=1e-9)
    assert update_distance(reference, reference) == 0.0
    # The update's bytes are read, never written.
    assert all(torch.equal(received[k], sent[k]) for k in sent)


@pytest.mark.parametrize("value", [math.nan, math.inf, 3e38])
def test_update_distance_of_absurd_values_is_not_small(value):
    reference = {"w": torch.zeros(2 * 65536)}
    update = {"w": torch.zeros(2 * 65536)}
    update["w"][70000] = value
    distance = update_distance(update, reference)
    assert math.isnan(distance) or distance >= 3e38
