"""DP-SGD in the CVAE phase: the clients' accounting, the server's record of the guarantee,
and a real small DP run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from functools import partial

import click
import grpc
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from prometheus_client.parser import text_string_to_metric_families

from conftest import dataset_dir
from genfl_client.executor import TaskError, TaskExecutor
from genfl_server.coordinator import Coordinator, TaskResult
from genfl_server.metrics import ServerMetrics
from genfl_server.privacy import PrivacyLedger, record_spent_epsilon
from genfl_shared.codec import MAX_MESSAGE_BYTES, decode_payload, encode_state_dict
from genfl_shared.cli_settings import resolve_config
from genfl_shared.config import PrivacySettings, RunConfig
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.dp import ClientPrivacy, DPSettings, poisson_sampling
from genfl_shared.models import build_model, initial_state
from genfl_shared.partition import Shard
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.runfiles import METRICS_JSONL, read_events
from genfl_shared.tasks import EvaluateTask, TaskSettingsError, TrainTask
from genfl_shared.training import train_cvae
from helpers import start_server

RPC_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_dataset("mnist", dataset_dir("mnist"))
    return images[:600].numpy(), labels[:600].numpy()


def dp_task(**changes) -> TrainTask:
    settings = dict(model="cvae", epochs=1, batch_size=32, optimizer="adam", lr=1e-3, sgd_momentum=0.0,
                    binarize=True, dp=True, dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, dp_delta=1e-5,
                    dp_accountant="rdp", seed=5)
    return TrainTask(**{**settings, **changes})


def train_header(task: TrainTask, rnd: int) -> pb.TaskHeader:
    return pb.TaskHeader(task_id=f"t{rnd}", type=pb.TASK_TYPE_TRAIN, phase="cvae", round=rnd,
                         train=task.to_proto())


# -- the client's accounting -------------------------------------------------------------------------

@pytest.mark.integration
def test_epsilon_grows_with_rounds_as_the_accountant_says(mnist):
    images, labels = mnist
    n = 200
    shard = Shard("alice", 0, "mnist", images[:n], labels[:n], images[n:n + 20], labels[n:n + 20])
    executor = TaskExecutor(shard, torch.device("cpu"))
    task = dp_task(epochs=2)
    q, steps_per_epoch = poisson_sampling(n, task.batch_size)
    assert (q, steps_per_epoch) == (32 / 200, 7)
    weights = initial_state("cvae", 0)
    reported = []
    for rnd in (1, 2, 3):
        outcome = executor.run(train_header(task, rnd), weights)
        weights = outcome.state
        assert outcome.metrics["steps"] == 2 * steps_per_epoch
        reported.append(outcome.metrics["dp_epsilon"])
    # The same process's one accountant: after round k it has composed k rounds of 14 steps each,
    # exactly what a fresh Opacus accountant says for 14 k subsampled Gaussian steps.
    for rounds, epsilon in enumerate(reported, start=1):
        reference = RDPAccountant()
        reference.history = [(1.1, q, rounds * 2 * steps_per_epoch)]
        assert epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert 0 < reported[0] < reported[1] < reported[2]


@pytest.mark.unit
def test_a_task_that_changes_the_dp_settings_within_the_run_is_refused(mnist):
    images, labels = mnist
    shard = Shard("alice", 0, "mnist", images[:100], labels[:100], images[100:110], labels[100:110])
    executor = TaskExecutor(shard, torch.device("cpu"))
    executor.run(train_header(dp_task(), 1), initial_state("cvae", 0))
    with pytest.raises(TaskError, match="DP-SGD settings changed within the run"):
        executor.run(train_header(dp_task(dp_noise_multiplier=2.0), 2), initial_state("cvae", 0))


@pytest.mark.integration
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_found_for_a_target_epsilon_meets_it(accountant):
    target, rounds, epochs = 3.0, 4, 2
    settings = DPSettings(max_grad_norm=1.0, delta=1e-5, accountant=accountant, target_epsilon=target,
                          planned_rounds=rounds)
    privacy = ClientPrivacy(settings, num_samples=600, batch_size=32, epochs=epochs)
    assert 0.3 < privacy.noise_multiplier < 10
    per_round = []
    for _ in range(rounds):
        for _ in range(epochs * privacy.steps_per_epoch):
            privacy.step()
        per_round.append(privacy.epsilon())
    assert per_round == sorted(per_round) and per_round[0] < target
    # The binary search stops within 0.01 below the target; the accountant's own rounding adds a little.
    assert target - 0.05 <= per_round[-1] <= target
    # and the calibrated sigma is not loose: 10 % less noise would overspend the budget.
    weaker = (PRVAccountant if accountant == "prv" else RDPAccountant)()
    weaker.history = [(0.9 * privacy.noise_multiplier, privacy.sample_rate, privacy.steps)]
    assert weaker.get_epsilon(delta=1e-5) > target


@pytest.mark.integration
def test_dp_and_non_dp_training_with_the_same_seed_differ_and_dp_is_repeatable(mnist):
    images, labels = mnist
    x, y = to_float_images(images[:128]), torch.as_tensor(labels[:128])

    def trained(dp: bool) -> dict[str, torch.Tensor]:
        model = build_model("cvae")
        model.load_state_dict(initial_state("cvae", 0))
        privacy = None
        if dp:
            privacy = ClientPrivacy(DPSettings(max_grad_norm=1.0, delta=1e-5, accountant="rdp", noise_multiplier=1.0),
                                    num_samples=128, batch_size=32, epochs=1)
        train_cvae(model, x, y, epochs=1, batch_size=32, lr=1e-3, seed=11, device="cpu", privacy=privacy)
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, private, private_again = trained(False), trained(True), trained(True)
    distance = sum(float((plain[k] - private[k]).norm()) for k in plain)
    assert distance > 1e-3, "a DP-SGD run gave the same weights as a plain run"
    assert all(torch.equal(private[k], private_again[k]) for k in private), "DP-SGD with one seed is not repeatable"
    model = build_model("cvae")
    model.load_state_dict(private)  # Opacus' hooks were removed: the model is a plain CVAE again
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def _one_dp_step(model, x, y, *, ghost: bool, max_grad_norm: float) -> list[torch.Tensor]:
    """The gradient DP-SGD applies for one batch with no noise: ghost clipping (fit_dp's way) or
    Opacus' clipping of materialised per-sample gradients (the reference)."""
    import warnings

    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from genfl_shared.training import _cvae_per_sample_loss

    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    if ghost:
        wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                       max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(sgd, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                                                    expected_batch_size=None, loss_reduction="sum")
    else:
        wrapped = GradSampleModule(model, loss_reduction="sum")
        optimizer = DPOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=None,
                                loss_reduction="sum")
    torch.manual_seed(3)  # the same reparameterisation noise for both
    losses = _cvae_per_sample_loss(wrapped, x, y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if ghost:
            DPTensorFastGradientClipping(wrapped, optimizer, losses, "sum").backward()
        else:
            losses.sum().backward()
    optimizer.step()
    wrapped._close()
    return [b - p.detach() for b, p in zip(before, model.parameters())]


@pytest.mark.unit
@pytest.mark.parametrize("batch", [16, 0])
def test_ghost_clipping_applies_the_sum_of_per_sample_clipped_gradients(mnist, batch):
    """fit_dp's ghost clipping applies what clipping each sample's own gradient does (the DP-SGD
    mechanism its accounting assumes), also for an empty Poisson batch (nothing but noise)."""
    images, labels = mnist
    x, y = to_float_images(images[:batch]), torch.as_tensor(labels[:batch])
    steps = {}
    for ghost in (True, False):
        model = build_model("cvae")
        model.load_state_dict(initial_state("cvae", 0))
        steps[ghost] = _one_dp_step(model, x, y, ghost=ghost, max_grad_norm=1.0)
    for fast, reference in zip(steps[True], steps[False]):
        assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-7)
    total = math.sqrt(sum(float(t.pow(2).sum()) for t in steps[True]))
    if batch:  # each of the 16 samples' gradients is clipped to norm 1 (the CVAE's are far larger)
        assert 1.0 < total <= batch * 1.0 + 1e-4
    else:
        assert total == 0.0


