"""The method, phase by phase (see README.md, "The method"); ``run_method`` runs them in order:

1. ``cvae_phase``: the clients train a Conditional VAE with FedAvg (or, with --cvae-aggregation,
   keep each class with the clients that hold it: generator.py).
2. ``synthetic_pretraining``: the server alone samples labelled synthetic images from the CVAE
   phase's generator, scores them (CAS) and pre-trains ExquisiteNetV1 on them.
3. ``classifier_phase``: FedAvg of ExquisiteNetV1 from the pre-trained (or a seeded random) start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from genfl_shared.checkpoint import save_checkpoint
from genfl_shared.cli import set_log_context
from genfl_shared.config import RunConfig
from genfl_shared.ensemble import ENSEMBLE_KIND, CVAEEnsemble, is_ensemble
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.seeding import derive_seed
from genfl_shared.synthetic import sample_synthetic, save_grid, train_on_synthetic
from genfl_shared.tasks import EvaluateTask, TrainTask
from genfl_shared.training import evaluate_classifier, evaluate_cvae

from .distill import ServerDistillation
from .engine import PostAggregation, RoundEngine, RoundModels
from .finetune import ServerFineTune
from .generator import CVAEAggregation, NoMembersError
from .metrics import ServerMetrics
from .privacy import PrivacyLedger
from .results import RunRecorder
from .runstate import RunState
from .strategy import Strategy, build_strategy
from .synthmix import ClientSyntheticMix

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class PhaseContext:
    engine: RoundEngine
    recorder: RunRecorder
    metrics: ServerMetrics
    config: RunConfig
    out_dir: Path
    device: torch.device
    test_set: tuple[torch.Tensor, torch.Tensor] | None  # (float images, labels) on the server
    run_state: RunState
    privacy: PrivacyLedger | None = None  # DP runs: the clients' spent epsilon
    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None  # the synthetic set, once sampled

    def checkpoint(self, **kwargs) -> None:
        """Persist progress (see RunState.save) together with the results recorded so far."""
        self.run_state.save(recorder_state=self.recorder.export(), **kwargs)


def phase_strategy(cfg: RunConfig) -> Strategy:
    """A fresh aggregation strategy for one federated phase."""
    return build_strategy(cfg.aggregation.strategy_settings())


def train_task(cfg: RunConfig, model: str) -> TrainTask:
    """The phase's local training settings (the round engine adds seed, determinism and the
    strategy's settings). Every run setting a client task uses is read here and in eval_task."""
    training = cfg.training
    if model == "cvae":
        epochs = training.local_epochs if training.cvae_local_epochs is None else training.cvae_local_epochs
        return TrainTask(model="cvae", epochs=epochs, batch_size=training.batch_size, optimizer="adam",
                         lr=training.cvae_lr, sgd_momentum=0.0, binarize=cfg.data.binarize, **dp_task_settings(cfg))
    return TrainTask(model="classifier", epochs=training.local_epochs, batch_size=training.batch_size, optimizer="sgd",
                     lr=training.classifier_lr, sgd_momentum=training.sgd_momentum, binarize=cfg.data.binarize,
                     local_loss=training.local_loss)


def dp_task_settings(cfg: RunConfig) -> dict:
    """The CVAE task's DP-SGD fields (none without DP: the task's defaults mean off)."""
    dp = cfg.dp
    if not dp.enabled:
        return {}
    return dict(dp=True, dp_noise_multiplier=dp.dp_noise_multiplier or 0.0,
                dp_target_epsilon=dp.dp_target_epsilon or 0.0,
                dp_rounds=cfg.training.cvae_rounds if dp.dp_target_epsilon else 0, dp_max_grad_norm=dp.dp_max_grad_norm,
                dp_delta=dp.dp_delta, dp_accountant=dp.dp_accountant)


def eval_task(cfg: RunConfig, model: str) -> EvaluateTask:
    """Settings of a federated evaluation of ``model`` (the round engine adds the seed)."""
    return EvaluateTask(model=model, binarize=cfg.data.binarize)


