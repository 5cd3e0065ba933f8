"""The round engine: federated rounds over whatever model the phase hands it.

It knows nothing of CVAEs or classifiers: a phase gives it a state_dict, the task settings the
clients need (genfl_shared.tasks), a strategy, and optionally a server-side test function; it runs
broadcast -> local training -> aggregation -> client evaluation, and reports per round.

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

from .coordinator import ClientInfo, Coordinator, TaskBatch, TaskResult
from .guard import RoundGuard, UpdateGuard
from .metrics import ServerMetrics
from .results import RunRecorder
from .service import task_frame
from .strategy import Strategy, build_strategy

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
TestFn = Callable[[Mapping[str, torch.Tensor]], dict]


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
    def _run_batch(self, task_type: int, phase: str, rnd: int, state: Mapping[str, torch.Tensor],
                   settings: TaskSettings, *, on_update=None, clients: list[ClientInfo] | None = None
                   ) -> StepResults:
        """One task per client (``clients``, default every registered one); returns the results (and
        the clients' errors) that
        arrived by the deadline.

        A client that dropped out still gets its task: if it comes back in time it answers, and
        otherwise it takes part again from the next step on.
        """
        payload = encode_state_dict(state, wrap=task_frame)  # serialized once, sent to every client
        tasks = []
        for client in self.clients if clients is None else clients:
            # Per-client, per-round seeds: repeatable whatever order the clients run in.
            client_settings = replace(settings, seed=derive_seed(self.seed, phase, rnd, client.client_id,
                                                                 pb.TaskType.Name(task_type)))
            tasks.append(self.coordinator.new_task(client.client_id, task_type, phase, rnd, client_settings,
                                                   payload))
        batch: TaskBatch = self.coordinator.dispatch(tasks, template=state, on_update=on_update)
        if not batch.wait(self.round_timeout):
            self.coordinator.close(batch)  # from here on, results count as late
            missing = sorted(t.client_id for t in batch.tasks.values()
                             if t.task_id not in batch.results and t.task_id not in batch.failures)
            log.warning("%s round %d: %d of %d clients answered within %.0f s; missing %s", phase, rnd,
                        len(batch.results) + len(batch.failures), len(tasks), self.round_timeout,
                        ", ".join(missing))
        errors = {batch.tasks[task_id].client_id: message for task_id, message in batch.failures.items()}
        return StepResults(sorted(batch.results.values(), key=lambda r: r.task.client_id),
                           dict(sorted(errors.items())))

    def _required(self, asked: int | None = None) -> int:
        """Results a step needs from the ``asked`` clients (default: all registered)."""
        asked = len(self.clients) if asked is None else asked
        return asked if self.min_clients is None else min(self.min_clients, asked)

    def _with_retries(self, step: str, phase: str, rnd: int, attempt_fn, asked: int | None = None
                      ) -> list[TaskResult]:
        """Run a step until at least the required number of the ``asked`` clients answered (bounded
        retries).

        A retry sends the same settings and weights again, so it cannot cure a client's task error:
        when the clients that did not report one are too few, the step fails at once."""
        asked = len(self.clients) if asked is None else asked
        required = self._required(asked)
        why = ""
        for attempt in range(1 + self.round_retries):
            step_results = attempt_fn()
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
            strategy: Strategy) -> tuple[State, float | None]:
        """One round of local training and aggregation; returns (new state, mean train loss).

        The round is redone without every client its RoundGuard names (an update beyond the norm
        bounds, or the likeliest cause of a non-finite or absurd aggregate), until it is clean:
        a bad aggregate never becomes the global model.
        """
        excluded: dict[str, str] = {}
        while True:
            clients = [c for c in self.clients if c.client_id not in excluded]
            if not clients:
                raise RoundFailed(f"{phase} round {rnd}: every client's update was rejected ({excluded})")
            carried = strategy.state_dict()  # FedAvgM's velocity, restored if the aggregate is refused
            round_guard, results = self._fit_once(phase, rnd, state, settings, strategy, clients)
            offenders = round_guard.offenders()
            if not offenders:
                new_state = strategy.finish()
                offenders = round_guard.check_aggregate(new_state)
                if not offenders:
                    return new_state, weighted_mean(results, "loss")
                strategy.load_state_dict(carried)
            for client_id, reason in sorted(offenders.items()):
                self.metrics.updates_rejected.labels(reason).inc()
                log.error("%s round %d: update of client %s rejected (%s: distance %.4g, round median %.4g); "
                          "redoing the round without it", phase, rnd, client_id, reason,
                          round_guard.distances.get(client_id, float("nan")), round_guard.median_distance())
            excluded.update(offenders)

    def _fit_once(self, phase: str, rnd: int, state: Mapping[str, torch.Tensor], settings: TrainTask,
                  strategy: Strategy, clients: list[ClientInfo]) -> tuple[RoundGuard, list[TaskResult]]:
        """Train on ``clients`` and fold their updates into ``strategy`` (not finished yet)."""
        held: dict[str, tuple[float, Mapping[str, torch.Tensor]]] = {}
        round_guard: RoundGuard | None = None  # made afresh by each attempt

        def fold_in(task, num_samples, update):
            weight, update = round_guard.admit(task.client_id, num_samples, update)
            if self.deterministic:
                held[task.client_id] = (weight, update)
                return
            started = time.perf_counter()
            strategy.accumulate(update, weight)
            self.metrics.aggregation_seconds.observe(time.perf_counter() - started)

        def attempt():
            nonlocal round_guard
            strategy.begin(state)  # a retried round starts a fresh sum
            round_guard = self.guard.round(state, {c.client_id: c.num_train_samples for c in clients})
            held.clear()
            step_results = self._run_batch(pb.TASK_TYPE_TRAIN, phase, rnd, state, settings, on_update=fold_in,
                                           clients=clients)
            for client_id in sorted(held):
                strategy.accumulate(held[client_id][1], held[client_id][0])
            held.clear()
            return step_results

        results = self._with_retries("training", phase, rnd, attempt, asked=len(clients))
        return round_guard, results

    def evaluate(self, phase: str, rnd: int, state: Mapping[str, torch.Tensor],
                 settings: EvaluateTask) -> EvalReport:
        """Every client evaluates ``state`` on its held-out part."""
        results = self._with_retries("evaluation", phase, rnd, lambda: self._run_batch(
            pb.TASK_TYPE_EVALUATE, phase, rnd, state, settings))
        return EvalReport(
            weighted_accuracy=weighted_mean(results, "accuracy"),
            weighted_loss=weighted_mean(results, "loss"),
            samples=sum(r.num_samples for r in results),
            per_client={r.task.client_id: dict(r.metrics, samples=r.num_samples) for r in results},
        )

    # -- a phase's rounds ---------------------------------------------------------------------
    def run_rounds(self, phase: str, state: Mapping[str, torch.Tensor], *, rounds: int, train_task: TrainTask,
                   eval_task: EvaluateTask, strategy: Strategy | str = "fedavg", test_fn: TestFn | None = None,
                   start_round: int = 1, on_round_end: Callable[[int, State], None] | None = None) -> State:
        """Rounds ``start_round..rounds`` from ``state``; ``on_round_end(round, state)`` after each
        (the phase checkpoints there)."""
        state = dict(state)
        self.metrics.phase.state(phase)
        if isinstance(strategy, str):
            strategy = build_strategy(strategy)
        # One strategy for the whole phase: stateful ones (FedAvgM's momentum) carry across rounds.
        train_task = replace(train_task, **asdict(strategy.client_config), deterministic=self.deterministic)
        for rnd in range(start_round, rounds + 1):
            started = time.perf_counter()
            self.metrics.round.set(rnd)
            set_log_context(phase=phase, round=rnd)
            state, train_loss = self.fit(phase, rnd, state, train_task, strategy)
            report = self.evaluate(phase, rnd, state, eval_task)
            test = test_fn(state) if test_fn else {}
            seconds = time.perf_counter() - started
            record = {
                "phase": phase,
                "round": rnd,
                "weighted_client_accuracy": report.weighted_accuracy,
                "weighted_client_loss": report.weighted_loss,
                "test_accuracy": test.get("accuracy"),
                "test_loss": test.get("loss"),
                "train_loss": train_loss,
                "seconds": seconds,
                "clients": len(report.per_client),
                "per_client": report.per_client,
            }
            self.recorder.record_round(record)
            if on_round_end is not None:
                on_round_end(rnd, state)
            self.metrics.rounds_completed.labels(phase).inc()
            self.metrics.round_duration.labels(phase).observe(seconds)
            for gauge, value in ((self.metrics.weighted_client_accuracy, report.weighted_accuracy),
                                 (self.metrics.test_accuracy, test.get("accuracy")),
                                 (self.metrics.train_loss, train_loss)):
                if value is not None:
                    gauge.labels(phase).set(value)
            log.info("[%s round %d/%d] client acc %s, test acc %s, train loss %s, client loss %s (%.2f s)",
                     phase, rnd, rounds, _fmt(report.weighted_accuracy), _fmt(test.get("accuracy")),
                     _fmt(train_loss), _fmt(report.weighted_loss), seconds)
        set_log_context(round=None)
        return state


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
