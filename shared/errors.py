"""Why the server refuses a client's request, independent of how the refusal travels.

``Rejected(reason, message)`` is raised by the run's logic (registration, tasks, the guard, the
stream bounds); the gRPC adapter (``genfl_server.status_codes``) turns each reason into its status
code. A reason's value is the label it is counted under
(``genfl_client_updates_rejected_total{reason=...}``) and logged with.
"""

from __future__ import annotations

import enum


class RejectReason(enum.StrEnum):
    """What was wrong with a refused request; the value is its metrics label."""

    # Registration and identity
    BAD_CLIENT_ID = "bad_client_id"
    BAD_SAMPLE_COUNT = "bad_sample_count"
    BAD_LABEL_COUNTS = "bad_label_counts"
    WRONG_DATASET = "wrong_dataset"
    RUN_FULL = "run_full"
    SAMPLE_COUNT_CHANGED = "sample_count_changed"
    NOT_IN_PARTITION = "not_in_partition"
    PARTITION_MISMATCH = "partition_mismatch"
    UNAUTHENTICATED = "unauthenticated"
    UNKNOWN_CLIENT = "unknown_client"
    BAD_SESSION = "bad_session"
    WRONG_RUN = "wrong_run"
    # A result and the task it answers
    DUPLICATE = "duplicate"
    LATE = "late"
    UNKNOWN_TASK = "unknown_task"
    WRONG_CLIENT = "wrong_client"
    STALE_ROUND = "stale_round"
    WRONG_TYPE = "wrong_type"
    BAD_METRICS = "bad_metrics"
    MISSING_DP_EPSILON = "missing_dp_epsilon"
    MALFORMED = "malformed"
    # Bounds on what one peer may hold open
    TOO_MANY_STREAMS = "too_many_streams"
    TOO_MANY_STREAMS_PER_IP = "too_many_streams_per_ip"
    UPLOAD_IN_PROGRESS = "upload_in_progress"
    UPLOAD_TIMEOUT = "upload_timeout"
    # An update's payload (the reasons of genfl_shared.codec.CodecError, label for label)
    BAD_DTYPE = "bad_dtype"
    BAD_MANIFEST = "bad_manifest"
    OVERSIZED = "oversized"
    CHUNK_ORDER = "chunk_order"
    BAD_CHUNK = "bad_chunk"
    TRUNCATED = "truncated"
    DIGEST_MISMATCH = "digest_mismatch"
    MISSING_TENSOR = "missing_tensor"
    EXTRA_TENSOR = "extra_tensor"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"


class Rejected(Exception):
    """A request the server refuses, with its reason; the message may quote the client (the
    adapter bounds it before it is logged or sent back)."""

    def __init__(self, reason: RejectReason, message: str):
        super().__init__(message)
        self.reason = RejectReason(reason)