# -- settings ----------------------------------------------------------------------------------------

@pytest.mark.unit
def test_dp_task_settings_are_checked():
    with pytest.raises(TaskSettingsError, match="dp_noise_multiplier.*dp is off"):
        TrainTask(model="cvae", epochs=1, batch_size=32, optimizer="adam", lr=1e-3, sgd_momentum=0.0,
                  binarize=True, dp_noise_multiplier=1.0)
    with pytest.raises(TaskSettingsError, match="exactly one of"):
        dp_task(dp_target_epsilon=3.0, dp_rounds=2)
    with pytest.raises(TaskSettingsError, match="dp_rounds"):
        dp_task(dp_noise_multiplier=0.0, dp_target_epsilon=3.0)
    with pytest.raises(TaskSettingsError, match="not the classifier"):
        dp_task(model="classifier", optimizer="sgd")
    with pytest.raises(TaskSettingsError, match="proximal"):
        dp_task(prox_mu=0.01)
    with pytest.raises(TaskSettingsError, match="dp_accountant"):
        dp_task(dp_accountant="gdp")
    assert TrainTask.from_proto(dp_task().to_proto()) == dp_task()


@pytest.mark.unit
def test_run_options_refuse_both_a_noise_multiplier_and_a_target_epsilon():
    with pytest.raises(click.UsageError, match="not both"):
        resolve_config("quick", {"dp_noise_multiplier": 1.0, "dp_target_epsilon": 3.0})
    assert not resolve_config("quick", {}).dp.enabled and resolve_config("quick", {"dp_target_epsilon": 3.0}).dp.enabled


