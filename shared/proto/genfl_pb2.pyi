from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TYPE_UNSPECIFIED: _ClassVar[TaskType]
    TASK_TYPE_TRAIN: _ClassVar[TaskType]
    TASK_TYPE_EVALUATE: _ClassVar[TaskType]
    TASK_TYPE_IDLE: _ClassVar[TaskType]
    TASK_TYPE_SHUTDOWN: _ClassVar[TaskType]

class RunOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_OUTCOME_UNSPECIFIED: _ClassVar[RunOutcome]
    RUN_OUTCOME_COMPLETED: _ClassVar[RunOutcome]
    RUN_OUTCOME_FAILED: _ClassVar[RunOutcome]
TASK_TYPE_UNSPECIFIED: TaskType
TASK_TYPE_TRAIN: TaskType
TASK_TYPE_EVALUATE: TaskType
TASK_TYPE_IDLE: TaskType
TASK_TYPE_SHUTDOWN: TaskType
RUN_OUTCOME_UNSPECIFIED: RunOutcome
RUN_OUTCOME_COMPLETED: RunOutcome
RUN_OUTCOME_FAILED: RunOutcome

class RegisterRequest(_message.Message):
    __slots__ = ("client_id", "num_train_samples", "num_heldout_samples", "dataset", "client_version", "label_counts")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_HELDOUT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    num_train_samples: int
    num_heldout_samples: int
    dataset: str
    client_version: str
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, client_id: _Optional[str] = ..., num_train_samples: _Optional[int] = ..., num_heldout_samples: _Optional[int] = ..., dataset: _Optional[str] = ..., client_version: _Optional[str] = ..., label_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("run_id", "poll_timeout_seconds", "session_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    POLL_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    poll_timeout_seconds: float
    session_secret: str
    def __init__(self, run_id: _Optional[str] = ..., poll_timeout_seconds: _Optional[float] = ..., session_secret: _Optional[str] = ...) -> None: ...

class FetchTaskRequest(_message.Message):
    __slots__ = ("run_id", "client_id", "session_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    client_id: str
    session_secret: str
    def __init__(self, run_id: _Optional[str] = ..., client_id: _Optional[str] = ..., session_secret: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "total_bytes", "sha256", "num_chunks")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    sha256: bytes
    num_chunks: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("run_id", "task_id", "type", "phase", "round", "manifest", "train", "evaluate", "shutdown")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    type: TaskType
    phase: str
    round: int
    manifest: Manifest
    train: TrainTask
    evaluate: EvaluateTask
    shutdown: Shutdown
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., type: _Optional[_Union[TaskType, str]] = ..., phase: _Optional[str] = ..., round: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., train: _Optional[_Union[TrainTask, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateTask, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("model", "epochs", "batch_size", "optimizer", "lr", "sgd_momentum", "binarize", "prox_mu", "deterministic", "evaluate_first", "evaluate_seed", "local_loss", "synthetic_mix", "synthetic", "dp", "dp_noise_multiplier", "dp_target_epsilon", "dp_rounds", "dp_max_grad_norm", "dp_delta", "dp_accountant", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SGD_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BINARIZE_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIRST_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_SEED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_MIX_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DP_MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    sgd_momentum: float
    binarize: bool
    prox_mu: float
    deterministic: bool
    evaluate_first: bool
    evaluate_seed: int
    local_loss: str
    synthetic_mix: float
    synthetic: Manifest
    dp: bool
    dp_noise_multiplier: float
    dp_target_epsilon: float
    dp_rounds: int
    dp_max_grad_norm: float
    dp_delta: float
    dp_accountant: str
    seed: int
    def __init__(self, model: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., sgd_momentum: _Optional[float] = ..., binarize: _Optional[bool] = ..., prox_mu: _Optional[float] = ..., deterministic: _Optional[bool] = ..., evaluate_first: _Optional[bool] = ..., evaluate_seed: _Optional[int] = ..., local_loss: _Optional[str] = ..., synthetic_mix: _Optional[float] = ..., synthetic: _Optional[_Union[Manifest, _Mapping]] = ..., dp: _Optional[bool] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_target_epsilon: _Optional[float] = ..., dp_rounds: _Optional[int] = ..., dp_max_grad_norm: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_accountant: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class EvaluateTask(_message.Message):
    __slots__ = ("model", "binarize", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BINARIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    binarize: bool
    seed: int
    def __init__(self, model: _Optional[str] = ..., binarize: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("outcome", "reason")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    outcome: RunOutcome
    reason: str
    def __init__(self, outcome: _Optional[_Union[RunOutcome, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("run_id", "task_id", "client_id", "phase", "round", "type", "num_samples", "metrics", "manifest", "error", "session_secret")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    client_id: str
    phase: str
    round: int
    type: TaskType
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    manifest: Manifest
    error: str
    session_secret: str
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., client_id: _Optional[str] = ..., phase: _Optional[str] = ..., round: _Optional[int] = ..., type: _Optional[_Union[TaskType, str]] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ..., error: _Optional[str] = ..., session_secret: _Optional[str] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class PresenceRequest(_message.Message):
    __slots__ = ("run_id", "client_id", "session_secret")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    client_id: str
    session_secret: str
    def __init__(self, run_id: _Optional[str] = ..., client_id: _Optional[str] = ..., session_secret: _Optional[str] = ...) -> None: ...

class PresenceReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: bool
    def __init__(self, present: _Optional[bool] = ...) -> None: ...
