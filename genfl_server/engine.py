"""The round engine: federated rounds over whatever model the phase hands it.

It knows nothing of CVAEs or classifiers: a phase gives it a model, the task settings the clients
need (genfl_shared.tasks), a strategy, and optionally a server-side test function. A round reads
as the method does (``train_round``): configure -> dispatch -> fold each update through the guard
-> finish -> post-aggregation -> evaluate -> (the phase) checkpoint.

One download per client per round: round r's aggregate is what round r + 1 trains from, so its
client evaluation rides on round r + 1's TRAIN task (``evaluate_first``: the client evaluates the
received weights, then trains, and reports both). Round r's record (a ``PendingEvaluation`` until
then) is therefore complete, and written, once round r + 1's training returns; only a phase's last
round sends an EVALUATE task of its own. The evaluation is asked of exactly the clients a separate
evaluation step would have asked (every registered client, in the round's first training attempt;
a redo or retry does not ask again whoever already answered it), with the same per-client seeds,
so the numbers are the same.

A step waits for every client, except that once it has the results it needs
(``--min-fit-clients``) it stops waiting for clients that are away (presence.py).

A client that cannot execute its task reports an error instead of a result: it counts as failed
for that step (nobody waits for it), and a step left with too few results fails with the clients'
errors in its message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Protocol

import torch

from genfl_shared.cli import set_log_context
from genfl_shared.codec import Payload, encode_state_dict, task_frame
from genfl_shared.config import AggregationSettings
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.seeding import derive_seed
from genfl_shared.tasks import EvaluateTask, TaskSettings, TrainTask

from .coordinator import ClientInfo, Coordinator, Task, TaskBatch, TaskResult
from .guard import RoundGuard, UpdateGuard, aggregate_problem
from .metrics import ServerMetrics
from .results import RunRecorder
from .strategy import Instruction, Strategy, build_strategy
from .updates import TensorUpdate, Update

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
TestFn = Callable[[Mapping[str, torch.Tensor]], dict]


@dataclass(frozen=True)
class RoundModels:
    """What a post-aggregation step may use besides the aggregate: the model the round's clients
    trained from, and (only when the step's ``keeps_updates`` is true) the updates the aggregate was
    made of, client_id -> update as received. Refused updates (norm bounds, a bad aggregate's
    farthest one) and clipped ones are never in ``accepted``."""

    previous: Mapping[str, torch.Tensor]
    accepted: Mapping[str, Mapping[str, torch.Tensor]]


class PostAggregation(Protocol):
    """A phase's server-side correction of each aggregate (the classifier phase's synthetic
    fine-tuning or distillation): (round, accepted aggregate, RoundModels) -> (the model to
    broadcast instead, what to record of the step). With ``keeps_updates`` true the engine keeps
    the round's accepted updates for it (K models of memory during the round)."""

    keeps_updates: bool

    def __call__(self, rnd: int, aggregate: State, models: RoundModels) -> tuple[State, dict]: ...


# (client, round, its seeded TRAIN task) -> the task it is sent: a phase's per-client additions
# (the classifier phase's synthetic images for the classes a client lacks).
ClientTask = Callable[[ClientInfo, int, TrainTask], TrainTask]


class RoundFailed(RuntimeError):
    """A round could not complete (clients missing at the deadline, or unable to run their task)."""


@dataclass
class StepResults:
    results: list[TaskResult]  # in client order
    errors: dict[str, str]  # client_id -> why it could not execute its task


@dataclass
class EvalReport:
    weighted_accuracy: float | None  # None for models without an accuracy (the CVAE)
    weighted_loss: float
    samples: int
    per_client: dict[str, dict]


@dataclass(frozen=True)
class PhasePlan:
    """What a phase's rounds run: its tasks, strategy and server-side steps."""

    phase: str
    rounds: int
    train_task: TrainTask
    eval_task: EvaluateTask
    strategy: Strategy
    test_fn: TestFn | None = None
    post_aggregation: PostAggregation | None = None
    client_task: ClientTask | None = None


@dataclass
class PendingEvaluation:
    """A round whose aggregate stands but whose record awaits the clients' evaluation of it, which
    the next round's training brings (``answers``: client_id -> its evaluation, filled in as the
    next round's results arrive). ``record`` is what the run state saves, so a resumed phase
    completes it the same way."""

    record: dict  # phase, round, test_accuracy, test_loss, train_loss, seconds[, post_aggregation]
    answers: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def phase(self) -> str:
        return self.record["phase"]

    @property
    def round(self) -> int:
        return self.record["round"]


