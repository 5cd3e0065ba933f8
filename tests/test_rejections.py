"""Refusals: every reason has its status code, and a reason's label is the same string in the
metrics, the logs and the codec's errors."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from genfl_server.metrics import ServerMetrics
from genfl_server.status_codes import STATUS_CODES, status_code
from genfl_shared.errors import Rejected, RejectReason

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[1]
Code = grpc.StatusCode

# The status each refusal ends its call with: clients act on these codes (genfl_client/runner.py).
PROTOCOL_CODES = {
    Code.INVALID_ARGUMENT: {"bad_client_id", "bad_sample_count", "bad_label_counts", "wrong_type", "bad_metrics",
                            "missing_dp_epsilon", "malformed", "bad_dtype", "bad_manifest", "chunk_order",
                            "bad_chunk", "missing_tensor", "extra_tensor", "bad_shape", "non_finite"},
    Code.FAILED_PRECONDITION: {"wrong_dataset", "sample_count_changed", "partition_mismatch", "wrong_run", "late",
                               "stale_round"},
    Code.RESOURCE_EXHAUSTED: {"run_full", "too_many_streams", "too_many_streams_per_ip", "oversized"},
    Code.PERMISSION_DENIED: {"not_in_partition", "bad_session", "wrong_client"},
    Code.UNAUTHENTICATED: {"unauthenticated"},
    Code.NOT_FOUND: {"unknown_client", "unknown_task"},
    Code.ALREADY_EXISTS: {"duplicate", "upload_in_progress"},
    Code.DEADLINE_EXCEEDED: {"upload_timeout"},
    Code.DATA_LOSS: {"truncated", "digest_mismatch"},
}


def test_every_reason_has_its_protocol_status_code():
    assert {reason: status_code(reason) for reason in RejectReason} == {
        RejectReason(label): code for code, labels in PROTOCOL_CODES.items() for label in labels}
    assert STATUS_CODES.keys() == set(RejectReason)


def codec_error_reasons() -> set[str]:
    """The reason of every ``CodecError("reason", ...)`` raised in the project's source."""
    found = set()
    for folder in ("shared", "genfl_server", "genfl_client"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                        == "CodecError" and node.args and isinstance(node.args[0], ast.Constant)):
                    found.add(node.args[0].value)
    return found


def test_every_codec_error_reason_is_a_rejection_reason():
    reasons = codec_error_reasons()
    assert {"digest_mismatch", "truncated", "non_finite"} <= reasons  # the scan sees the codec's raises
    assert reasons <= {str(reason) for reason in RejectReason}


def test_a_reason_reads_as_its_label():
    error = Rejected("late", "task t closed before this result arrived")
    assert error.reason is RejectReason.LATE and error.reason == "late"
    assert f"rejected ({error.reason})" == "rejected (late)" and str(error) == "task t closed before this result arrived"
    metrics = ServerMetrics()
    metrics.updates_rejected.labels(error.reason).inc()
    assert metrics.registry.get_sample_value("genfl_client_updates_rejected_total", {"reason": "late"}) == 1.0
    with pytest.raises(ValueError):
        Rejected("no_such_reason", "a reason must be one of RejectReason's")