@pytest.mark.unit
def test_ledger_takes_the_weakest_client_and_adds_up_a_restarted_clients_accountants():
    ledger = PrivacyLedger(PrivacySettings(dp_noise_multiplier=1.0))
    assert ledger.guarantee() == (None, 1e-5)
    ledger.record("a", 0.5)
    ledger.record("b", 0.7)
    ledger.record("a", 0.9)
    assert ledger.guarantee() == (0.9, 1e-5)
    ledger.record("b", 0.2)  # b restarted: a fresh accountant, composed with the old one
    summary = ledger.summary()
    assert summary["per_client"]["b"] == {"epsilon": pytest.approx(0.9), "delta": 2e-5, "accountants": 2}
    assert summary["epsilon"] == pytest.approx(0.9) and summary["delta"] == 2e-5


@pytest.mark.unit
def test_only_a_dp_run_exports_an_epsilon():
    plain, private = ServerMetrics(), ServerMetrics()
    private.track_privacy(1e-5)
    assert plain.registry.get_sample_value("genfl_dp_epsilon") is None  # no DP: no epsilon, not 0
    assert math.isnan(private.registry.get_sample_value("genfl_dp_epsilon"))  # none reported yet
    assert private.registry.get_sample_value("genfl_dp_delta") == 1e-5


@pytest.mark.unit
def test_an_accepted_results_epsilon_is_recorded_before_its_step_can_end():
    """The ledger is the coordinator's result listener: a step that sees its results complete
    finds each one's epsilon recorded and exported, however slow the recording."""
    coordinator = Coordinator("run-dp", expected_clients=1, dataset=None)
    coordinator.register(pb.RegisterRequest(client_id="c0", num_train_samples=100, num_heldout_samples=10))
    ledger, metrics = PrivacyLedger(PrivacySettings(dp_noise_multiplier=1.0)), ServerMetrics()
    metrics.track_privacy(ledger.delta)
    recording = threading.Event()

    def slow_listener(_result):
        recording.set()
        threading.Event().wait(0.2)  # the step must wait for the listeners, not overtake them

    coordinator.add_result_listener(slow_listener)
    coordinator.add_result_listener(partial(record_spent_epsilon, ledger, metrics))
    task = coordinator.new_task("c0", pb.TASK_TYPE_EVALUATE, "cvae", 1, EvaluateTask(model="cvae", binarize=True),
                                None)
    batch = coordinator.dispatch([task])
    finishing = threading.Thread(target=coordinator.finish,
                                 args=(TaskResult(task, 10, {"loss": 1.0, "dp_epsilon": 0.5}), batch, None))
    finishing.start()
    assert recording.wait(10)
    assert batch.wait(timeout=10)
    assert ledger.guarantee() == (0.5, 1e-5)
    assert metrics.registry.get_sample_value("genfl_dp_epsilon") == 0.5
    finishing.join(10)


# -- the server ----------------------------------------------------------------------------------------

