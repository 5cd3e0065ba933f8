"""Executes one task on the client's own shard: the only place a client touches its data.

The shard is converted to float tensors once (per binarisation setting) and kept on the device for
the whole run: no per-round data loading, no per-sample transforms.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Mapping

import torch

from genfl_shared.data import to_float_images
from genfl_shared.dp import ClientPrivacy
from genfl_shared.models import build_model
from genfl_shared.partition import Shard
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.tasks import TASK_KINDS, EvaluateTask, TaskSettingsError, TrainTask, from_header
from genfl_shared.training import evaluate_classifier, evaluate_cvae, train_classifier, train_cvae

log = logging.getLogger(__name__)


class TaskError(ValueError):
    """A task this client cannot execute (bad settings or weights that do not fit the model): the
    runner reports it back to the server in ResultHeader.error."""


def evaluation_metrics(evaluated: "TaskOutcome") -> dict[str, float]:
    """An evaluation's outcome as the eval_* metrics of a TRAIN result that evaluated first
    (eval_samples always; eval_loss / eval_accuracy where the evaluation has them)."""
    return {"eval_samples": float(evaluated.num_samples),
            **{f"eval_{name}": value for name, value in evaluated.metrics.items()}}


@dataclass
class TaskOutcome:
    num_samples: int
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None  # updated weights for TRAIN tasks


class TaskExecutor:
    def __init__(self, shard: Shard, device: torch.device, compute_lock: threading.Lock | None = None):
        self.shard = shard
        self.device = device
        # A client host's executors share one lock: their tasks run one after the other (torch's
        # global RNG, which training seeds, and its threads are the process's, not the client's).
        self._compute_lock = compute_lock or nullcontext()
        self._tensors: dict[bool, tuple[torch.Tensor, ...]] = {}
        # One model per kind for the whole run: every task overwrites all of its weights and
        # buffers (strict load), so re-building (and randomly initialising) it per task is waste.
        self._models: dict[str, torch.nn.Module] = {}
        # DP-SGD: one accountant for the life of the process, so epsilon accumulates over rounds.
        self._privacy: ClientPrivacy | None = None
        # torch imports its compiler stack lazily when the first optimiser is built (about a CPU
        # second); pay that at start-up rather than inside the first round.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    def _data(self, binarize: bool):
        if binarize not in self._tensors:
            s = self.shard
            self._tensors[binarize] = (
                to_float_images(s.train_images, binarize=binarize).to(self.device),
                torch.as_tensor(s.train_labels, dtype=torch.int64).to(self.device),
                to_float_images(s.heldout_images, binarize=binarize).to(self.device),
                torch.as_tensor(s.heldout_labels, dtype=torch.int64).to(self.device),
            )
        return self._tensors[binarize]

    def run(self, header: pb.TaskHeader, weights: Mapping[str, torch.Tensor] | None,
            synthetic: Mapping[str, torch.Tensor] | None = None) -> TaskOutcome:
        """Execute one TRAIN or EVALUATE task (``synthetic``: the tensors of its synthetic images'
        payload, as received); raises TaskError for one it cannot execute."""
        with self._compute_lock:
            return self._run(header, weights, synthetic)

    def _run(self, header: pb.TaskHeader, weights: Mapping[str, torch.Tensor] | None,
             synthetic: Mapping[str, torch.Tensor] | None) -> TaskOutcome:
        if header.type not in TASK_KINDS:
            raise TaskError(f"task {header.task_id}: cannot execute task type {header.type}")
        try:
            settings = from_header(header, synthetic)
        except TaskSettingsError as error:
            raise TaskError(f"task {header.task_id}: {error}") from None
        if weights is None:
            raise TaskError(f"task {header.task_id}: came without weights")
        if isinstance(settings, TrainTask) and settings.deterministic \
                and not torch.are_deterministic_algorithms_enabled():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        if settings.model not in self._models:
            self._models[settings.model] = build_model(settings.model).to(self.device)
        model = self._models[settings.model]
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise TaskError(f"task {header.task_id}: weights do not fit a {settings.model} model: {error}") from None
        train_x, train_y, held_x, held_y = self._data(settings.binarize)
        if isinstance(settings, EvaluateTask):
            return self._evaluate(settings, model, held_x, held_y)
        first_evaluation = settings.first_evaluation()
        evaluated = None if first_evaluation is None else self._evaluate(first_evaluation, model, held_x, held_y)
        try:
            train_x, train_y = self._with_synthetic(settings, train_x, train_y)
        except TaskSettingsError as error:
            raise TaskError(f"task {header.task_id}: {error}") from None
        outcome = self._train(settings, model, train_x, train_y, real_samples=len(self.shard.train_labels))
        if evaluated is not None:
            outcome.metrics.update(evaluation_metrics(evaluated))
        return outcome

    def _with_synthetic(self, task: TrainTask, x, y):
        """The train part with the task's synthetic images mixed in (--client-synthetic-mix):
        round(synthetic_mix x real samples) of them, drawn with replacement (seeded by the task)
        from those the server sent for the classes this client lacks; (x, y) as they are without."""
        synthetic = task.synthetic_set()
        if synthetic is None:
            return x, y
        images, labels = synthetic
        count = round(task.synthetic_mix * len(y))
        generator = torch.Generator().manual_seed(task.seed)
        chosen = torch.randint(len(labels), (count,), generator=generator)
        extra_x = to_float_images(images[chosen.numpy()], binarize=task.binarize).to(self.device)
        extra_y = torch.as_tensor(labels[chosen.numpy()], dtype=torch.int64).to(self.device)
        log.info("mixing %d synthetic images of classes %s (%d sent) into %d real ones", count,
                 sorted(set(labels.tolist())), len(labels), len(y))
        return torch.cat([x, extra_x]), torch.cat([y, extra_y])

    def _train(self, task: TrainTask, model, x, y, real_samples: int) -> TaskOutcome:
        common = dict(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, seed=task.seed,
                      device=self.device, prox_mu=task.prox_mu)
        started = time.perf_counter()
        privacy = self._privacy_for(task, len(y))
        if task.model == "cvae":  # TrainTask guarantees Adam: train_cvae takes no optimiser
            result = train_cvae(model, x, y, privacy=privacy, **common)
        else:
            result = train_classifier(model, x, y, optimizer=task.optimizer, momentum=task.sgd_momentum,
                                      loss=task.local_loss, **common)
        seconds = time.perf_counter() - started
        metrics = {"train_seconds": seconds, "steps": float(result["steps"])}
        if not math.isnan(result["loss"]):
            metrics["loss"] = result["loss"]
        if privacy is not None:
            metrics["dp_epsilon"] = privacy.epsilon()  # spent over every round so far
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # The FedAvg weight is the real samples' count: synthetic ones are the server's own data.
        return TaskOutcome(min(result["samples"], real_samples), metrics, state)

    def _privacy_for(self, task: TrainTask, num_samples: int) -> ClientPrivacy | None:
        """The process's accountant for a DP task (made by the first one), or None without DP."""
        settings = task.dp_settings()
        if settings is None:
            return None
        shape = dict(num_samples=num_samples, batch_size=task.batch_size, epochs=task.epochs)
        try:
            if self._privacy is None:
                self._privacy = ClientPrivacy(settings, **shape)
            else:
                self._privacy.check_same_run(settings, **shape)
        except ValueError as error:
            raise TaskError(f"DP-SGD: {error}") from None
        return self._privacy

    def _evaluate(self, task: EvaluateTask, model, x, y) -> TaskOutcome:
        if len(y) == 0:
            return TaskOutcome(0, {}, None)
        if task.model == "cvae":
            result = evaluate_cvae(model, x, y, seed=task.seed, device=self.device)
            metrics = {"loss": result["loss"]}
        else:
            result = evaluate_classifier(model, x, y, device=self.device)
            metrics = {"loss": result["loss"], "accuracy": result["accuracy"]}
        if not math.isfinite(metrics["loss"]):
            # A diverged model's loss is no number: reported as missing (the server refuses NaN).
            del metrics["loss"]
        return TaskOutcome(result["samples"], metrics, None)