@dataclass(frozen=True)
class Aggregate:
    """A round's training: the aggregate that passed the guard, and what it was made of."""

    model: State
    train_loss: float | None
    # client_id -> update as received, for a post-aggregation step that keeps them (else empty).
    accepted: Mapping[str, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class RoundResult:
    """A finished round: the model the next round trains from, and its record (complete once its
    evaluation rides in on the next round's training)."""

    model: State
    pending: PendingEvaluation


class Aggregation:
    """One training attempt's running aggregate: each arriving update passes the round's guard and
    is folded into the strategy (on the upload's thread, serialised by the step's batch)."""

    def __init__(self, strategy: Strategy, guard: RoundGuard, metrics: ServerMetrics, *,
                 deterministic: bool, keep_updates: bool):
        self.strategy = strategy
        self.guard = guard
        self.metrics = metrics
        # Deterministic mode sums updates in client order instead of arrival order (float addition
        # is not associative), at the cost of holding every update of a round in memory: whole
        # tensors, summed as whole tensors, so the chunking of an upload changes nothing.
        self.deterministic = deterministic
        self.held: dict[str, tuple[float, Update]] = {}
        self.keep_updates = keep_updates
        self.kept: dict[str, Mapping[str, torch.Tensor]] = {}

    def fold(self, task: Task, num_samples: int, update: Update) -> None:
        received = update
        weight, update = self.guard.admit(task.client_id, num_samples, update, start=task.model)
        if self.keep_updates:  # admitted only; an upload holds its received bytes: one model's size, no copy
            self.kept[task.client_id] = received
        if self.deterministic:
            self.held[task.client_id] = (weight, TensorUpdate({name: update[name] for name in update}))
            return
        started = time.perf_counter()
        self.strategy.accumulate(update, weight)
        self.metrics.aggregation_seconds.observe(time.perf_counter() - started)

    def close(self) -> None:
        """The step is over: fold in what was held, in client order."""
        for client_id in sorted(self.held):
            weight, update = self.held[client_id]
            self.strategy.accumulate(update, weight)
        self.held.clear()

    def accepted(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """The kept updates that went into the aggregate as received (a clipped one went in scaled down)."""
        return {cid: update for cid, update in self.kept.items() if cid not in self.guard.clipped}


def _named_strategy(name: str) -> Strategy:
    """The strategy ``name`` with the run settings' defaults for its own settings."""
    return build_strategy(AggregationSettings(strategy=name).strategy_settings())


def weighted_mean(results: list[TaskResult], key: str) -> float | None:
    """Sample-weighted mean of a metric over results; None when no result reports it."""
    pairs = [(r.metrics[key], r.num_samples) for r in results if key in r.metrics]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


class RoundEngine:
    def __init__(self, coordinator: Coordinator, metrics: ServerMetrics, recorder: RunRecorder, *,
                 seed: int, round_timeout: float | None = None, min_clients: int | None = None,
                 round_retries: int = 2, deterministic: bool = False, guard: UpdateGuard | None = None):
        self.coordinator = coordinator
        self.metrics = metrics
        self.recorder = recorder
        self.seed = seed
        self.round_timeout = round_timeout
        self.min_clients = min_clients  # None: every registered client must answer
        self.round_retries = round_retries
        self.deterministic = deterministic
        self.guard = guard if guard is not None else UpdateGuard()
        self.clients: list[ClientInfo] = []

    def wait_for_clients(self, timeout: float | None) -> None:
        log.info("waiting for %d clients", self.coordinator.expected_clients)
        self.clients = self.coordinator.wait_for_clients(timeout)
        log.info("all %d clients registered: %s", len(self.clients), ", ".join(c.client_id for c in self.clients))

    # -- a phase's rounds ---------------------------------------------------------------------
    def run_rounds(self, phase: str, state: Mapping[str, torch.Tensor], *, rounds: int, train_task: TrainTask,
                   eval_task: EvaluateTask, strategy: Strategy | str = "fedavg", test_fn: TestFn | None = None,
                   start_round: int = 1, on_round_end: Callable[[int, State], None] | None = None,
                   post_aggregation: PostAggregation | None = None, client_task: ClientTask | None = None) -> State:
        """Rounds ``start_round..rounds`` from ``state``; ``on_round_end(round, state)`` after each
        round's aggregate (the phase checkpoints there, with the recorder's pending record), and
        once more after the last round's record.

        ``post_aggregation`` (optional) replaces each accepted aggregate by its result before
        anything sees it (test set, checkpoint, next round's broadcast), checked as an aggregate is;
        the round's record keeps what it reports under "post_aggregation". ``client_task``
        (optional) adjusts each client's TRAIN task before it is sent.

        A resumed phase finds the record of its last completed round still pending and completes
        it the same way."""
        # One strategy for the whole phase: stateful ones (FedAvgM's momentum) carry across rounds.
        plan = PhasePlan(phase, rounds, replace(train_task, deterministic=self.deterministic), eval_task,
                         _named_strategy(strategy) if isinstance(strategy, str) else strategy, test_fn,
                         post_aggregation, client_task)
        model = dict(state)
        self.metrics.phase.state(phase)
        pending = self._resumed_pending(phase, start_round)
        for rnd in range(start_round, rounds + 1):
            result = self.train_round(plan, rnd, model, pending)
            model, pending = result.model, result.pending
            self.recorder.hold_round(pending.record)
            if on_round_end is not None:
                on_round_end(rnd, model)
        if pending is not None:  # the last round's model: an evaluation of its own
            self._evaluate_last_round(plan, model, pending)
            if on_round_end is not None:
                on_round_end(pending.round, model)
        set_log_context(round=None)
        return model

    def train_round(self, plan: PhasePlan, rnd: int, model: State,
                    pending: PendingEvaluation | None) -> RoundResult:
        """One round from ``model``: the clients train (and evaluate ``model``, completing the
        ``pending`` record of the round that made it), the aggregate passes the guard and the
        phase's post-aggregation step, and the test set scores it."""
        started = time.perf_counter()
        self.metrics.round.set(rnd)
        set_log_context(phase=plan.phase, round=rnd)
        try:
            aggregate = self.fit(plan, rnd, model, pending)
        except RoundFailed:
            if pending is not None:
                self._record_before_failing(plan, pending, model)
            raise
        if pending is not None:
            self._complete_round(pending, self.evaluate(plan.phase, rnd - 1, model, plan.eval_task,
                                                        pending.answers, plan.strategy), plan.rounds)
        new_model, train_loss, post = aggregate.model, aggregate.train_loss, None
        if plan.post_aggregation is not None:
            new_model, post = self._post_aggregate(plan.phase, rnd, new_model, plan.post_aggregation,
                                                   RoundModels(previous=model, accepted=aggregate.accepted))
        del aggregate  # the kept updates live for the round only
        test = plan.test_fn(new_model) if plan.test_fn else {}
        record = {
            "phase": plan.phase,
            "round": rnd,
            "test_accuracy": test.get("accuracy"),
            "test_loss": test.get("loss"),
            "train_loss": train_loss,
            "seconds": time.perf_counter() - started,  # its evaluation rides on the next round
            **({"post_aggregation": post} if post is not None else {}),
        }
        return RoundResult(new_model, PendingEvaluation(record))

    def fit(self, plan: PhasePlan, rnd: int, model: State, pending: PendingEvaluation | None) -> Aggregate:
        """Local training on every client and the aggregate of their updates.

        With ``pending``, the clients first evaluate ``model`` (the previous round's aggregate) on
        their held-out part, seeded as that round's EVALUATE tasks would be, into ``pending.answers``
        (also when the round fails). A client is asked once: a redo or retry does not ask whoever
        answered.

        The round is redone without every client its RoundGuard names (an update beyond the norm
        bounds, or the likeliest cause of a non-finite or absurd aggregate), until it is clean:
        a bad aggregate never becomes the global model. (A rejected update says nothing against
        its sender's evaluation of the previous model, which counts as it would have before.)
        """
        excluded: dict[str, str] = {}
        while True:
            clients = [c for c in self.clients if c.client_id not in excluded]
            if not clients:
                raise RoundFailed(f"{plan.phase} round {rnd}: every client's update was rejected ({excluded})")
            carried = plan.strategy.state_dict()  # FedAvgM's velocity, restored if the aggregate is refused
            aggregation, results = self._train(plan, rnd, model, clients, pending)
            offenders = aggregation.guard.offenders()
            if not offenders:
                new_model = plan.strategy.finish()
                offenders = aggregation.guard.check_aggregate(new_model)
                if not offenders:
                    return Aggregate(new_model, weighted_mean(results, "loss"), aggregation.accepted())
                plan.strategy.load_state_dict(carried)
            for client_id, reason in sorted(offenders.items()):
                self.metrics.updates_rejected.labels(reason).inc()
                log.error("%s round %d: update of client %s rejected (%s: distance %.4g, round median %.4g); "
                          "redoing the round without it", plan.phase, rnd, client_id, reason,
                          aggregation.guard.distances.get(client_id, float("nan")),
                          aggregation.guard.median_distance())
            excluded.update(offenders)

    def _train(self, plan: PhasePlan, rnd: int, model: State, clients: list[ClientInfo],
               pending: PendingEvaluation | None) -> tuple[Aggregation, list[TaskResult]]:
        """Train on ``clients`` and fold their updates into the strategy (not finished yet), with
        bounded retries; returns the last attempt's aggregation and the results."""
        aggregation: Aggregation | None = None

        def attempt(required: int) -> StepResults:
            nonlocal aggregation
            plan.strategy.begin(model)  # a retried round starts a fresh sum
            guard = self.guard.round(model, {c.client_id: c.num_train_samples for c in clients})
            aggregation = Aggregation(plan.strategy, guard, self.metrics, deterministic=self.deterministic,
                                      keep_updates=plan.post_aggregation is not None
                                      and plan.post_aggregation.keeps_updates)
            tasks = {c.client_id: self._train_task(plan, rnd, c, pending) for c in clients}
            step = self._run_batch(pb.TASK_TYPE_TRAIN, plan.phase, rnd,
                                   plan.strategy.configure_train(rnd, model, tasks), on_update=aggregation.fold,
                                   quorum=required)
            aggregation.close()
            if pending is not None:
                for result in step.results:
                    if result.task.config.evaluate_first:
                        pending.answers.setdefault(result.task.client_id, first_evaluation(result))
            return step

        results = self._with_retries("training", plan.phase, rnd, attempt, asked=len(clients))
        return aggregation, results

    def _train_task(self, plan: PhasePlan, rnd: int, client: ClientInfo,
                    pending: PendingEvaluation | None) -> TrainTask:
        """The client's TRAIN task this round: seeded, with the phase's per-client additions, and
        asking it to evaluate the model first when the previous round still awaits its answer."""
        task = self.seeded(plan.train_task, pb.TASK_TYPE_TRAIN, plan.phase, rnd, client.client_id)
        if plan.client_task is not None:
            task = plan.client_task(client, rnd, task)
        if pending is None or client.client_id in pending.answers:
            return task
        # The seed round rnd - 1's own EVALUATE task would have had.
        return replace(task, evaluate_first=True,
                       evaluate_seed=derive_seed(self.seed, plan.phase, rnd - 1, client.client_id,
                                                 pb.TaskType.Name(pb.TASK_TYPE_EVALUATE)))

    def evaluate(self, phase: str, rnd: int, state: Mapping[str, torch.Tensor],
                 settings: EvaluateTask, evaluated: Mapping[str, TaskResult] | None = None,
                 strategy: Strategy | None = None) -> EvalReport:
        """Every client evaluates ``state`` on its held-out part; with ``evaluated`` (client_id ->
        an evaluation of ``state`` already in, e.g. from the next round's training), only the
        others are asked, and only when those in are fewer than a step requires."""
        evaluated = dict(evaluated or {})
        strategy = strategy if strategy is not None else Strategy()  # one model for every client
        required = self._required()
        if len(evaluated) < required:
            others = [c for c in self.clients if c.client_id not in evaluated]
            tasks = {c.client_id: self.seeded(settings, pb.TASK_TYPE_EVALUATE, phase, rnd, c.client_id)
                     for c in others}
            results = self._with_retries(
                "evaluation", phase, rnd, lambda needed: self._run_batch(
                    pb.TASK_TYPE_EVALUATE, phase, rnd, strategy.configure_evaluate(rnd, state, tasks), quorum=needed),
                asked=len(others), required=required - len(evaluated))
            evaluated.update((r.task.client_id, r) for r in results)
        results = sorted(evaluated.values(), key=lambda r: r.task.client_id)
        return EvalReport(
            weighted_accuracy=weighted_mean(results, "accuracy"),
            weighted_loss=weighted_mean(results, "loss"),
            samples=sum(r.num_samples for r in results),
            per_client={r.task.client_id: dict(r.metrics, samples=r.num_samples) for r in results},
        )

    # -- one step over the clients ------------------------------------------------------------
    def seeded(self, settings: TaskSettings, task_type: int, phase: str, rnd: int, client_id: str) -> TaskSettings:
        """``settings`` with the client's seed for this task: per client and round, so repeatable
        whatever order the clients run in."""
        return replace(settings, seed=derive_seed(self.seed, phase, rnd, client_id, pb.TaskType.Name(task_type)))

    def _run_batch(self, task_type: int, phase: str, rnd: int, instructions: Mapping[str, Instruction], *,
                   on_update=None, quorum: int | None = None) -> StepResults:
        """One task per client of ``instructions`` (client_id -> its task and start model); returns
        the results (and the clients' errors) that arrived by the deadline, or by the time
        ``quorum`` results are in and only clients that are away have not answered.

        A client that dropped out still gets its task: if it comes back in time it answers, and
        otherwise it takes part again from the next step on.
        """
        payloads: dict[int, Payload] = {}  # id(model) -> its encoding: a shared model is serialized once
        tasks = []
        for client_id, instruction in instructions.items():
            model = instruction.model
            if id(model) not in payloads:
                payloads[id(model)] = encode_state_dict(model, wrap=task_frame)
            tasks.append(self.coordinator.new_task(client_id, task_type, phase, rnd, instruction.task,
                                                   payloads[id(model)], model))
        batch: TaskBatch = self.coordinator.dispatch(tasks, on_update=on_update)
        in_time = batch.wait(self.round_timeout, quorum=quorum, is_away=self.coordinator.presence.is_away)
        if not batch.complete:
            self.coordinator.close(batch)  # from here on, results count as late
            missing = ", ".join(sorted(t.client_id for t in batch.unanswered()))
            if in_time:
                log.warning("%s round %d: %d of %d clients answered; missing %s (away: not waited for)", phase,
                            rnd, len(batch.results) + len(batch.failures), len(tasks), missing)
            else:
                log.warning("%s round %d: %d of %d clients answered within %.0f s; missing %s", phase, rnd,
                            len(batch.results) + len(batch.failures), len(tasks), self.round_timeout, missing)
        errors = {batch.tasks[task_id].client_id: message for task_id, message in batch.failures.items()}
        return StepResults(sorted(batch.results.values(), key=lambda r: r.task.client_id),
                           dict(sorted(errors.items())))

    def _required(self, asked: int | None = None) -> int:
        """Results a step needs from the ``asked`` clients (default: all registered)."""
        asked = len(self.clients) if asked is None else asked
        return asked if self.min_clients is None else min(self.min_clients, asked)

    def _with_retries(self, step: str, phase: str, rnd: int, attempt_fn, asked: int | None = None,
                      required: int | None = None) -> list[TaskResult]:
        """Run a step until at least ``required`` (default: the required number) of the ``asked``
        clients answered (bounded retries); ``attempt_fn(required)`` runs one attempt.

        A retry sends the same settings and weights again, so it cannot cure a client's task error:
        when the clients that did not report one are too few, the step fails at once."""
        asked = len(self.clients) if asked is None else asked
        required = self._required(asked) if required is None else required
        why = ""
        for attempt in range(1 + self.round_retries):
            step_results = attempt_fn(required)
            results, errors = step_results.results, step_results.errors
            if len(results) >= required:
                return results
            why = "".join(f"; client {cid} could not execute its task: {message}"
                          for cid, message in errors.items())
            if asked - len(errors) < required:
                raise RoundFailed(f"{phase} round {rnd}: {step} got {len(results)} results, "
                                  f"{required} required{why}")
            log.warning("%s round %d: %s got %d results, %d required%s; %s", phase, rnd, step, len(results),
                        required, why, "retrying" if attempt < self.round_retries else "giving up")
        raise RoundFailed(f"{phase} round {rnd}: {step} got fewer than {required} results "
                          f"in {1 + self.round_retries} attempts of {self.round_timeout} s{why}")

    # -- records --------------------------------------------------------------------------------
    def _resumed_pending(self, phase: str, start_round: int) -> PendingEvaluation | None:
        """The record a resumed phase left pending: its last completed round's."""
        saved = self.recorder.pending_round(phase)
        if saved is None:
            return None
        if saved["round"] != start_round - 1:
            raise RuntimeError(f"{phase}: the pending record is of round {saved['round']}, "
                               f"but the phase resumes at round {start_round}")
        return PendingEvaluation(saved)

    def _evaluate_last_round(self, plan: PhasePlan, model: State, pending: PendingEvaluation) -> None:
        started = time.perf_counter()
        set_log_context(phase=plan.phase, round=pending.round)
        report = self.evaluate(plan.phase, pending.round, model, plan.eval_task, strategy=plan.strategy)
        pending.record["seconds"] += time.perf_counter() - started
        self._complete_round(pending, report, plan.rounds)

    def _post_aggregate(self, phase: str, rnd: int, aggregate: State, step: PostAggregation,
                        models: RoundModels) -> tuple[State, dict]:
        """``step``'s model if it may become the global model (same weights, all finite and sane),
        else the aggregate itself: the round's clients did nothing wrong, so the round stands."""
        started = time.perf_counter()
        corrected, info = step(rnd, aggregate, models)
        problem = aggregate_problem(corrected)
        if problem is None and (corrected.keys() != aggregate.keys()
                                or any(corrected[k].shape != aggregate[k].shape for k in aggregate)):
            problem = "its weights do not match the aggregate's names and shapes"
        info = {**info, "accepted": problem is None}
        if problem is not None:
            self.metrics.post_aggregation_refused.labels(phase).inc()
            log.error("%s round %d: the post-aggregation step's model is refused (%s); broadcasting the "
                      "aggregate as it is", phase, rnd, problem)
            info["refused"] = problem
            corrected = aggregate
        info.setdefault("seconds", time.perf_counter() - started)
        return corrected, info

    def _record_before_failing(self, plan: PhasePlan, pending: PendingEvaluation, model: State) -> None:
        """The next round failed: record the pending round (its aggregate stands) from the
        evaluations that came in, completed by an evaluation step of its own if too few did."""
        try:
            report = self.evaluate(pending.phase, pending.round, model, plan.eval_task, pending.answers,
                                   plan.strategy)
        except RoundFailed as error:
            log.error("%s round %d is not recorded: its evaluation failed too (%s)", pending.phase,
                      pending.round, error)
            return
        self._complete_round(pending, report, plan.rounds)

    def _complete_round(self, pending: PendingEvaluation, report: EvalReport, rounds: int) -> None:
        """Write a round's record (its evaluation now in), update the gauges, log it."""
        held = pending.record
        phase, rnd, seconds = held["phase"], held["round"], held["seconds"]
        record = {
            "phase": phase,
            "round": rnd,
            "weighted_client_accuracy": report.weighted_accuracy,
            "weighted_client_loss": report.weighted_loss,
            "test_accuracy": held["test_accuracy"],
            "test_loss": held["test_loss"],
            "train_loss": held["train_loss"],
            "seconds": seconds,
            "clients": len(report.per_client),
            "per_client": report.per_client,
        }
        if "post_aggregation" in held:
            record["post_aggregation"] = held["post_aggregation"]
        self.recorder.record_round(record)
        self.metrics.rounds_completed.labels(phase).inc()
        self.metrics.round_duration.labels(phase).observe(seconds)
        for gauge, value in ((self.metrics.weighted_client_accuracy, report.weighted_accuracy),
                             (self.metrics.test_accuracy, held["test_accuracy"]),
                             (self.metrics.train_loss, held["train_loss"])):
            if value is not None:
                gauge.labels(phase).set(value)
        log.info("[%s round %d/%d] client acc %s, test acc %s, train loss %s, client loss %s (%.2f s)",
                 phase, rnd, rounds, _fmt(report.weighted_accuracy), _fmt(held["test_accuracy"]),
                 _fmt(held["train_loss"]), _fmt(report.weighted_loss), seconds)


def first_evaluation(result: TaskResult) -> TaskResult:
    """A TRAIN result's evaluate-first part as the EVALUATE result it stands for (same samples and
    metric names as an EVALUATE task reports)."""
    metrics = {name.removeprefix("eval_"): value for name, value in result.metrics.items()
               if name.startswith("eval_") and name != "eval_samples"}
    return TaskResult(result.task, int(result.metrics["eval_samples"]), metrics)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
