"""The run's differential-privacy guarantee, from the epsilon each client reports (DP runs only).

Every accepted CVAE training result of a DP run carries its client's spent epsilon (metric
``dp_epsilon``, refused without it: guard.check_dp_epsilon), accounted by the client's one
accountant over all the rounds it trained in. The run's guarantee is the weakest client's:
(max epsilon over clients, delta), each client's records protected at that level.

A client's epsilon only grows while its process lives; a smaller one than before means the
process restarted with a fresh accountant. Its records were then seen under both accountants, so
they compose by basic composition: the epsilons add, and so do the deltas.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from genfl_shared.config import PrivacySettings

log = logging.getLogger(__name__)


@dataclass
class ClientBudget:
    spent_before: float = 0.0  # by accountants of earlier processes of this client (restarts)
    current: float = 0.0  # the running accountant's latest report
    accountants: int = 1

    @property
    def epsilon(self) -> float:
        return self.spent_before + self.current


class PrivacyLedger:
    def __init__(self, dp: PrivacySettings):
        self.delta = dp.dp_delta
        self.settings = {"accountant": dp.dp_accountant, "max_grad_norm": dp.dp_max_grad_norm,
                         "noise_multiplier": dp.dp_noise_multiplier, "target_epsilon": dp.dp_target_epsilon,
                         "sampling": "poisson"}
        self._clients: dict[str, ClientBudget] = {}
        self._lock = threading.Lock()

    def record(self, client_id: str, epsilon: float) -> None:
        """A client's reported spent epsilon (called for every accepted DP training result)."""
        with self._lock:
            budget = self._clients.setdefault(client_id, ClientBudget())
            if epsilon < budget.current:
                log.warning("client %s reports epsilon %.4g after %.4g: a restarted process (fresh accountant); "
                            "its budgets add up", client_id, epsilon, budget.current)
                budget.spent_before += budget.current
                budget.accountants += 1
            budget.current = epsilon

    def guarantee(self) -> tuple[float | None, float]:
        """The run's (epsilon, delta) so far: the weakest client's; epsilon None before any report."""
        summary = self.summary()
        return summary["epsilon"], summary["delta"]

    def summary(self) -> dict[str, Any]:
        """summary.json's ``dp``: the guarantee (epsilon, delta), how it was obtained, and per client."""
        with self._lock:
            per_client = {cid: {"epsilon": b.epsilon, "delta": self.delta * b.accountants,
                                "accountants": b.accountants} for cid, b in sorted(self._clients.items())}
        epsilon = max((c["epsilon"] for c in per_client.values()), default=None)
        delta = max((c["delta"] for c in per_client.values()), default=self.delta)
        return {"epsilon": epsilon, "delta": delta, **self.settings, "per_client": per_client}

    def restore(self, saved: Mapping[str, Any] | None) -> None:
        """Continue from a resumed run's summary ``dp`` (None: nothing recorded yet)."""
        if not saved:
            return
        with self._lock:
            for cid, entry in saved["per_client"].items():
                accountants = int(entry["accountants"])
                # Restored as one running total: a client that lives on reports at least that much
                # and replaces it; a smaller report counts as a fresh accountant and adds up. With an
                # earlier restart, that over-counts (never under-counts) the client's epsilon.
                self._clients[cid] = ClientBudget(spent_before=0.0, current=float(entry["epsilon"]),
                                                  accountants=accountants)


def record_spent_epsilon(ledger: PrivacyLedger, metrics, result) -> None:
    """A DP run's result listener (``Coordinator.add_result_listener``): records an accepted
    result's spent epsilon (``dp_epsilon``) in ``ledger`` and exports the run's guarantee so far
    (``metrics``: a ServerMetrics tracking privacy)."""
    if "dp_epsilon" not in result.metrics:
        return
    ledger.record(result.task.client_id, result.metrics["dp_epsilon"])
    epsilon, delta = ledger.guarantee()
    metrics.dp_epsilon.set(epsilon)
    metrics.dp_delta.set(delta)
