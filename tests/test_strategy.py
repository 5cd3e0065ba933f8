"""FedAvg against a hand-computed sample-weighted mean of real ExquisiteNetV1 state_dicts."""

from __future__ import annotations

import math

import pytest
import torch

from genfl_server.strategy import ClientTrainSettings, FedAvg, build_strategy
from genfl_shared.config import RunConfig, StrategySettings
from genfl_shared.models import build_model
from genfl_shared.proto import genfl_pb2 as pb

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def global_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model("classifier").state_dict().items()}


def _updates(global_state, counters):
    """Three perturbed copies of the global model; BatchNorm statistics moved like training would."""
    gen = torch.Generator().manual_seed(1)
    updates = []
    for c, counter in enumerate(counters):
        update = {}
        for i, (name, value) in enumerate(global_state.items()):
            if name.endswith("num_batches_tracked"):
                update[name] = torch.tensor(counter + 3 * (i % 5), dtype=torch.int64)
            elif name.endswith("running_var"):
                update[name] = value * torch.empty(value.shape).uniform_(0.5, 2.0, generator=gen)
            else:
                update[name] = value + (c + 1) * torch.randn(value.shape, generator=gen)
        updates.append(update)
    return updates


def _clones(state):
    return {k: v.clone() for k, v in state.items()}


def test_fedavg_is_the_sample_weighted_mean(global_state):
    counters = (10, 11, 20)
    samples = (1, 1, 1)
    updates = _updates(global_state, counters)
    snapshot = [_clones(u) for u in updates]
    global_snapshot = _clones(global_state)

    fedavg = build_strategy(StrategySettings("fedavg"))
    assert isinstance(fedavg, FedAvg)
    fedavg.begin(global_state)
    for update, n in zip(updates, samples):
        fedavg.accumulate(update, n)
    assert fedavg.total_samples == 3
    result = fedavg.finish()
    assert list(result) == list(global_state)
    for name, value in result.items():
        assert value.dtype == global_state[name].dtype and value.shape == global_state[name].shape, name
    # Inputs are left alone.
    for update, snap in zip(updates, snapshot):
        assert all(torch.equal(update[k], snap[k]) for k in snap)
    assert all(torch.equal(global_state[k], global_snapshot[k]) for k in global_state)
    # Counters: 41/3 = 13.67 -> 14 (not 13, as truncation would give).
    for name in (k for k in global_state if k.endswith("num_batches_tracked")):
        exact = sum(u[name].item() * n for u, n in zip(updates, samples)) / sum(samples)
        assert result[name].dtype == torch.int64
        assert result[name].item() == round(exact)


