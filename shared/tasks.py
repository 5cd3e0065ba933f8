"""The task contract: what the server asks a client to do, one frozen dataclass per task kind.

On the wire a task is the proto message of the same name (``TaskHeader.train`` / ``.evaluate``,
proto/genfl.proto): ``set_settings(header, task)`` writes one and ``from_header(header)`` reads it
back. A training task's synthetic images travel as a second payload whose chunks follow the
weights' (``TrainTask.synthetic``, encoded by ``set_settings``, decoded by the receiver). The proto
fixes the types; what it cannot say is checked here, from two tables: ``FIELD_RULES`` (each
field's range or choices) and ``COMBINATION_RULES`` (fields that must fit together). A value out
of range, a required field left out, a field this client does not know or a task of the wrong
kind raises ``TaskSettingsError`` naming the field, instead of quietly falling back to a default.
The same checks run when a task is constructed, so the server cannot build one the client would
refuse.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Union

import numpy as np
import torch
from google.protobuf import unknown_fields

from .codec import Payload, encode_state_dict
from .dp import ACCOUNTANTS as DP_ACCOUNTANTS, DPSettings
from .models import MODEL_KINDS
from .proto import genfl_pb2 as pb

OPTIMIZERS = ("sgd", "adam")
# Local classifier losses: "ce" plain cross-entropy; "balanced" balanced softmax (logit adjustment
# by the client's own label prior, genfl_shared.training.balanced_cross_entropy).
LOCAL_LOSSES = ("ce", "balanced")
# --client-synthetic-mix: the most synthetic images one task may carry (uint8 28x28 images and a
# uint8 label each, as a payload after the weights: 500 images are 392 KB) and their layout.
MAX_SYNTHETIC_IMAGES = 500
IMAGE_PIXELS = 28 * 28
IMAGE_SHAPE = (28, 28)
NUM_LABELS = 10
MAX_SYNTHETIC_BYTES = MAX_SYNTHETIC_IMAGES * (IMAGE_PIXELS + 1)
SYNTHETIC_KEYS = frozenset({"synthetic_mix", "synthetic_images", "synthetic_labels"})
# TrainTask's fields that travel as the synthetic payload's tensors, not as fields of the message.
SYNTHETIC_TENSORS = {"synthetic_images": "images", "synthetic_labels": "labels"}
# Synthetic samples per real sample and epoch, at most: beyond it the local data is a rounding
# error, and a task cannot make a client draw (and allocate) an unbounded number of indices.
MAX_SYNTHETIC_MIX = 10.0
DP_KEYS = frozenset({"dp", "dp_noise_multiplier", "dp_target_epsilon", "dp_rounds", "dp_max_grad_norm",
                     "dp_delta", "dp_accountant"})
SEED_LIMIT = 2**63  # seeds are in [0, 2**63): torch and numpy take them, and int64 carries them


class TaskSettingsError(ValueError):
    """Task settings that are not a valid task; ``key`` names the offending setting (if one does)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(f"task setting {key!r}: {message}" if key else message)
        self.key = key


# -- the rules ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """Numbers from ``low`` to ``high`` (None: unbounded), each end in or out as the flags say."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:  # False for NaN
        return ((self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))

    def describe(self) -> str:
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {_number(self.low)}"
        return (f"must be in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")


@dataclass(frozen=True)
class Choices:
    """One of ``allowed``; ``what`` names the kind of thing in the message ("unknown optimizer ...")."""

    allowed: tuple[str, ...]
    what: str

    def holds(self, value: str) -> bool:
        return value in self.allowed

    def describe(self) -> str:
        return f"expected one of {self.allowed}"