def _run_phase(ctx: PhaseContext, phase: str, start: Mapping[str, torch.Tensor], rounds: int,
               train: TrainTask, evaluate: EvaluateTask, test_fn,
               post_aggregation: PostAggregation | None = None, client_task=None,
               strategy: Strategy | None = None) -> State:
    """The phase's federated rounds, resumable: the model and the strategy's state (FedAvgM's
    velocity, the ensemble's client models) are saved after every round and restored from a resumed
    run's state."""
    strategy = strategy if strategy is not None else phase_strategy(ctx.config)
    done = ctx.run_state.completed_rounds(phase)
    if done:
        start = ctx.run_state.tensors[phase]
        strategy.load_state_dict(ctx.run_state.tensors.get(f"{phase}_strategy", {}))

    privacy_recorded: set[int] = set()

    def on_round_end(rnd: int, state: State) -> None:
        # Called after each aggregate and once more after the last round's record; a round's
        # epsilon is complete after its aggregate (it comes with the training results).
        if phase == "cvae" and ctx.privacy is not None and rnd not in privacy_recorded:
            privacy_recorded.add(rnd)
            record_privacy(ctx, rnd)
        ctx.checkpoint(completed=(phase, rnd), **{phase: state, f"{phase}_strategy": strategy.state_dict()})

    return ctx.engine.run_rounds(phase, start, rounds=rounds, train_task=train, eval_task=evaluate,
                                 strategy=strategy, test_fn=test_fn, start_round=done + 1,
                                 on_round_end=on_round_end, post_aggregation=post_aggregation,
                                 client_task=client_task)


def record_privacy(ctx: PhaseContext, rnd: int) -> None:
    """The run's guarantee after a CVAE round: in summary.json and as an event in metrics.jsonl."""
    guarantee = ctx.privacy.summary()
    ctx.recorder.set(dp=guarantee)
    ctx.recorder.record_event("dp", phase="cvae", round=rnd, epsilon=guarantee["epsilon"],
                              delta=guarantee["delta"])
    log.info("DP-SGD after CVAE round %d: (epsilon %s, delta %g) over %d clients", rnd,
             "-" if guarantee["epsilon"] is None else f"{guarantee['epsilon']:.3f}", guarantee["delta"],
             len(guarantee["per_client"]))


def run_method(ctx: PhaseContext, phase: str) -> State:
    """The method: federated CVAE -> server-side synthetic pre-training -> federated classifier.

    ``phase`` is "all", or "cvae" / "classifier" for one half (the classifier half then starts from
    the CVAE or pre-trained weights the run state was given). Returns the last phase's weights."""
    cvae = ctx.run_state.tensors.get("cvae")
    if phase in ("cvae", "all"):
        cvae = cvae_phase(ctx)
    if phase == "cvae":
        return cvae
    if ctx.config.pretraining.pretrain:
        start = synthetic_pretraining(ctx, cvae)
    else:
        start = initial_state("classifier", ctx.config.reproducibility.seed)  # the baseline: a seeded random start
    return classifier_phase(ctx, start, cvae)


def cvae_phase(ctx: PhaseContext) -> State:
    """The federated CVAE rounds; returns the generator the server samples: the global CVAE, or
    with --cvae-aggregation ensemble the clients' CVAEs (genfl_server/generator.py)."""
    cfg = ctx.config
    seed = cfg.reproducibility.seed
    if "generator" in ctx.run_state.tensors:  # resumed after the phase: its generator as it ended
        return ctx.run_state.tensors["generator"]
    plan = CVAEAggregation.build(cfg.generator, phase_strategy(cfg), ctx.engine.clients, seed=seed,
                                 device=ctx.device)

    def test_fn(state):
        if ctx.test_set is None:
            return {}
        if plan.models is not None:
            try:
                return plan.ensemble().evaluate(*ctx.test_set, seed=seed, device=ctx.device)
            except NoMembersError as error:
                log.warning("no test loss this round: %s", error)
                return {}
        return evaluate_cvae(model_from_state("cvae", state, ctx.device), *ctx.test_set, seed=seed, device=ctx.device)

    state = _run_phase(ctx, "cvae", initial_state("cvae", seed), cfg.training.cvae_rounds, train_task(cfg, "cvae"),
                       eval_task(cfg, "cvae"), test_fn, post_aggregation=plan.post_aggregation,
                       strategy=plan.strategy)
    generator = plan.generator(state)
    save_checkpoint(ctx.out_dir / "cvae.pt", ENSEMBLE_KIND if is_ensemble(generator) else "cvae", generator)
    if plan.mode != "fedavg":
        # Saved once: a resumed run needs neither the clients' label counts nor (ensemble) the K
        # client models the strategy carried, which later checkpoints then no longer rewrite.
        ctx.run_state.tensors.pop("cvae_strategy", None)
        ctx.checkpoint(generator=generator)
    return generator


