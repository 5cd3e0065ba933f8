"""Server-side ensemble distillation (a mitigation of label skew; FedDF: Lin et al. 2020, "Ensemble Distillation for
Robust Model Fusion in Federated Learning"): after every classifier aggregation, the aggregate (the
student) is trained on the server's synthetic INPUTS to match the mean logits of a teacher set, and
that model is broadcast instead.

The teacher is, by default, the ensemble of the round's clients' models: the updates the round's
aggregate was made of, and only those (an update the guard refused or clipped is never a teacher;
RoundEngine decides, see ``RoundModels``). Keeping them costs about 2 K x the model's size on the server
for the length of one round (the updates and, while distilling, their teacher modules; ExquisiteNetV1:
3.7 MB each, so about 75 MB for 10 clients), which is why
``--server-distill-max-teachers`` caps K at start-up. ``--server-distill-teacher previous`` uses
the round's starting global model instead (one model of memory; it pulls the aggregate back
towards what it was rather than towards what the clients learnt), and only when asked for.

BatchNorm statistics stay the aggregate's (from the clients' real data) while it is distilled.
The synthetic labels are not used: FedDF distils on unlabelled data, and the set is class-balanced
by construction, so uniformly drawn batches are balanced in expectation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genfl_shared.config import DISTILL_TEACHERS as TEACHERS
from genfl_shared.models import model_from_state
from genfl_shared.seeding import derive_seed

log = logging.getLogger(__name__)

State = dict[str, Tensor]

# Synthetic inputs on which KL(teacher || student) and top-1 agreement are measured before and
# after the steps (a seeded subset, the same for both measurements of a round).
MEASURE_SAMPLES = 1000
# Teacher logits are computed this many images at a time when measuring (bounded memory).
_EVAL_BATCH = 500


@torch.no_grad()
def ensemble_logits(teachers: Sequence[torch.nn.Module], images: Tensor) -> Tensor:
    """The mean of the teachers' logits on ``images`` (FedDF's ensemble), teachers in eval mode."""
    total = None
    for teacher in teachers:
        logits = teacher(images).float()
        total = logits if total is None else total.add_(logits)
    return total.div_(len(teachers))


def _kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), batch mean, times T^2 (Hinton et al.'s
    scaling, so the gradient's size does not depend on T)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature,
                    dim=1), reduction="batchmean", log_target=True) * temperature ** 2


@torch.no_grad()
def _measure(student: torch.nn.Module, teacher_logits: Tensor, images: Tensor, temperature: float) -> tuple[float, float]:
    """(KL at ``temperature``, top-1 agreement) of the student with precomputed teacher logits."""
    was_training = student.training
    student.eval()
    kl_sum, agree = 0.0, 0
    for start in range(0, len(images), _EVAL_BATCH):
        logits = student(images[start:start + _EVAL_BATCH]).float()
        teacher = teacher_logits[start:start + _EVAL_BATCH]
        kl_sum += float(_kl(teacher, logits, temperature)) * len(logits)
        agree += int((logits.argmax(1) == teacher.argmax(1)).sum())
    student.train(was_training)
    return kl_sum / len(images), agree / len(images)


class NoTeacher(ValueError):
    """No teacher to distil towards (none given, or none that gives finite logits)."""


@torch.no_grad()
def _logits(model: torch.nn.Module, images: Tensor) -> Tensor:
    """``model``'s float logits on ``images``, _EVAL_BATCH at a time (the batches ensemble_logits
    would see, so that their mean is the same to the bit)."""
    return torch.cat([model(images[s:s + _EVAL_BATCH]).float() for s in range(0, len(images), _EVAL_BATCH)])


def _train_with_frozen_batchnorm(model: torch.nn.Module) -> None:
    """Train mode (dropout on) with every BatchNorm normalising by its running statistics, which
    stay as they are: those are the clients' (estimated on real images), and synthetic inputs must
    not replace them. (Letting them adapt, a weak CVAE's near-constant images drove running
    variances to ~0 and the next round's model to NaN on real data, measured in test_resume.)"""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def distill_classifier(student_state: Mapping[str, Tensor], teacher_states: Sequence[Mapping[str, Tensor]],
                       images: Tensor, *, steps: int, lr: float, batch_size: int, temperature: float, seed: int,
                       device: torch.device) -> tuple[State, dict]:
    """The classifier ``student_state`` after ``steps`` Adam steps minimising the KL of its softened
    predictions to the teachers' mean logits on batches of ``images`` (uniform draws without
    replacement, reshuffled when used up; repeatable for a seed). Returns (CPU state, what ran:
    steps, seconds, teachers, and KL / agreement with the ensemble on MEASURE_SAMPLES of the
    images, before and after)."""
    if not teacher_states:
        raise NoTeacher("distillation needs at least one teacher")
    if steps < 1 or batch_size < 1 or not temperature > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and temperature > 0, got {steps}, {batch_size}, "
                         f"{temperature}")
    started = time.perf_counter()
    teachers = [model_from_state("classifier", state, device).eval() for state in teacher_states]
    student = model_from_state("classifier", student_state, device)
    images = images.to(device)
    generator = torch.Generator().manual_seed(seed)
    measured = images[torch.randperm(len(images), generator=generator)[:MEASURE_SAMPLES].to(device)]
    # A teacher is a client's update as sent: finite weights can still give non-finite logits (a
    # negative BatchNorm running variance, which a FedAvg mean hides), and one such teacher would
    # make the whole ensemble NaN. It is left out, and said so.
    # Each teacher's logits on the measured inputs, once: they decide which teachers stay and, averaged,
    # are the ensemble both measurements compare with.
    measured_logits = [_logits(teacher, measured) for teacher in teachers]
    finite = [i for i, logits in enumerate(measured_logits) if bool(torch.isfinite(logits).all())]
    dropped = [i for i in range(len(teachers)) if i not in finite]
    teachers = [teachers[i] for i in finite]
    if not teachers:
        raise NoTeacher(f"all {len(dropped)} teachers give non-finite logits on the synthetic inputs")
    measured_teacher = measured_logits[finite[0]]
    for i in finite[1:]:
        measured_teacher = measured_teacher.add_(measured_logits[i])
    measured_teacher = measured_teacher.div_(len(finite))
    del measured_logits
    kl_before, agreement_before = _measure(student, measured_teacher, measured, temperature)

    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    torch.manual_seed(seed)  # dropout masks come from the global RNG, as in train_classifier
    _train_with_frozen_batchnorm(student)
    order, cursor = torch.randperm(len(images), generator=generator), 0
    loss_sum = torch.zeros((), device=device)
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        batch = images[order[cursor:cursor + batch_size].to(device)]
        cursor += batch_size
        target = ensemble_logits(teachers, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = _kl(target, student(batch).float(), temperature)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    kl_after, agreement_after = _measure(student, measured_teacher, measured, temperature)
    distilled = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    return distilled, {"steps": steps, "teachers": len(teachers), "dropped_teachers": dropped,
                       "temperature": temperature,
                       "loss": loss_sum.item() / steps, "kl_before": kl_before, "kl_after": kl_after,
                       "agreement_before": agreement_before, "agreement_after": agreement_after,
                       "seconds": time.perf_counter() - started}


@dataclass
class ServerDistillation:
    """The classifier phase's post-aggregation hook (RoundEngine.run_rounds' ``post_aggregation``):
    ``hook(round, aggregate, round_models) -> (distilled state, what to record)``."""

    images: Tensor  # the server's synthetic set (its labels are not used)
    teacher: str  # "clients" (the round's accepted updates) or "previous" (the round's start)
    steps: int
    lr: float
    batch_size: int
    temperature: float
    seed: int  # the run's; each round's steps get their own seed from it
    device: torch.device

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown distillation teacher {self.teacher!r}; choose from {TEACHERS}")

    @property
    def keeps_updates(self) -> bool:
        """Whether the round engine must keep the round's accepted updates for this hook."""
        return self.teacher == "clients"

    def __call__(self, rnd: int, aggregate: Mapping[str, Tensor], models) -> tuple[State, dict]:
        if self.teacher == "clients":
            teacher_ids = sorted(models.accepted)
            teachers = [models.accepted[cid] for cid in teacher_ids]
        else:
            teacher_ids, teachers = [], [models.previous]
        try:
            distilled, info = distill_classifier(aggregate, teachers, self.images, steps=self.steps, lr=self.lr,
                                                 batch_size=self.batch_size, temperature=self.temperature,
                                                 seed=derive_seed(self.seed, "distill", rnd), device=self.device)
        except NoTeacher as error:
            # E.g. every update of the round was clipped (a clipped update is never a teacher): the
            # aggregate stands as it is, and the round with it.
            log.warning("server distillation after round %d skipped: %s; broadcasting the aggregate", rnd,
                        error if teachers else "no unclipped client update to distil towards")
            return dict(aggregate), {"kind": "server_distill", "teacher": self.teacher, "teacher_clients": teacher_ids,
                                     "skipped": str(error) if teachers else "no unclipped client update"}
        if info["dropped_teachers"]:
            dropped = [teacher_ids[i] if teacher_ids else "previous" for i in info["dropped_teachers"]]
            log.warning("server distillation after round %d: left out %s (non-finite logits on the synthetic "
                        "inputs)", rnd, ", ".join(dropped))
            info["dropped_teachers"] = dropped
            teacher_ids = [cid for cid in teacher_ids if cid not in dropped]
        log.info("server distillation after round %d: %d steps towards %s, KL %.4f -> %.4f, agreement "
                 "%.3f -> %.3f (%.2f s)", rnd, info["steps"],
                 f"{len(teachers)} clients' models" if self.teacher == "clients" else "the previous global model",
                 info["kl_before"], info["kl_after"], info["agreement_before"], info["agreement_after"],
                 info["seconds"])
        return distilled, {"kind": "server_distill", "teacher": self.teacher, "teacher_clients": teacher_ids,
                           **info}
