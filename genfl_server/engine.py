"""The round engine: federated rounds over whatever model the phase hands it.

It knows nothing of CVAEs or classifiers: a phase gives it a state_dict, the task settings the
clients need (genfl_shared.tasks), a strategy, and optionally a server-side test function; it runs
broadcast -> local training -> aggregation -> client evaluation, and reports per round.

One download per client per round: round r's aggregate is what round r + 1 trains from, so its
client evaluation rides on round r + 1's TRAIN task (``evaluate_first``: the client evaluates the
received weights, then trains, and reports both). Round r's record is therefore complete, and
written, once round r + 1's training returns; only a phase's last round sends an EVALUATE task of
its own. The evaluation is asked of exactly the clients a separate evaluation step would have asked
(every registered client, in the round's first training attempt; a redo or retry does not ask again
whoever already answered it), with the same per-client seeds, so the numbers are the same.

A step waits for every client, except that once it has the results it needs
(``--min-fit-clients``) it stops waiting for clients that are away (presence.py).

A client that cannot execute its task reports an error instead of a result: it counts as failed
for that step (nobody waits for it), and a step left with too few results fails with the clients'
errors in its message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping

import torch

from genfl_shared.cli import set_log_context
from genfl_shared.codec import encode_state_dict
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.seeding import derive_seed
from genfl_shared.tasks import EvaluateTask, TaskSettings, TrainTask

SettingsFor = Callable[[str], TaskSettings]  # client_id -> that client's task settings (seeded)

from .coordinator import ClientInfo, Coordinator, TaskBatch, TaskResult
from .guard import RoundGuard, UpdateGuard, aggregate_problem
from .metrics import ServerMetrics
from .results import RunRecorder
from genfl_shared.codec import task_frame
from .strategy import Strategy, build_strategy

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


# (round, accepted aggregate, RoundModels) -> (the model to broadcast instead, what to record of
# the step): a phase's server-side correction of each aggregate (the classifier phase's synthetic
# fine-tuning or distillation). A step with a true ``keeps_updates`` attribute has the engine keep
# the round's accepted updates for it (K models of memory during the round).
PostAggregation = Callable[[int, State, RoundModels], tuple[State, dict]]
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
        # Deterministic mode sums updates in client order instead of arrival order (float addition
        # is not associative), at the cost of holding every update of a round in memory.
        self.deterministic = deterministic
        self.guard = guard if guard is not None else UpdateGuard()
        self.clients: list[ClientInfo] = []

    def wait_for_clients(self, timeout: float | None) -> None:
        log.info("waiting for %d clients", self.coordinator.expected_clients)
        self.clients = self.coordinator.wait_for_clients(timeout)
        log.info("all %d clients registered: %s", len(self.clients), ", ".join(c.client_id for c in self.clients))

    # -- one step over every client -----------------------------------------------------------
    def seeded(self, settings: TaskSettings, task_type: int, phase: str, rnd: int, client_id: str) -> TaskSettings:
        """``settings`` with the client's seed for this task: per client and round, so repeatable
        whatever order the clients run in."""
        return replace(settings, seed=derive_seed(self.seed, phase, rnd, client_id, pb.TaskType.Name(task_type)))

    def _run_batch(self, task_type: int, phase: str, rnd: int, state: Mapping[str, torch.Tensor],
                   settings_for: SettingsFor, *, on_update=None, clients: list[ClientInfo] | None = None,
                   quorum: int | None = None) -> StepResults:
        """One task per client (``clients``, default every registered one); returns the results (and
        the clients' errors) that arrived by the deadline, or by the time ``quorum`` results are
        in and only clients that are away have not answered.

        A client that dropped out still gets its task: if it comes back in time it answers, and
        otherwise it takes part again from the next step on.
        """
        payload = encode_state_dict(state, wrap=task_frame)  # serialized once, sent to every client
        tasks = [self.coordinator.new_task(client.client_id, task_type, phase, rnd, settings_for(client.client_id),
                                           payload)
                 for client in (self.clients if clients is None else clients)]
        batch: TaskBatch = self.coordinator.dispatch(tasks, template=state, on_update=on_update)
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

    def fit(self, phase: str, rnd: int, state: Mapping[str, torch.Tensor], settings: TrainTask,
            strategy: Strategy, evaluations: dict[str, TaskResult] | None = None, *,
            keep_updates: bool = False, client_task: ClientTask | None = None) -> tuple[State, float | None, dict[str, Mapping[str, torch.Tensor]]]:
        """One round of local training and aggregation; returns (new state, mean train loss, the
        accepted updates: with ``keep_updates``, client_id -> each update folded into the new state
        unclipped, else empty).

        With ``evaluations`` (a dict, filled in as results arrive, also when the round fails) the
        clients first evaluate ``state``, the previous round's aggregate, on their held-out part
        (seeded as that round's EVALUATE tasks would be): client_id -> its evaluation as an
        EVALUATE result. A client is asked once: a redo or retry does not ask whoever answered.

        The round is redone without every client its RoundGuard names (an update beyond the norm
        bounds, or the likeliest cause of a non-finite or absurd aggregate), until it is clean:
        a bad aggregate never becomes the global model. (A rejected update says nothing against
        its sender's evaluation of the previous model, which counts as it would have before.)
        """
        excluded: dict[str, str] = {}
        while True:
            clients = [c for c in self.clients if c.client_id not in excluded]
            if not clients:
                raise RoundFailed(f"{phase} round {rnd}: every client's update was rejected ({excluded})")
            carried = strategy.state_dict()  # FedAvgM's velocity, restored if the aggregate is refused
            round_guard, results, kept = self._fit_once(phase, rnd, state, settings, strategy, clients, evaluations,
                                                        keep_updates, client_task)
            offenders = round_guard.offenders()
            if not offenders:
                new_state = strategy.finish()
                offenders = round_guard.check_aggregate(new_state)
                if not offenders:
                    # A clipped update went into the aggregate scaled down: as received, it is not
                    # what the round accepted.
                    accepted = {cid: update for cid, update in kept.items() if cid not in round_guard.clipped}
                    return new_state, weighted_mean(results, "loss"), accepted
                strategy.load_state_dict(carried)
            for client_id, reason in sorted(offenders.items()):
                self.metrics.updates_rejected.labels(reason).inc()
                log.error("%s round %d: update of client %s rejected (%s: distance %.4g, round median %.4g); "
                          "redoing the round without it", phase, rnd, client_id, reason,
                          round_guard.distances.get(client_id, float("nan")), round_guard.median_distance())
            excluded.update(offenders)

    def _fit_once(self, phase: str, rnd: int, state: Mapping[str, torch.Tensor], settings: TrainTask,
                  strategy: Strategy, clients: list[ClientInfo], evaluations: dict[str, TaskResult] | None,
                  keep_updates: bool = False, client_task: ClientTask | None = None
                  ) -> tuple[RoundGuard, list[TaskResult], dict]:
        """Train on ``clients`` and fold their updates into ``strategy`` (not finished yet); with
        ``evaluations``, see ``fit``; with ``keep_updates``, also returns every folded update as
        received (client_id -> update), else an empty dict."""
        held: dict[str, tuple[float, Mapping[str, torch.Tensor]]] = {}
        kept: dict[str, Mapping[str, torch.Tensor]] = {}
        round_guard: RoundGuard | None = None  # made afresh by each attempt

        def fold_in(task, num_samples, update):
            received = update
            weight, update = round_guard.admit(task.client_id, num_samples, update)
            if keep_updates:  # admitted only; an upload holds its received bytes: one model's size, no copy
                kept[task.client_id] = received
            if self.deterministic:
                # Whole tensors, summed as whole tensors after the step: the same numbers whatever
                # the chunking (an upload's pieces would be folded slice by slice).
                held[task.client_id] = (weight, {name: update[name] for name in update})
                return
            started = time.perf_counter()
            strategy.accumulate(update, weight)
            self.metrics.aggregation_seconds.observe(time.perf_counter() - started)

        infos = {c.client_id: c for c in clients}

        def settings_for(client_id: str) -> TrainTask:
            seeded = self.seeded(settings, pb.TASK_TYPE_TRAIN, phase, rnd, client_id)
            if client_task is not None:
                seeded = client_task(infos[client_id], rnd, seeded)
            if evaluations is None or client_id in evaluations:
                return seeded
            # The seed round rnd - 1's own EVALUATE task would have had.
            return replace(seeded, evaluate_first=True,
                           evaluate_seed=derive_seed(self.seed, phase, rnd - 1, client_id,
                                                     pb.TaskType.Name(pb.TASK_TYPE_EVALUATE)))

        def attempt(required: int):
            nonlocal round_guard
            strategy.begin(state)  # a retried round starts a fresh sum
            round_guard = self.guard.round(state, {c.client_id: c.num_train_samples for c in clients})
            held.clear()
            kept.clear()
            step_results = self._run_batch(pb.TASK_TYPE_TRAIN, phase, rnd, state, settings_for, on_update=fold_in,
                                           clients=clients, quorum=required)
            for client_id in sorted(held):
                strategy.accumulate(held[client_id][1], held[client_id][0])
            held.clear()
            if evaluations is not None:
                for result in step_results.results:
                    if result.task.config.evaluate_first:
                        evaluations.setdefault(result.task.client_id, first_evaluation(result))
            return step_results

        results = self._with_retries("training", phase, rnd, attempt, asked=len(clients))
        return round_guard, results, kept

    def evaluate(self, phase: str, rnd: int, state: Mapping[str, torch.Tensor],
                 settings: EvaluateTask, evaluated: Mapping[str, TaskResult] | None = None) -> EvalReport:
        """Every client evaluates ``state`` on its held-out part; with ``evaluated`` (client_id ->
        an evaluation of ``state`` already in, e.g. from the next round's training), only the
        others are asked, and only when those in are fewer than a step requires."""
        evaluated = dict(evaluated or {})
        required = self._required()
        if len(evaluated) < required:
            others = [c for c in self.clients if c.client_id not in evaluated]
            results = self._with_retries(
                "evaluation", phase, rnd, lambda needed: self._run_batch(
                    pb.TASK_TYPE_EVALUATE, phase, rnd, state,
                    lambda cid: self.seeded(settings, pb.TASK_TYPE_EVALUATE, phase, rnd, cid),
                    clients=others, quorum=needed),
                asked=len(others), required=required - len(evaluated))
            evaluated.update((r.task.client_id, r) for r in results)
        results = sorted(evaluated.values(), key=lambda r: r.task.client_id)
        return EvalReport(
            weighted_accuracy=weighted_mean(results, "accuracy"),
            weighted_loss=weighted_mean(results, "loss"),
            samples=sum(r.num_samples for r in results),
            per_client={r.task.client_id: dict(r.metrics, samples=r.num_samples) for r in results},
        )

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

        A round's record waits (``RunRecorder.hold_round``) for its client evaluation, which the
        next round's training brings; a resumed phase finds the record of its last completed round
        still pending and completes it the same way."""
        state = dict(state)
        self.metrics.phase.state(phase)
        if isinstance(strategy, str):
            strategy = build_strategy(strategy)
        # One strategy for the whole phase: stateful ones (FedAvgM's momentum) carry across rounds.
        train_task = replace(train_task, **asdict(strategy.client_config), deterministic=self.deterministic)
        pending = self.recorder.pending_round(phase)
        if pending is not None and pending["round"] != start_round - 1:
            raise RuntimeError(f"{phase}: the pending record is of round {pending['round']}, "
                               f"but the phase resumes at round {start_round}")
        for rnd in range(start_round, rounds + 1):
            started = time.perf_counter()
            self.metrics.round.set(rnd)
            set_log_context(phase=phase, round=rnd)
            evaluations: dict[str, TaskResult] | None = {} if pending is not None else None
            try:
                new_state, train_loss, accepted = self.fit(
                    phase, rnd, state, train_task, strategy, evaluations,
                    keep_updates=bool(getattr(post_aggregation, "keeps_updates", False)), client_task=client_task)
            except RoundFailed:
                if pending is not None:
                    self._record_before_failing(pending, state, eval_task, evaluations, rounds)
                raise
            if pending is not None:
                self._complete_round(pending, self.evaluate(phase, rnd - 1, state, eval_task, evaluations), rounds)
            post = None
            if post_aggregation is not None:
                new_state, post = self._post_aggregate(phase, rnd, new_state, post_aggregation,
                                                       RoundModels(previous=state, accepted=accepted))
            del accepted  # the kept updates live for the round only
            state = new_state
            test = test_fn(state) if test_fn else {}
            pending = {
                "phase": phase,
                "round": rnd,
                "test_accuracy": test.get("accuracy"),
                "test_loss": test.get("loss"),
                "train_loss": train_loss,
                "seconds": time.perf_counter() - started,  # its evaluation rides on the next round
                **({"post_aggregation": post} if post is not None else {}),
            }
            self.recorder.hold_round(pending)
            if on_round_end is not None:
                on_round_end(rnd, state)
        if pending is not None:  # the last round's model: an evaluation of its own
            started = time.perf_counter()
            set_log_context(phase=phase, round=pending["round"])
            report = self.evaluate(phase, pending["round"], state, eval_task)
            pending["seconds"] += time.perf_counter() - started
            self._complete_round(pending, report, rounds)
            if on_round_end is not None:
                on_round_end(pending["round"], state)
        set_log_context(round=None)
        return state

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

    def _record_before_failing(self, pending: dict, state: State, eval_task: EvaluateTask,
                               evaluations: dict[str, TaskResult], rounds: int) -> None:
        """The next round failed: record the pending round (its aggregate stands) from the
        evaluations that came in, completed by an evaluation step of its own if too few did."""
        try:
            report = self.evaluate(pending["phase"], pending["round"], state, eval_task, evaluations)
        except RoundFailed as error:
            log.error("%s round %d is not recorded: its evaluation failed too (%s)", pending["phase"],
                      pending["round"], error)
            return
        self._complete_round(pending, report, rounds)

    def _complete_round(self, pending: dict, report: EvalReport, rounds: int) -> None:
        """Write a round's record (its evaluation now in), update the gauges, log it."""
        phase, rnd, seconds = pending["phase"], pending["round"], pending["seconds"]
        record = {
            "phase": phase,
            "round": rnd,
            "weighted_client_accuracy": report.weighted_accuracy,
            "weighted_client_loss": report.weighted_loss,
            "test_accuracy": pending["test_accuracy"],
            "test_loss": pending["test_loss"],
            "train_loss": pending["train_loss"],
            "seconds": seconds,
            "clients": len(report.per_client),
            "per_client": report.per_client,
        }
        if "post_aggregation" in pending:
            record["post_aggregation"] = pending["post_aggregation"]
        self.recorder.record_round(record)
        self.metrics.rounds_completed.labels(phase).inc()
        self.metrics.round_duration.labels(phase).observe(seconds)
        for gauge, value in ((self.metrics.weighted_client_accuracy, report.weighted_accuracy),
                             (self.metrics.test_accuracy, pending["test_accuracy"]),
                             (self.metrics.train_loss, pending["train_loss"])):
            if value is not None:
                gauge.labels(phase).set(value)
        log.info("[%s round %d/%d] client acc %s, test acc %s, train loss %s, client loss %s (%.2f s)",
                 phase, rnd, rounds, _fmt(report.weighted_accuracy), _fmt(pending["test_accuracy"]),
                 _fmt(pending["train_loss"]), _fmt(report.weighted_loss), seconds)


def first_evaluation(result: TaskResult) -> TaskResult:
    """A TRAIN result's evaluate-first part as the EVALUATE result it stands for (same samples and
    metric names as an EVALUATE task reports)."""
    metrics = {name.removeprefix("eval_"): value for name, value in result.metrics.items()
               if name.startswith("eval_") and name != "eval_samples"}
    return TaskResult(result.task, int(result.metrics["eval_samples"]), metrics)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