def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found (Debian package prometheus; .ci/run installs it)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.integration
def test_a_dp_result_without_epsilon_is_refused_by_a_real_server(tmp_path):
    out = tmp_path / "run"
    log_path = tmp_path / "server.log"
    server, endpoint = start_server(out, "--clients", "1", "--phase", "cvae", "--rounds", "1", "--address",
                                    "127.0.0.1:0", "--register-timeout", "60", "--local-epochs", "1",
                                    "--dp-noise-multiplier", "1.3", "--metrics-port", "0", log=log_path)
    channel = grpc.insecure_channel(endpoint["address"], options=[("grpc.max_receive_message_length",
                                                                   MAX_MESSAGE_BYTES)])
    try:
        stub = pb_grpc.FederatedLearningStub(channel)
        reply = stub.Register(pb.RegisterRequest(client_id="bot", num_train_samples=100, num_heldout_samples=20,
                                                 dataset="mnist"), timeout=RPC_TIMEOUT)

        def fetch():
            messages = list(stub.FetchTask(pb.FetchTaskRequest(run_id=reply.run_id, client_id="bot",
                                                               session_secret=reply.session_secret),
                                           timeout=RPC_TIMEOUT))
            header = messages[0].header
            return header, (decode_payload(header.manifest, [m.chunk for m in messages[1:]], max_bytes=1 << 30)
                            if header.HasField("manifest") else None)

        def submit(task, num_samples, metrics, state=None):
            header = pb.ResultHeader(run_id=task.run_id, task_id=task.task_id, client_id="bot",
                                     session_secret=reply.session_secret, phase=task.phase, round=task.round,
                                     type=task.type, num_samples=num_samples, metrics=metrics)
            chunks = ()
            if state is not None:
                payload = encode_state_dict(state)
                header.manifest.CopyFrom(payload.manifest)
                chunks = payload.chunks
            return stub.SubmitResult(iter([pb.ResultMessage(header=header)] + [
                pb.ResultMessage(chunk=pb.Chunk(index=i, data=d)) for i, d in enumerate(chunks)]), timeout=RPC_TIMEOUT)

        task, weights = fetch()
        assert task.type == pb.TASK_TYPE_TRAIN and task.train.dp is True
        with pytest.raises(grpc.RpcError) as refused:
            submit(task, 100, {"loss": 190.0, "steps": 4.0}, weights)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dp_epsilon" in refused.value.details()
        metrics = _scrape(endpoint["metrics_port"])
        assert metrics[("genfl_client_updates_rejected_total", (("reason", "missing_dp_epsilon"),))] == 1.0

        assert submit(task, 100, {"loss": 190.0, "steps": 4.0, "dp_epsilon": 0.75}, weights).accepted
        metrics = _scrape(endpoint["metrics_port"])
        assert metrics[("genfl_dp_epsilon", ())] == 0.75 and metrics[("genfl_dp_delta", ())] == 1e-5
        evaluation, _ = fetch()
        assert evaluation.type == pb.TASK_TYPE_EVALUATE
        assert submit(evaluation, 20, {"loss": 180.0}).accepted
        assert fetch()[0].type == pb.TASK_TYPE_SHUTDOWN
        assert server.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        channel.close()
        if server.poll() is None:
            server.kill()
            server.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"]["epsilon"] == 0.75 and summary["dp"]["delta"] == 1e-5
    assert summary["dp"]["noise_multiplier"] == 1.3 and summary["dp"]["per_client"]["bot"]["epsilon"] == 0.75