# Each field's own range or choices, for whichever task kind has it.
FIELD_RULES: dict[str, Interval | Choices] = {
    "model": Choices(MODEL_KINDS, "model"),
    "seed": Interval(0, SEED_LIMIT, high_open=True),
    "epochs": Interval(0),
    "batch_size": Interval(1),
    "optimizer": Choices(OPTIMIZERS, "optimizer"),
    "lr": Interval(0, low_open=True),
    "sgd_momentum": Interval(0, 1, high_open=True),
    "prox_mu": Interval(0),
    "evaluate_seed": Interval(0, SEED_LIMIT, high_open=True),
    "local_loss": Choices(LOCAL_LOSSES, "loss"),
    "synthetic_mix": Interval(0, MAX_SYNTHETIC_MIX),
    "dp_noise_multiplier": Interval(0),
    "dp_target_epsilon": Interval(0),
    "dp_rounds": Interval(0),
    "dp_max_grad_norm": Interval(0),
    "dp_delta": Interval(0, 1, high_open=True),
    "dp_accountant": Choices(DP_ACCOUNTANTS, "accountant"),
}


@dataclass(frozen=True)
class Combination:
    """``holds(task)`` must be true, else ``field`` is refused with ``message`` (formatted with the
    task's fields)."""

    field: str
    holds: Callable[[Any], bool]
    message: str


def _dp_off_rule(key: str) -> Combination:
    return Combination(key, lambda t: t.dp or getattr(t, key) == _DP_OFF[key], "is a DP-SGD setting, but dp is off")


def _has_synthetic(task) -> bool:
    return bool(task.synthetic_images or task.synthetic_labels)


# TrainTask's fields that must fit together, checked in this order after FIELD_RULES.
COMBINATION_RULES: tuple[Combination, ...] = (
    Combination("optimizer", lambda t: t.model != "cvae" or t.optimizer == "adam",
                "the CVAE trains with 'adam', not {optimizer!r}"),
    Combination("sgd_momentum", lambda t: not t.sgd_momentum or t.optimizer == "sgd",
                "applies to SGD only, got {sgd_momentum} with {optimizer!r}"),
    Combination("evaluate_seed", lambda t: not t.evaluate_seed or t.evaluate_first,
                "is set but evaluate_first is not: no evaluation to seed"),
    Combination("local_loss", lambda t: t.local_loss == "ce" or t.model == "classifier",
                "{local_loss!r} is a classifier loss, not one for the {model}"),
    *(_dp_off_rule(key) for key in sorted(DP_KEYS - {"dp"})),
    Combination("dp", lambda t: not t.dp or t.model == "cvae", "DP-SGD is for the CVAE phase, not the {model}"),
    Combination("dp", lambda t: not (t.dp and t.prox_mu),
                "DP-SGD cannot train with FedProx's proximal term (its gradient is not per sample)"),
    Combination("dp_noise_multiplier", lambda t: not t.dp or (t.dp_noise_multiplier > 0) != (t.dp_target_epsilon > 0),
                "DP-SGD needs exactly one of dp_noise_multiplier and dp_target_epsilon > 0"),
    Combination("dp_rounds", lambda t: not (t.dp and t.dp_target_epsilon > 0) or t.dp_rounds >= 1,
                "a target epsilon needs dp_rounds >= 1, got {dp_rounds}"),
    Combination("dp_max_grad_norm", lambda t: not t.dp or t.dp_max_grad_norm > 0, "must be > 0, got {dp_max_grad_norm}"),
    Combination("dp_delta", lambda t: not t.dp or t.dp_delta > 0, "must be in (0, 1), got {dp_delta}"),
    Combination("synthetic_images", lambda t: not _has_synthetic(t) or t.model == "classifier",
                "synthetic images are for the classifier, not the {model}"),
    Combination("synthetic_mix", lambda t: not _has_synthetic(t) or t.synthetic_mix,
                "synthetic images came with synthetic_mix 0: nothing to mix"),
)


# -- the task types ----------------------------------------------------------------------------------

