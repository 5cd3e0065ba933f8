"""One download per client per round: round r's client evaluation rides on round r + 1's TRAIN task
(the client evaluates the received weights, then trains), and only a phase's last round sends an
EVALUATE task of its own. The records keep their meaning: the evaluation recorded for round r is
of round r's aggregate, and a deterministic run reports exactly the numbers it did before."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from deterministic_numbers import deterministic_run, platform_key, recorded_events, recorded_platforms
from genfl_client.executor import TaskExecutor
from genfl_client.metrics import ClientMetrics
from genfl_client.runner import ClientRunner
from genfl_server.coordinator import Coordinator
from genfl_server.engine import RoundEngine
from genfl_server.metrics import ServerMetrics
from genfl_server.results import RunRecorder
from genfl_shared.codec import state_dict_nbytes
from genfl_shared.models import initial_state
from genfl_shared.partition import Shard
from genfl_shared.tasks import EvaluateTask, TrainTask
from helpers import loopback_server, run_rounds, wait_until

CVAE_TRAIN = TrainTask(model="cvae", epochs=1, batch_size=16, optimizer="adam", lr=1e-3, sgd_momentum=0.0,
                       binarize=True)
CVAE_EVAL = EvaluateTask(model="cvae", binarize=True)


def _shard(client_id: str, seed: int, train: int = 48, heldout: int = 16) -> Shard:
    rng = np.random.default_rng(seed)
    return Shard(client_id, seed, "mnist",
                 rng.integers(0, 256, (train, 28, 28), dtype=np.uint8), rng.integers(0, 10, train).astype(np.int64),
                 rng.integers(0, 256, (heldout, 28, 28), dtype=np.uint8), rng.integers(0, 10, heldout).astype(np.int64))


@contextmanager
def federation(tmp_path, client_ids):
    """A real gRPC server with a round engine, and real clients serving tasks in threads.

    In one process the clients share torch's global RNG (the CVAE's training noise), so only a
    single client trains repeatably here; separate processes (deterministic_numbers.py) do not."""
    coordinator = Coordinator("run-rounds", expected_clients=len(client_ids), dataset="mnist", poll_timeout=5.0)
    metrics = ServerMetrics()
    engine = RoundEngine(coordinator, metrics, RunRecorder(tmp_path, run_id="run-rounds"), seed=11,
                         round_timeout=120.0, deterministic=True)
    with loopback_server(coordinator, metrics) as (_channel, port):
        runners = [ClientRunner(f"127.0.0.1:{port}", cid, TaskExecutor(_shard(cid, i), torch.device("cpu")),
                                ClientMetrics(cid), dataset="mnist") for i, cid in enumerate(client_ids)]
        threads = [threading.Thread(target=runner.run, daemon=True) for runner in runners]
        for thread in threads:
            thread.start()
        try:
            engine.wait_for_clients(timeout=30)
            yield engine, metrics, runners
        finally:
            coordinator.shutdown(reason="test over")
            for thread, runner in zip(threads, runners):
                thread.join(30)
                runner.close()


@pytest.fixture
def two_clients(tmp_path):
    with federation(tmp_path, ("alice", "bob")) as running:
        yield running


@pytest.fixture
def one_client(tmp_path):
    with federation(tmp_path, ("alice",)) as running:
        yield running


def _accepted(metrics: ServerMetrics, kind: str) -> float:
    return metrics.registry.get_sample_value("genfl_client_updates_accepted_total",
                                             {"phase": "cvae", "type": f"TASK_TYPE_{kind}"}) or 0.0


@pytest.mark.integration
def test_one_download_per_round_and_each_round_records_the_evaluation_of_its_own_aggregate(two_clients, tmp_path):
    engine, metrics, runners = two_clients
    rounds = 3
    aggregates = {}
    final = engine.run_rounds("cvae", initial_state("cvae", 0), rounds=rounds, train_task=CVAE_TRAIN,
                              eval_task=CVAE_EVAL, on_round_end=lambda rnd, state: aggregates.setdefault(rnd, state))
    model_bytes = state_dict_nbytes(final)
    for runner in runners:  # rounds TRAIN downloads, and one EVALUATE for the last round's model
        assert runner.metrics.bytes_received._value.get() == (rounds + 1) * model_bytes
    # The server counts a result as it hands it over; the step may end a moment before the count.
    wait_until(lambda: (_accepted(metrics, "TRAIN"), _accepted(metrics, "EVALUATE")) == (2 * rounds, 2), 10,
               f"{2 * rounds} TRAIN and 2 EVALUATE results counted as accepted")

    records = run_rounds(tmp_path)
    assert [r["round"] for r in records] == [1, 2, 3]
    # What a separate EVALUATE step of each round's aggregate reports, with that round's seeds
    # (a fourth download per round, only for this comparison).
    for record in records:
        alone = engine.evaluate("cvae", record["round"], aggregates[record["round"]], CVAE_EVAL)
        assert record["per_client"] == alone.per_client
        assert record["weighted_client_loss"] == alone.weighted_loss and record["clients"] == 2
        assert record["per_client"]["alice"]["samples"] == 16
    assert all(torch.equal(final[k], aggregates[rounds][k]) for k in final)


@pytest.mark.unit
def test_a_pending_round_survives_export_and_restore(tmp_path):
    recorder = RunRecorder(tmp_path / "a", run_id="r")
    recorder.hold_round({"phase": "cvae", "round": 2, "train_loss": 1.5, "test_accuracy": None,
                         "test_loss": float("nan"), "seconds": 0.1})
    saved = json.loads(json.dumps(recorder.export()))  # as the run state stores it
    resumed = RunRecorder(tmp_path / "b", run_id="r")
    resumed.restore(saved)
    assert resumed.pending_round("classifier") is None
    assert resumed.pending_round("cvae") == {"phase": "cvae", "round": 2, "train_loss": 1.5,
                                             "test_accuracy": None, "test_loss": None, "seconds": 0.1}
    assert run_rounds(tmp_path / "b") == []  # not written until its evaluation is in
    resumed.record_round({"phase": "cvae", "round": 2, "per_client": {}})
    assert resumed.pending is None and [r["round"] for r in run_rounds(tmp_path / "b")] == [2]


@pytest.mark.system
def test_a_deterministic_run_reports_exactly_the_numbers_recorded_before_the_change(tmp_path):
    """The numbers in tests/data/deterministic_numbers.json were recorded with the code before
    evaluations rode on training (python tests/deterministic_numbers.py)."""
    expected = recorded_events(platform_key())
    if expected is None:
        pytest.skip(f"numbers recorded on {recorded_platforms()}, this is {platform_key()}: floats differ")
    assert deterministic_run(tmp_path) == expected


class _Crash(Exception):
    pass


@pytest.mark.integration
def test_a_phase_resumed_with_a_pending_round_records_what_an_uninterrupted_one_does(one_client, tmp_path):
    """Crash right after round 2's checkpoint (round 1 recorded, round 2's record pending), resume
    from what was saved: the records, evaluations included, are those of an uninterrupted phase
    (the fast, in-process companion of test_resume.py)."""
    engine, _metrics, _runners = one_client
    start = initial_state("cvae", 0)
    engine.recorder = RunRecorder(tmp_path / "reference", run_id="r")
    engine.run_rounds("cvae", start, rounds=3, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL)

    saved = {}

    def checkpoint_then_crash(rnd, state):
        saved.update(round=rnd, state={k: v.clone() for k, v in state.items()},
                     recorder=json.loads(json.dumps(engine.recorder.export())))
        if rnd == 2:
            raise _Crash()

    engine.recorder = RunRecorder(tmp_path / "crashed", run_id="r")
    with pytest.raises(_Crash):
        engine.run_rounds("cvae", start, rounds=3, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                          on_round_end=checkpoint_then_crash)
    assert saved["recorder"]["pending_round"]["round"] == 2
    assert [r["round"] for r in run_rounds(tmp_path / "crashed")] == [1]

    engine.recorder = RunRecorder(tmp_path / "resumed", run_id="r")
    engine.recorder.restore(saved["recorder"])
    engine.run_rounds("cvae", saved["state"], rounds=3, train_task=CVAE_TRAIN, eval_task=CVAE_EVAL,
                      start_round=saved["round"] + 1)

    def numbers(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in run_rounds(out)]
    assert [r["round"] for r in run_rounds(tmp_path / "resumed")] == [1, 2, 3]
    assert numbers(tmp_path / "resumed") == numbers(tmp_path / "reference")