def synthetic_set(ctx: PhaseContext, cvae_state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's class-balanced synthetic set from the CVAE phase's generator, sampled once per process (a
    resumed run samples the same set again: the seed is the run's)."""
    if ctx.synthetic is not None:
        return ctx.synthetic
    cfg = ctx.config
    started = time.perf_counter()
    seed = derive_seed(cfg.reproducibility.seed, "synthetic")
    if is_ensemble(cvae_state):
        images, labels = CVAEEnsemble.from_state(cvae_state).sample(cfg.pretraining.synthetic_samples, seed=seed,
                                                                    device=ctx.device)
    else:
        images, labels = sample_synthetic(model_from_state("cvae", cvae_state, ctx.device),
                                          cfg.pretraining.synthetic_samples, seed=seed, device=ctx.device)
    ctx.metrics.synthetic_samples.inc(len(labels))
    save_grid(images, labels, ctx.out_dir / "synthetic_samples.png")
    log.info("sampled %d class-balanced synthetic images in %.2f s", len(labels), time.perf_counter() - started)
    ctx.recorder.record_event("synthetic", samples=len(labels), seconds=time.perf_counter() - started)
    ctx.synthetic = (images, labels)
    return ctx.synthetic


def synthetic_pretraining(ctx: PhaseContext, cvae_state: Mapping[str, torch.Tensor]) -> State:
    """Server-side only: sample, score (CAS) and pre-train. Returns the pre-trained classifier."""
    cfg = ctx.config
    if "pretrained" in ctx.run_state.tensors:  # resumed after this step
        return ctx.run_state.tensors["pretrained"]
    ctx.metrics.phase.state("synthetic")
    set_log_context(phase="synthetic", round=None)
    images, labels = synthetic_set(ctx, cvae_state)

    if cfg.pretraining.cas_epochs > 0 and ctx.run_state.step("cas") is None:
        started = time.perf_counter()
        cas_state = train_on_synthetic(cfg, images, labels, epochs=cfg.pretraining.cas_epochs, purpose="cas",
                                       device=ctx.device)
        save_checkpoint(ctx.out_dir / "cas_classifier.pt", "classifier", cas_state)
        cas = None
        if ctx.test_set is not None:
            cas = evaluate_classifier(model_from_state("classifier", cas_state, ctx.device), *ctx.test_set,
                                      device=ctx.device)["accuracy"]
            ctx.metrics.cas.set(cas)
        else:
            log.warning("no --test-data: CAS (accuracy on the real test set) cannot be computed")
        cas_federated = ctx.engine.evaluate("classifier", 0, cas_state, eval_task(cfg, "classifier"))
        ctx.metrics.cas_federated.set(cas_federated.weighted_accuracy)
        ctx.recorder.set(cas=cas, cas_federated=cas_federated.weighted_accuracy)
        ctx.recorder.record_event("cas", cas=cas, cas_federated=cas_federated.weighted_accuracy,
                                  seconds=time.perf_counter() - started)
        log.info("CAS %s, federated CAS %.4f (%d CAS epochs, %.1f s)", "-" if cas is None else f"{cas:.4f}",
                 cas_federated.weighted_accuracy, cfg.pretraining.cas_epochs, time.perf_counter() - started)
        ctx.checkpoint(step=("cas", {"cas": cas, "cas_federated": cas_federated.weighted_accuracy}))

    started = time.perf_counter()
    pretrained = train_on_synthetic(cfg, images, labels, epochs=cfg.pretraining.pretrain_epochs, purpose="pretrain",
                                    device=ctx.device)
    seconds = time.perf_counter() - started
    ctx.metrics.pretrain_seconds.set(seconds)
    save_checkpoint(ctx.out_dir / "pretrained_classifier.pt", "classifier", pretrained)
    ctx.recorder.record_event("pretrain", epochs=cfg.pretraining.pretrain_epochs, seconds=seconds)
    log.info("pre-trained ExquisiteNetV1 on synthetic data: %d epochs in %.1f s", cfg.pretraining.pretrain_epochs,
             seconds)
    ctx.checkpoint(pretrained=pretrained)
    return pretrained


def server_finetune(ctx: PhaseContext, cvae_state: Mapping[str, torch.Tensor] | None) -> ServerFineTune | None:
    """The classifier phase's post-aggregation fine-tuning on the synthetic set (None when off)."""
    settings = ctx.config.mitigations
    if not settings.server_finetune_steps:
        return None
    images, labels = synthetic_set(ctx, _needs_cvae(cvae_state, "--server-finetune-steps"))
    return ServerFineTune(images, labels, steps=settings.server_finetune_steps, lr=settings.server_finetune_lr,
                          batch_size=settings.server_finetune_batch_size, seed=ctx.config.reproducibility.seed,
                          device=ctx.device)


def server_distill(ctx: PhaseContext, cvae_state: Mapping[str, torch.Tensor] | None) -> ServerDistillation | None:
    """The classifier phase's post-aggregation distillation on the synthetic inputs (None when off)."""
    settings = ctx.config.mitigations
    if not settings.server_distill:
        return None
    images, _labels = synthetic_set(ctx, _needs_cvae(cvae_state, "--server-distill"))
    return ServerDistillation(images, settings.server_distill_teacher, steps=settings.server_distill_steps,
                              lr=settings.server_distill_lr, batch_size=settings.server_distill_batch_size,
                              temperature=settings.server_distill_temperature, seed=ctx.config.reproducibility.seed,
                              device=ctx.device)


def client_synthetic_mix(ctx: PhaseContext, cvae_state) -> ClientSyntheticMix | None:
    """The classifier phase's synthetic images for the classes each client lacks (None when off)."""
    ratio = ctx.config.mitigations.client_synthetic_mix
    if not ratio:
        return None
    images, labels = synthetic_set(ctx, _needs_cvae(cvae_state, "--client-synthetic-mix"))
    return ClientSyntheticMix(images, labels, ratio=ratio, seed=ctx.config.reproducibility.seed)


def _needs_cvae(cvae_state, option: str):
    if cvae_state is None:
        raise ValueError(f"{option} needs the CVAE that samples the synthetic set (--phase all, or --cvae-checkpoint)")
    return cvae_state


@dataclass
class PostAggregationSteps:
    """Several post-aggregation steps, one after the other (distillation, then fine-tuning): the
    engine checks the last one's model; the record keeps each step's under its kind."""

    steps: list

    @property
    def keeps_updates(self) -> bool:
        return any(step.keeps_updates for step in self.steps)

    def __call__(self, rnd: int, aggregate: State, models: RoundModels) -> tuple[State, dict]:
        state, parts = aggregate, {}
        for step in self.steps:
            state, info = step(rnd, state, models)
            parts[info["kind"]] = info
        return state, {"kind": "+".join(parts), **parts}


def post_aggregation_steps(ctx: PhaseContext, cvae_state) -> PostAggregation | None:
    """The classifier phase's server-side corrections of each aggregate, in order (None: none)."""
    steps = [step for step in (server_distill(ctx, cvae_state), server_finetune(ctx, cvae_state)) if step is not None]
    if len(steps) <= 1:
        return steps[0] if steps else None
    return PostAggregationSteps(steps)


def classifier_phase(ctx: PhaseContext, start: Mapping[str, torch.Tensor],
                     cvae_state: Mapping[str, torch.Tensor] | None = None) -> State:
    """The federated classifier rounds from ``start``; with --server-distill and/or
    --server-finetune-steps, each aggregate is distilled / fine-tuned on the synthetic set of
    ``cvae_state`` before it is broadcast."""
    cfg = ctx.config

    def test_fn(state):
        if ctx.test_set is None:
            return {}
        return evaluate_classifier(model_from_state("classifier", state, ctx.device), *ctx.test_set, device=ctx.device)

    state = _run_phase(ctx, "classifier", start, cfg.training.classifier_rounds, train_task(cfg, "classifier"),
                       eval_task(cfg, "classifier"), test_fn,
                       post_aggregation=post_aggregation_steps(ctx, cvae_state),
                       client_task=client_synthetic_mix(ctx, cvae_state))
    save_checkpoint(ctx.out_dir / "classifier.pt", "classifier", state)
    return state