class _TaskSettings:
    """Checks and the proto form of the task dataclasses below (each lists its wire-optional keys)."""

    # Keys a sender may leave out because the field's default means "off" (e.g. prox_mu = 0: no
    # proximal term). Every other key must be present on the wire.
    WIRE_OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    KIND: ClassVar[str]
    COMBINATIONS: ClassVar[tuple[Combination, ...]] = ()
    MESSAGE: ClassVar[type]  # the proto message of the same name

    def __post_init__(self) -> None:
        for key, hint in _field_types(type(self)).items():
            object.__setattr__(self, key, _typed(key, getattr(self, key), hint))  # ints given for floats
        for key in _field_types(type(self)):
            rule, value = FIELD_RULES.get(key), getattr(self, key)
            if rule is not None and value is not None and not rule.holds(value):
                raise TaskSettingsError(key, _refusal(rule, value))
        for combination in self.COMBINATIONS:
            if not combination.holds(self):
                raise TaskSettingsError(combination.field, combination.message.format(**self._shown()))
        self._check_contents()

    def _shown(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _check_contents(self) -> None:
        """Checks of a field's contents beyond a range (none by default)."""

    def to_proto(self):
        """The wire form; refuses a task whose seed the round engine has not set yet. Wire-optional
        fields at their defaults are left out."""
        if self.seed is None:
            raise TaskSettingsError("seed", "not set: the round engine sets a seed per client before sending")
        message = self.MESSAGE()
        for key in _message_fields(type(self)):
            value = getattr(self, key)
            if key not in self.WIRE_OPTIONAL or value != _defaults(type(self))[key]:
                setattr(message, key, value)
        return message

    @classmethod
    def from_proto(cls, message, synthetic: Mapping[str, torch.Tensor] | None = None):
        """Read and check the wire form (see the module docstring); ``synthetic``: the tensors of the
        payload a TrainTask's ``synthetic`` manifest announces, as received."""
        unknown = sorted({field.field_number for field in unknown_fields.UnknownFieldSet(message)})
        if unknown:
            key = f"#{unknown[0]}"
            raise TaskSettingsError(key, f"unknown setting for a {cls.KIND} task (field numbers "
                                         f"{', '.join(map(str, unknown))}; known: {', '.join(_message_fields(cls))})")
        missing = [key for key in _message_fields(cls) if key not in cls.WIRE_OPTIONAL and not message.HasField(key)]
        if missing:
            raise TaskSettingsError(missing[0], f"missing from the {cls.KIND} task (missing: {', '.join(missing)})")
        values = {key: getattr(message, key) for key in _message_fields(cls)}
        # proto3 reads a string left out as "": such a field means its dataclass default.
        values.update({key: default for key, default in _defaults(cls).items()
                       if key in cls.WIRE_OPTIONAL and isinstance(default, str) and values.get(key) == ""})
        return cls(**values, **cls._received_payload(message, synthetic))

    @classmethod
    def _received_payload(cls, message, synthetic: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
        """The fields that travel as a payload after the weights (none by default)."""
        return {}


@dataclass(frozen=True)
class TrainTask(_TaskSettings):
    """Train the attached weights on the client's train part; reply with the updated weights.

    With ``evaluate_first`` the client first evaluates the attached weights, untouched, on its
    held-out part (as an EvaluateTask with ``evaluate_seed`` would) and reports that evaluation
    in the same result (metrics eval_loss, eval_accuracy, eval_samples): the previous round's
    global model is the one this round trains from, so one download serves both."""

    KIND: ClassVar[str] = "train"
    MESSAGE: ClassVar[type] = pb.TrainTask
    WIRE_OPTIONAL: ClassVar[frozenset[str]] = frozenset({"prox_mu", "deterministic", "evaluate_first",
                                                         "evaluate_seed", "local_loss", *DP_KEYS,
                                                         *SYNTHETIC_KEYS})
    COMBINATIONS: ClassVar[tuple[Combination, ...]] = COMBINATION_RULES

    model: str  # one of models.MODEL_KINDS: the architecture the weights belong to
    epochs: int  # local epochs over the train part (0: the weights come back untrained)
    batch_size: int  # local mini-batch size, >= 1
    optimizer: str  # "sgd" or "adam" (the CVAE trains with Adam only)
    lr: float  # local learning rate, > 0
    sgd_momentum: float  # SGD momentum in [0, 1); must be 0 for Adam
    binarize: bool  # threshold pixels to {0, 1} (as the CVAE's Bernoulli likelihood assumes)
    prox_mu: float = 0.0  # FedProx proximal weight, >= 0; 0: no proximal term (set by the strategy)
    deterministic: bool = False  # torch deterministic algorithms (set by the round engine)
    evaluate_first: bool = False  # evaluate the received weights before training (set by the round engine)
    evaluate_seed: int = 0  # that evaluation's seed (the CVAE's sampling noise), with evaluate_first only
    # The classifier's local loss, one of LOCAL_LOSSES; "balanced" adjusts the logits by the label
    # prior of the client's own train part (the prior is computed there and never sent).
    local_loss: str = "ce"
    # Synthetic (never real) labelled images the server sends for the classes the client lacks
    # (--client-synthetic-mix), mixed into the classifier's local training at synthetic_mix
    # synthetic per real sample and epoch: uint8 [N, 28, 28] pixels and uint8 [N] labels as raw
    # bytes, N <= MAX_SYNTHETIC_IMAGES; empty: none.
    synthetic_mix: float = 0.0
    synthetic_images: bytes = b""
    synthetic_labels: bytes = b""
    # DP-SGD of the CVAE (genfl_shared.dp); dp = False: none, and the other dp_* keep their defaults.
    dp: bool = False
    dp_noise_multiplier: float = 0.0  # > 0: this sigma; 0: calibrated to dp_target_epsilon
    dp_target_epsilon: float = 0.0  # > 0: the final epsilon to calibrate sigma for (with dp_rounds)
    dp_rounds: int = 0  # the CVAE rounds the target epsilon is planned over
    dp_max_grad_norm: float = 0.0  # per-sample clipping bound C, > 0 with dp
    dp_delta: float = 0.0  # the delta of the accounted guarantee, in (0, 1) with dp
    dp_accountant: str = "rdp"  # one of genfl_shared.dp.ACCOUNTANTS
    seed: int | None = None  # per client and round (set by the round engine); required on the wire

    def _check_contents(self) -> None:
        if _has_synthetic(self):
            self.synthetic_set()  # decodes and checks them

    @classmethod
    def _received_payload(cls, message, synthetic: Mapping[str, torch.Tensor] | None) -> dict[str, bytes]:
        """synthetic_images and synthetic_labels from the synthetic payload the message announces."""
        if not message.HasField("synthetic"):
            return {}
        check_synthetic_manifest(message.synthetic)
        if synthetic is None:
            raise TaskSettingsError("synthetic_images", "announced in the task but not received")
        return {key: synthetic[tensor].numpy().tobytes() for key, tensor in SYNTHETIC_TENSORS.items()}

    def synthetic_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The task's synthetic images (uint8 [N, 28, 28]) and labels (int64 [N]), or None;
        TaskSettingsError for buffers that are not that (sizes, labels)."""
        if not _has_synthetic(self):
            return None
        images, labels = self.synthetic_images, self.synthetic_labels
        if len(labels) > MAX_SYNTHETIC_IMAGES or len(images) > MAX_SYNTHETIC_IMAGES * IMAGE_PIXELS:
            raise TaskSettingsError("synthetic_images", f"{len(labels)} labels and {len(images) // IMAGE_PIXELS} "
                                                        f"images, more than {MAX_SYNTHETIC_IMAGES}")
        if len(images) % IMAGE_PIXELS or len(images) // IMAGE_PIXELS != len(labels) or not labels:
            raise TaskSettingsError("synthetic_images", f"{len(images)} pixel bytes do not make one 28x28 image "
                                                        f"for each of {len(labels)} labels")
        label_array = np.frombuffer(labels, dtype=np.uint8).astype(np.int64)
        if int(label_array.max()) >= NUM_LABELS:
            raise TaskSettingsError("synthetic_labels", f"label {int(label_array.max())} outside 0..{NUM_LABELS - 1}")
        return np.frombuffer(images, dtype=np.uint8).reshape(-1, 28, 28), label_array

    def dp_settings(self) -> DPSettings | None:
        """The task's DP-SGD settings (None without DP)."""
        if not self.dp:
            return None
        return DPSettings(max_grad_norm=self.dp_max_grad_norm, delta=self.dp_delta, accountant=self.dp_accountant,
                          noise_multiplier=self.dp_noise_multiplier or None,
                          target_epsilon=self.dp_target_epsilon or None,
                          planned_rounds=self.dp_rounds if self.dp_target_epsilon else 0)

    def first_evaluation(self) -> "EvaluateTask | None":
        """The evaluation to run before training (None without evaluate_first)."""
        if not self.evaluate_first:
            return None
        return EvaluateTask(model=self.model, binarize=self.binarize, seed=self.evaluate_seed)


@dataclass(frozen=True)
class EvaluateTask(_TaskSettings):
    """Evaluate the attached weights on the client's held-out part; reply with metrics only."""

    KIND: ClassVar[str] = "evaluate"
    MESSAGE: ClassVar[type] = pb.EvaluateTask

    model: str  # one of models.MODEL_KINDS
    binarize: bool  # as for training: the held-out images are prepared the same way
    seed: int | None = None  # the CVAE's sampling noise (set by the round engine); required on the wire


_DP_OFF = {key: getattr(TrainTask, key) for key in DP_KEYS}  # the defaults: DP-SGD off

TaskSettings = Union[TrainTask, EvaluateTask]
# TaskHeader's settings oneof: which field each task type's settings travel in, and their type.
TASK_KINDS: dict[int, tuple[str, type[TrainTask] | type[EvaluateTask]]] = {
    pb.TASK_TYPE_TRAIN: ("train", TrainTask),
    pb.TASK_TYPE_EVALUATE: ("evaluate", EvaluateTask),
}


def set_settings(header: pb.TaskHeader, settings: TaskSettings) -> Payload | None:
    """Put ``settings`` in ``header``'s oneof field (train or evaluate, by their type); returns the
    payload of a training task's synthetic images (its manifest set in the header), whose chunks
    the stream carries after the weights' (None without synthetic images)."""
    message = getattr(header, settings.KIND)
    message.CopyFrom(settings.to_proto())
    synthetic = synthetic_payload(settings)
    if synthetic is not None:
        message.synthetic.CopyFrom(synthetic.manifest)
    return synthetic


def synthetic_payload(settings: TaskSettings) -> Payload | None:
    """A training task's synthetic images and labels encoded as a payload (None without)."""
    if not isinstance(settings, TrainTask) or not _has_synthetic(settings):
        return None
    images = np.frombuffer(settings.synthetic_images, dtype=np.uint8).reshape(-1, *IMAGE_SHAPE)
    labels = np.frombuffer(settings.synthetic_labels, dtype=np.uint8)
    return encode_state_dict({"images": torch.from_numpy(images.copy()), "labels": torch.from_numpy(labels.copy())})


def check_synthetic_manifest(manifest: pb.Manifest) -> None:
    """Refuse (TaskSettingsError) a synthetic payload that is not images and labels of at most
    MAX_SYNTHETIC_IMAGES images: checked before a byte of it is received."""
    specs = {spec.name: spec for spec in manifest.tensors}
    if [spec.name for spec in manifest.tensors] != list(SYNTHETIC_TENSORS.values()):
        raise TaskSettingsError("synthetic_images", f"the synthetic payload must hold the tensors "
                                                    f"{list(SYNTHETIC_TENSORS.values())}, got {list(specs)}")
    images, labels = specs["images"], specs["labels"]
    if images.dtype != "uint8" or labels.dtype != "uint8":
        raise TaskSettingsError("synthetic_images", f"synthetic images and labels must be uint8, got "
                                                    f"{images.dtype} and {labels.dtype}")
    if len(labels.shape) != 1 or list(images.shape) != [labels.shape[0], *IMAGE_SHAPE]:
        raise TaskSettingsError("synthetic_images", f"images of shape {list(images.shape)} are not one 28x28 "
                                                    f"image for each of the labels of shape {list(labels.shape)}")
    if not 1 <= labels.shape[0] <= MAX_SYNTHETIC_IMAGES:
        raise TaskSettingsError("synthetic_images", f"{labels.shape[0]} images: must be at least one and no "
                                                    f"more than {MAX_SYNTHETIC_IMAGES}")


def from_header(header: pb.TaskHeader, synthetic: Mapping[str, torch.Tensor] | None = None) -> TaskSettings:
    """The checked settings of a TRAIN or EVALUATE task header (``synthetic``: the tensors of its
    synthetic payload, as received); raises TaskSettingsError."""
    if header.type not in TASK_KINDS:
        raise TaskSettingsError(None, f"task type {header.type} carries no train or evaluate settings")
    field, cls = TASK_KINDS[header.type]
    carried = header.WhichOneof("settings")
    if carried != field:
        raise TaskSettingsError(None, f"a {pb.TaskType.Name(header.type)} task must carry {field} settings, "
                                      f"got {carried or 'none'}")
    return cls.from_proto(getattr(header, field), synthetic)


def encode_synthetic(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """(synthetic_images, synthetic_labels) of a TrainTask from uint8 [N, 28, 28] images and labels."""
    return (np.ascontiguousarray(images, dtype=np.uint8).tobytes(), np.asarray(labels, dtype=np.uint8).tobytes())


# -- helpers ----------------------------------------------------------------------------------------

@functools.cache
def _field_types(cls: type) -> types.MappingProxyType:
    """Each field's type (read-only), resolved once per class: ``typing.get_type_hints`` evaluates
    the annotations' strings on every call, and every task (one per client per step on the
    server, one per task received on a client) is checked through this."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls)})


@functools.cache
def _message_fields(cls: type) -> tuple[str, ...]:
    """The fields that travel as fields of the task's proto message."""
    return tuple(key for key in _field_types(cls) if key not in SYNTHETIC_TENSORS)


@functools.cache
def _defaults(cls: type) -> types.MappingProxyType:
    return types.MappingProxyType({f.name: f.default for f in dataclasses.fields(cls)
                                   if f.default is not dataclasses.MISSING})


def _refusal(rule: Interval | Choices, value: Any) -> str:
    if isinstance(rule, Choices):
        return f"unknown {rule.what} {value!r}; {rule.describe()}"
    return f"{rule.describe()}, got {value}"


def _number(value: float | None) -> str:
    return "2**63" if value == SEED_LIMIT else f"{value:g}"


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as a ``hint`` (str, bytes, bool, int, float, or ``X | None``), or TaskSettingsError.

    The proto fixes the types on the wire; this checks a task built in memory (a bool is not an
    int, an int is a float) and that floats are finite. ``None`` is allowed where the type says."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if value is None:
        if optional:
            return None
        raise TaskSettingsError(key, f"must be {base.__name__}, got None")
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        raise TaskSettingsError(key, f"must be {base.__name__}, got {type(value).__name__} {value!r}")
    if base is float:
        try:
            value = float(value)
        except OverflowError:
            raise TaskSettingsError(key, f"is too large for a float: {value}") from None
        if not math.isfinite(value):
            raise TaskSettingsError(key, f"must be finite, got {value}")
    return value
