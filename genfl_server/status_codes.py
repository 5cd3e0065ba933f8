"""The gRPC status each refusal ends its call with: the one place where a RejectReason meets gRPC.

A client acts on the code (genfl_client/runner.py: NOT_FOUND and FAILED_PRECONDITION make it
register again, UNAUTHENTICATED and PERMISSION_DENIED stop it, ALREADY_EXISTS or FAILED_PRECONDITION
on an upload mean the server has moved on), so a reason's code is part of the protocol.
"""

from __future__ import annotations

import grpc

from genfl_shared.errors import RejectReason

Code = grpc.StatusCode
Reason = RejectReason

STATUS_CODES: dict[RejectReason, grpc.StatusCode] = {
    Reason.BAD_CLIENT_ID: Code.INVALID_ARGUMENT,
    Reason.BAD_SAMPLE_COUNT: Code.INVALID_ARGUMENT,
    Reason.BAD_LABEL_COUNTS: Code.INVALID_ARGUMENT,
    Reason.WRONG_DATASET: Code.FAILED_PRECONDITION,
    Reason.RUN_FULL: Code.RESOURCE_EXHAUSTED,
    Reason.SAMPLE_COUNT_CHANGED: Code.FAILED_PRECONDITION,
    Reason.NOT_IN_PARTITION: Code.PERMISSION_DENIED,
    Reason.PARTITION_MISMATCH: Code.FAILED_PRECONDITION,
    Reason.UNAUTHENTICATED: Code.UNAUTHENTICATED,
    Reason.UNKNOWN_CLIENT: Code.NOT_FOUND,
    Reason.BAD_SESSION: Code.PERMISSION_DENIED,
    Reason.WRONG_RUN: Code.FAILED_PRECONDITION,
    Reason.DUPLICATE: Code.ALREADY_EXISTS,
    Reason.LATE: Code.FAILED_PRECONDITION,
    Reason.UNKNOWN_TASK: Code.NOT_FOUND,
    Reason.WRONG_CLIENT: Code.PERMISSION_DENIED,
    Reason.STALE_ROUND: Code.FAILED_PRECONDITION,
    Reason.WRONG_TYPE: Code.INVALID_ARGUMENT,
    Reason.BAD_METRICS: Code.INVALID_ARGUMENT,
    Reason.MISSING_DP_EPSILON: Code.INVALID_ARGUMENT,
    Reason.MALFORMED: Code.INVALID_ARGUMENT,
    Reason.TOO_MANY_STREAMS: Code.RESOURCE_EXHAUSTED,
    Reason.TOO_MANY_STREAMS_PER_IP: Code.RESOURCE_EXHAUSTED,
    Reason.UPLOAD_IN_PROGRESS: Code.ALREADY_EXISTS,
    Reason.UPLOAD_TIMEOUT: Code.DEADLINE_EXCEEDED,
    Reason.BAD_DTYPE: Code.INVALID_ARGUMENT,
    Reason.BAD_MANIFEST: Code.INVALID_ARGUMENT,
    Reason.OVERSIZED: Code.RESOURCE_EXHAUSTED,
    Reason.CHUNK_ORDER: Code.INVALID_ARGUMENT,
    Reason.BAD_CHUNK: Code.INVALID_ARGUMENT,
    Reason.TRUNCATED: Code.DATA_LOSS,
    Reason.DIGEST_MISMATCH: Code.DATA_LOSS,
    Reason.MISSING_TENSOR: Code.INVALID_ARGUMENT,
    Reason.EXTRA_TENSOR: Code.INVALID_ARGUMENT,
    Reason.BAD_SHAPE: Code.INVALID_ARGUMENT,
    Reason.NON_FINITE: Code.INVALID_ARGUMENT,
}

_unmapped = set(RejectReason) - STATUS_CODES.keys()
if _unmapped:  # a reason without a code would end its call with an error of the server's own
    raise ImportError(f"no gRPC status for rejection reasons {sorted(_unmapped)}")


def status_code(reason: RejectReason) -> grpc.StatusCode:
    """The status a call refused for ``reason`` ends with."""
    return STATUS_CODES[reason]