@pytest.mark.parametrize("samples", [(600, 300, 100), (7, 2, 5)])
def test_fedavg_weighted_mean_of_three_real_updates(global_state, samples):
    counters = (1, 2, 56)  # weighted means 6.8 and 20.79 (+ a per-layer integer offset): round up
    updates = _updates(global_state, counters)
    fedavg = FedAvg()
    fedavg.begin(global_state)
    for update, n in zip(updates, samples):
        fedavg.accumulate(update, n)
    result = fedavg.finish()
    total = sum(samples)

    bn_keys = [k for k in global_state if k.endswith(("running_mean", "running_var"))]
    assert bn_keys, "ExquisiteNetV1 has BatchNorm statistics"
    float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
    int_keys = [k for k, v in global_state.items() if not v.is_floating_point()]
    assert int_keys and all(global_state[k].dtype == torch.int64 for k in int_keys)

    for name in float_keys:
        expected = sum(u[name].double() * n for u, n in zip(updates, samples)) / total
        assert result[name].dtype == torch.float32
        torch.testing.assert_close(result[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    # The weights matter: the unweighted mean is clearly different for the perturbed weights.
    conv = next(k for k in float_keys if k.endswith("weight") and global_state[k].numel() > 100)
    plain = sum(u[conv].double() for u in updates) / 3
    assert (result[conv].double() - plain).abs().max() > 0.1

    rounding_mattered = False
    for name in int_keys:
        exact = sum(u[name].item() * n for u, n in zip(updates, samples)) / total
        assert result[name].dtype == torch.int64
        assert result[name].item() == round(exact), name
        rounding_mattered |= round(exact) != math.floor(exact)
    assert rounding_mattered, "choose numbers where rounding and truncation differ"


def test_counter_rounding_hand_picked():
    template = {"a": torch.tensor(0), "b": torch.tensor([0, 0]), "w": torch.zeros(2)}
    fedavg = FedAvg()
    fedavg.begin(template)
    fedavg.accumulate({"a": torch.tensor(100), "b": torch.tensor([0, 5]), "w": torch.tensor([1.0, 0.0])}, 1)
    fedavg.accumulate({"a": torch.tensor(101), "b": torch.tensor([0, 6]), "w": torch.tensor([4.0, 0.0])}, 2)
    fedavg.accumulate({"a": torch.tensor(103), "b": torch.tensor([1, 6]), "w": torch.tensor([0.0, 3.0])}, 4)
    result = fedavg.finish()
    # a: (100 + 202 + 412) / 7 = 102 exactly; b[0]: 4/7 = 0.57 -> 1 and b[1]: (5+12+24)/7 = 5.86 -> 6,
    # where truncation would give 0 and 5.
    assert result["a"].dtype == torch.int64 and result["a"].item() == 102
    assert result["b"].dtype == torch.int64 and result["b"].tolist() == [1, 6]
    torch.testing.assert_close(result["w"], torch.tensor([9.0 / 7, 12.0 / 7]))


def test_half_precision_entries_keep_their_dtype():
    template = {"h": torch.zeros(3, dtype=torch.float16), "bf": torch.zeros(2, dtype=torch.bfloat16)}
    fedavg = FedAvg()
    fedavg.begin(template)
    fedavg.accumulate({"h": torch.full((3,), 1.0, dtype=torch.float16),
                       "bf": torch.full((2,), 2.0, dtype=torch.bfloat16)}, 1)
    fedavg.accumulate({"h": torch.full((3,), 2.0, dtype=torch.float16),
                       "bf": torch.full((2,), 4.0, dtype=torch.bfloat16)}, 3)
    result = fedavg.finish()
    assert result["h"].dtype == torch.float16 and result["h"].tolist() == [1.75] * 3
    assert result["bf"].dtype == torch.bfloat16 and result["bf"].tolist() == [3.5] * 2


def test_strategy_is_reusable_across_rounds(global_state):
    updates = _updates(global_state, (1, 2, 3))
    fedavg = FedAvg()
    fedavg.begin(global_state)
    fedavg.accumulate(updates[0], 5)
    fedavg.finish()
    with pytest.raises(RuntimeError):
        fedavg.finish()  # a finished round cannot be finished again
    fedavg.begin(global_state)  # a new round starts from zero
    fedavg.accumulate(updates[1], 2)
    assert fedavg.total_samples == 2
    result = fedavg.finish()
    assert all(torch.equal(result[k], updates[1][k]) for k in global_state)


def test_misuse_raises(global_state):
    update = _clones(global_state)
    with pytest.raises(RuntimeError):
        FedAvg().finish()  # finish before begin
    with pytest.raises(RuntimeError):
        FedAvg().accumulate(update, 1)  # accumulate before begin
    fedavg = FedAvg()
    fedavg.begin(global_state)
    with pytest.raises(RuntimeError):
        fedavg.finish()  # no samples accumulated
    for bad in (0, -1, -100):
        with pytest.raises(ValueError):
            fedavg.accumulate(update, bad)
    assert fedavg.total_samples == 0
    fedavg.accumulate(update, 4)  # the refused calls left nothing behind (x*4/4 is exact)
    assert fedavg.total_samples == 4
    result = fedavg.finish()
    assert all(torch.equal(result[k], global_state[k]) for k in global_state)
    with pytest.raises(ValueError):
        build_strategy(StrategySettings("fedprox-not-here"))


# -- FedProx and FedAvgM ---------------------------------------------------------------------------

def test_fedprox_aggregates_like_fedavg_and_tells_clients_mu():
    from genfl_server.strategy import build_strategy

    template = {"w": torch.zeros(3), "n": torch.tensor(0)}
    updates = [({"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(2)}, 1),
               ({"w": torch.tensor([3.0, 2.0, 1.0]), "n": torch.tensor(4)}, 3)]
    prox, plain = build_strategy(StrategySettings("fedprox", {"prox_mu": 0.5})), FedAvg()
    for strategy in (prox, plain):
        strategy.begin(template)
        for update, n in updates:
            strategy.accumulate(update, n)
    a, b = prox.finish(), plain.finish()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert prox.client_config == ClientTrainSettings(prox_mu=0.5)
    assert plain.client_config == ClientTrainSettings(prox_mu=0.0)


def test_client_settings_of_every_strategy_are_train_task_fields():
    """The engine applies a strategy's client settings with dataclasses.replace on a TrainTask:
    every field must be a TrainTask field, and the result a valid task carrying the value."""
    import dataclasses

    from genfl_server.strategy import STRATEGIES
    from genfl_shared.tasks import TrainTask

    task = TrainTask(model="classifier", epochs=1, batch_size=8, optimizer="sgd", lr=0.1, sgd_momentum=0.5,
                     binarize=True, seed=3)
    train_fields = {f.name for f in dataclasses.fields(TrainTask)}
    for name in STRATEGIES:
        run = RunConfig().override(strategy=name, prox_mu=0.25)
        settings = build_strategy(run.aggregation.strategy_settings()).client_config
        assert {f.name for f in dataclasses.fields(settings)} <= train_fields
        configured = dataclasses.replace(task, **dataclasses.asdict(settings))
        assert configured.prox_mu == (0.25 if name == "fedprox" else 0.0)
        assert TrainTask.from_proto(configured.to_proto()) == configured


def test_fedavgm_applies_server_momentum_over_rounds():
    from genfl_server.strategy import FedAvgM

    strategy = FedAvgM(lr=1.0, momentum=0.5)
    global_state = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(10)}
    # Round 1: mean update 0 -> d = 1, v = 1, new = 0.
    strategy.begin(global_state)
    strategy.accumulate({"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(12)}, 5)
    first = strategy.finish()
    assert torch.allclose(first["w"], torch.tensor([0.0, 0.0]))
    assert first["n"].dtype == torch.int64 and int(first["n"]) == 12  # integers: plain mean
    # Round 2: mean update = global (0) -> d = 0, v = 0.5 * 1 + 0 = 0.5, new = 0 - 0.5 = -0.5.
    strategy.begin(first)
    strategy.accumulate({"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(14)}, 5)
    second = strategy.finish()
    assert torch.allclose(second["w"], torch.tensor([-0.5, -0.5]))


def test_fedavgm_without_momentum_is_fedavg():
    from genfl_server.strategy import FedAvgM

    template = {"w": torch.randn(5)}
    update = {"w": torch.randn(5)}
    m, plain = FedAvgM(lr=1.0, momentum=0.0), FedAvg()
    for strategy in (m, plain):
        strategy.begin(template)
        strategy.accumulate(update, 7)
    assert torch.allclose(m.finish()["w"], plain.finish()["w"], atol=1e-6)


def test_fedavgm_velocity_survives_a_state_dict_round_trip():
    from genfl_server.strategy import FedAvg, FedAvgM

    strategy = FedAvgM(lr=1.0, momentum=0.5)
    assert strategy.state_dict() == {}
    strategy.begin({"w": torch.tensor([1.0, 1.0])})
    strategy.accumulate({"w": torch.tensor([0.0, 0.0])}, 5)
    first = strategy.finish()
    saved = strategy.state_dict()
    assert torch.equal(saved["w"], torch.tensor([1.0, 1.0]))
    restored = FedAvgM(lr=1.0, momentum=0.5)
    restored.load_state_dict(saved)
    for s in (strategy, restored):  # the restored strategy continues exactly like the original
        s.begin(first)
        s.accumulate({"w": torch.tensor([0.0, 0.0])}, 5)
    assert torch.equal(strategy.finish()["w"], torch.tensor([-0.5, -0.5]))
    assert torch.equal(restored.finish()["w"], torch.tensor([-0.5, -0.5]))
    assert FedAvg().state_dict() == {}
    try:
        FedAvg().load_state_dict(saved)
    except ValueError:
        pass
    else:
        raise AssertionError("FedAvg must refuse state it cannot have saved")


def _receive(payload_manifest, chunks, template):
    """The server's upload path (genfl_server.service._receive_update without gRPC): chunks into
    one buffer, digest checked as they arrive, then the template and finiteness check; the
    tensors returned are views of the received bytes."""
    from genfl_shared.codec import PayloadAssembler, check_matches_template, state_dict_nbytes

    assembler = PayloadAssembler(payload_manifest, max_bytes=state_dict_nbytes(template))
    for index, data in enumerate(chunks):
        assembler.add(pb.Chunk(index=index, data=data))
    update = assembler.finish()
    check_matches_template(update, template)
    return update


def test_fedavg_folds_received_views_bit_identically_and_refused_uploads_change_nothing(global_state):
    from genfl_shared.codec import CodecError, encode_state_dict

    updates = _updates(global_state, [1, 2, 3])
    direct = FedAvg()
    direct.begin(global_state)
    for update, samples in zip(updates, [5, 7, 11]):
        direct.accumulate(_clones(update), samples)
    expected = direct.finish()

    received = FedAvg()
    received.begin(global_state)
    corrupt = encode_state_dict(updates[0])
    flipped = bytearray(corrupt.chunks[-1])
    flipped[0] ^= 1
    poisoned = _clones(updates[1])
    poisoned[next(k for k, v in poisoned.items() if v.is_floating_point())].view(-1)[0] = math.nan
    for update, samples in zip(updates, [5, 7, 11]):
        payload = encode_state_dict(update)
        views = _receive(payload.manifest, payload.chunks, global_state)
        received.accumulate(views, samples)
        # Between good uploads, refused ones: a flipped byte (digest) and a NaN (values).
        with pytest.raises(CodecError, match="SHA-256"):
            _receive(corrupt.manifest, [*corrupt.chunks[:-1], bytes(flipped)], global_state)
        bad = encode_state_dict(poisoned)
        with pytest.raises(CodecError, match="NaN"):
            _receive(bad.manifest, bad.chunks, global_state)
    result = received.finish()
    assert result.keys() == expected.keys()
    for name in expected:
        assert result[name].dtype == expected[name].dtype
        assert torch.equal(result[name], expected[name]), name