@pytest.mark.system
def test_a_small_dp_run_completes_with_its_guarantee_in_summary_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}
    result = subprocess.run(
        [sys.executable, "-m", "genfl_experiments.launch", "--data-root", str(dataset_dir("mnist")),
         "--out", str(tmp_path), "--clients", "3", "--alpha", "1.0", "--train-subset", "450", "--cvae-rounds", "2",
         "--classifier-rounds", "1", "--local-epochs", "1", "--synthetic-samples", "100", "--cas-epochs", "1",
         "--pretrain-epochs", "1", "--seed", "4", "--dp-target-epsilon", "4", "--dp-accountant", "rdp"],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    dp = summary["dp"]
    assert dp["delta"] == 1e-5 and dp["accountant"] == "rdp" and dp["target_epsilon"] == 4.0
    assert sorted(dp["per_client"]) == ["client-000", "client-001", "client-002"]
    # Calibrated to the 2 rounds: the final epsilon is the target, from below.
    assert 3.9 <= dp["epsilon"] <= 4.0
    assert dp["epsilon"] == max(c["epsilon"] for c in dp["per_client"].values())
    rounds = [e for e in read_events(tmp_path / METRICS_JSONL) if e["event"] == "dp"]
    assert [e["round"] for e in rounds] == [1, 2] and rounds[0]["epsilon"] < rounds[1]["epsilon"] == dp["epsilon"]
    assert summary["final"]["phase"] == "classifier"


# -- the privacy axis of genfl-sweep ---------------------------------------------------------------

@pytest.mark.unit
def test_privacy_axis_plans_one_cvae_and_pretraining_per_level_and_one_baseline(tmp_path):
    from genfl_experiments.sweep.arms import build_arms
    from genfl_experiments.sweep.plan import Distribution, parse_epsilons, plan_cells
    from genfl_experiments.sweep.run import cell_args

    levels = parse_epsilons("1, 3,8,inf")
    assert [lv.name for lv in levels] == ["eps-1", "eps-3", "eps-8", "eps-inf"]
    for bad in ("0", "-1", "abc", "3,3", "nan", ""):
        with pytest.raises(ValueError):
            parse_epsilons(bad)
    arms = build_arms(["pretrained", "baseline"], ["fedavg"])
    sweep = RunConfig().override(cvae_rounds=2, classifier_rounds=2, dp_delta=1e-6)
    cells = plan_cells(tmp_path, [Distribution(0.1)], [0], arms, sweep=sweep, centralised=False, privacy=levels)
    keys = {c.key: c for c in cells}
    assert sorted(keys) == sorted([f"alpha-0.1/seed0/{lv.name}/{k}" for lv in levels for k in ("cvae", "pretrained")]
                                  + ["alpha-0.1/seed0/baseline"])
    group = tmp_path / "runs" / "alpha-0.1" / "seed0"
    three = keys["alpha-0.1/seed0/eps-3/cvae"]
    assert cell_args(three) == ["--phase", "cvae", "--dp-target-epsilon", "3.0", "--dp-max-grad-norm", "1.0",
                                "--dp-delta", "1e-06", "--dp-accountant", "rdp"]
    assert three.out == group / "eps-3" / "cvae" and three.group == group  # one partition per group
    assert cell_args(keys["alpha-0.1/seed0/eps-inf/cvae"]) == ["--phase", "cvae"]  # ∞: no DP
    pretrained = keys["alpha-0.1/seed0/eps-3/pretrained"]
    assert pretrained.deps == [three.key] and str(three.out / "cvae.pt") in cell_args(pretrained)
    assert "--dp-target-epsilon" not in cell_args(pretrained)  # the classifier phase is not DP
    assert keys["alpha-0.1/seed0/baseline"].deps == [] and keys["alpha-0.1/seed0/baseline"].out == group / "baseline"


@pytest.mark.system
def test_sweep_with_an_epsilon_axis_reports_privacy_against_utility(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}
    result = subprocess.run(
        [sys.executable, "-m", "genfl_experiments.sweep.cli", "--data-root", str(dataset_dir("mnist")),
         "--out", str(tmp_path), "--preset", "quick", "--clients", "2", "--train-subset", "400", "--rounds", "2",
         "--local-epochs", "1", "--synthetic-samples", "100", "--cas-epochs", "1", "--pretrain-epochs", "1",
         "--server-threads", "1", "--log-level", "warning", "--alphas", "iid", "--repeats", "1",
         "--epsilons", "2,inf", "--no-centralised", "--parallel", "2"],
        capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    group = tmp_path / "runs" / "iid" / "seed0"
    private = json.loads((group / "eps-2" / "cvae" / "summary.json").read_text())
    assert private["config"]["dp_target_epsilon"] == 2.0 and 1.9 <= private["dp"]["epsilon"] <= 2.0
    assert json.loads((group / "eps-inf" / "cvae" / "summary.json").read_text())["dp"] is None
    privacy = (tmp_path / "privacy.md").read_text()
    rows = [line for line in privacy.splitlines() if line.startswith("| IID |")]
    assert len(rows) == 3, privacy  # ε = 2, ∞ and the baseline
    assert rows[0].split("|")[2].strip() == "2" and rows[1].split("|")[2].strip() == "∞ (no DP)"
    assert float(rows[0].split("|")[3]) == pytest.approx(private["dp"]["epsilon"], abs=1e-3)
    assert "baseline" in rows[2]
    assert (tmp_path / "figures" / "privacy_utility.png").stat().st_size > 1000
    # table.md and cas.md cover the runs without DP only: the ε = ∞ level and the baseline.
    table = (tmp_path / "table.md").read_text()
    assert "| IID |" in table and "| 1 |" in table.split("| IID |")[1].splitlines()[0]
