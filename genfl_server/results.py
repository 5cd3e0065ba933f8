"""Run outputs: ``metrics.jsonl`` (one line per round, appended as rounds finish, so a progress
display or a crashed run still has every finished round) and ``summary.json``.

A round is finished, and recorded, once its client evaluation is in, which comes with the next
round's training (engine.py); until then its record is held as pending, and saved as such with
the run state, so that a resumed run completes it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from genfl_shared.runfiles import METRICS_JSONL, SUMMARY_JSON, write_json_atomic

log = logging.getLogger(__name__)


class RunRecorder:
    def __init__(self, out_dir: Path, **run_fields: Any):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS_JSONL
        self.summary_path = self.out_dir / SUMMARY_JSON
        self.metrics_path.write_text("")
        # dp: a DP run's guarantee (genfl_server.privacy: epsilon, delta, per client); None without DP.
        self.summary: dict[str, Any] = {"cas": None, "cas_federated": None, "dp": None, **run_fields,
                                        "rounds": [], "final": None}
        self.events: list[dict] = []
        self.pending: dict | None = None  # the round whose record awaits its client evaluation

    def hold_round(self, partial: dict) -> None:
        """Keep a round's record, all but its client evaluation, until ``record_round``."""
        self.pending = dict(partial)

    def pending_round(self, phase: str) -> dict | None:
        """The pending record of ``phase`` (a copy), if one is held."""
        return dict(self.pending) if self.pending is not None and self.pending["phase"] == phase else None

    def record_round(self, record: dict) -> None:
        record = _finite(record, "round")
        self._append({"event": "round", **record})
        self.summary["rounds"].append({k: v for k, v in record.items() if k != "per_client"})
        if self.pending is not None and (self.pending["phase"], self.pending["round"]) == (record["phase"],
                                                                                           record["round"]):
            self.pending = None

    def record_event(self, event: str, **fields: Any) -> None:
        """Non-round milestones (synthetic data, CAS, pre-training), for progress displays."""
        self._append({"event": event, **_finite(fields, event)})

    def _append(self, event: dict) -> None:
        self.events.append(event)
        with open(self.metrics_path, "a") as f:
            f.write(_json_line(event))

    def export(self) -> dict[str, Any]:
        """What a run state saves, so a resumed run reports the rounds before the crash."""
        return {"summary": {k: self.summary[k] for k in ("rounds", "cas", "cas_federated", "dp")},
                "events": self.events,
                "pending_round": None if self.pending is None else _finite(self.pending, "pending round")}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a saved export; metrics.jsonl is rewritten to match it exactly (a round
        recorded after the last save is dropped, it will be run again)."""
        self.summary.update(saved["summary"])
        self.events = list(saved["events"])
        self.pending = saved.get("pending_round")
        self.metrics_path.write_text("".join(_json_line(e) for e in self.events))

    def set(self, **fields: Any) -> None:
        self.summary.update(_finite(fields, "summary"))

    def write_summary(self) -> Path:
        rounds = self.summary["rounds"]
        classifier_rounds = [r for r in rounds if r["phase"] == "classifier"]
        last = (classifier_rounds or rounds or [None])[-1]
        self.summary["final"] = None if last is None else {
            "phase": last["phase"],
            "round": last["round"],
            "weighted_client_accuracy": last["weighted_client_accuracy"],
            "test_accuracy": last["test_accuracy"],
        }
        write_json_atomic(self.summary_path, self.summary)
        return self.summary_path


def _finite(value: Any, where: str, key: str = "") -> Any:
    """``value`` with every non-finite float replaced by None (JSON null), logged.

    Client metrics are validated on arrival, so a NaN here is the server's own measurement of a
    model that diverged (e.g. the test loss under an unstable FedAvgM): a fact to record as "no
    value", not a reason to fail the run or to write a line that JSON tools cannot read.
    """
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("%s %s is %s (the model diverged?); recorded as null", where, key or "value", value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, where, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, where, key) for v in value]
    return value


def _json_line(event: dict) -> str:
    # Strict JSON (no NaN/Infinity): _finite() has replaced them; anything left is a bug, and fails here.
    return json.dumps(event, sort_keys=True, allow_nan=False) + "\n"
