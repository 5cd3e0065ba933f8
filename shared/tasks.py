"""The task contract: what the server asks a client to do, one frozen dataclass per task kind.

The server builds these and sends ``to_json()`` as ``TaskHeader.config_json``; the client reads
them back with ``from_json(text, kind)``, which accepts exactly the fields below: an unknown key (a
misspelling), a missing required key, a value of the wrong type or out of range raises
``TaskSettingsError`` naming the key, instead of quietly falling back to a default. The same checks
run when a task is constructed, so the server cannot build one the client would refuse.

Types on the wire: a bool is never taken for an int (JSON ``true`` is not an epoch count), an int
is accepted where a float is expected (``"lr": 1`` means 1.0), and floats must be finite.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np

from .dp import ACCOUNTANTS as DP_ACCOUNTANTS, DPSettings
from .models import MODEL_KINDS

OPTIMIZERS = ("sgd", "adam")
# Local classifier losses: "ce" plain cross-entropy; "balanced" balanced softmax (logit adjustment
# by the client's own label prior, genfl_shared.training.balanced_cross_entropy).
LOCAL_LOSSES = ("ce", "balanced")
# --client-synthetic-mix: the most synthetic images one task may carry (raw uint8 28x28 images,
# base64 in the task's JSON: 500 images are 392 KB raw, 523 KB on the wire, well inside the 1 MiB
# message a task header travels in) and the pixels of one image.
MAX_SYNTHETIC_IMAGES = 500
IMAGE_PIXELS = 28 * 28
NUM_LABELS = 10
SYNTHETIC_KEYS = frozenset({"synthetic_mix", "synthetic_images", "synthetic_labels"})
# Synthetic samples per real sample and epoch, at most: beyond it the local data is a rounding
# error, and a task cannot make a client draw (and allocate) an unbounded number of indices.
MAX_SYNTHETIC_MIX = 10.0
DP_KEYS = frozenset({"dp", "dp_noise_multiplier", "dp_target_epsilon", "dp_rounds", "dp_max_grad_norm",
                     "dp_delta", "dp_accountant"})


class TaskSettingsError(ValueError):
    """Task settings that are not a valid task; ``key`` names the offending setting (if one does)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(f"task setting {key!r}: {message}" if key else message)
        self.key = key


class _TaskSettings:
    """Validation and JSON for the task dataclasses below (each lists its wire-optional keys)."""

    # Keys a sender may leave out because the field's default means "off" (e.g. prox_mu = 0: no
    # proximal term). Every other key must be present on the wire.
    WIRE_OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    KIND: ClassVar[str]

    def __post_init__(self) -> None:
        for key, hint in _field_types(type(self)).items():
            value = _checked(key, getattr(self, key), hint, on_wire=False)
            object.__setattr__(self, key, value)  # frozen: ints given for floats become floats
        self._check_ranges()

    def _check_ranges(self) -> None:
        if self.model not in MODEL_KINDS:
            raise TaskSettingsError("model", f"unknown model {self.model!r}; expected one of {MODEL_KINDS}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise TaskSettingsError("seed", f"must be in [0, 2**63), got {self.seed}")

    def to_json(self) -> str:
        """The wire form; refuses a task whose seed the round engine has not set yet."""
        if self.seed is None:
            raise TaskSettingsError("seed", "not set: the round engine sets a seed per client before sending")
        return json.dumps(dataclasses.asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str):
        """Parse and validate the wire form strictly (see the module docstring)."""
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as error:
            raise TaskSettingsError(None, f"{cls.KIND} task settings are not JSON: {error}") from None
        if not isinstance(data, dict):
            raise TaskSettingsError(None, f"{cls.KIND} task settings must be a JSON object, "
                                          f"got {type(data).__name__}")
        field_types = _field_types(cls)
        unknown = sorted(set(data) - set(field_types))
        if unknown:
            raise TaskSettingsError(unknown[0], f"unknown setting for a {cls.KIND} task "
                                                f"(unknown: {', '.join(unknown)}; known: {', '.join(field_types)})")
        missing = [key for key in field_types if key not in data and key not in cls.WIRE_OPTIONAL]
        if missing:
            raise TaskSettingsError(missing[0], f"missing from the {cls.KIND} task "
                                                f"(missing: {', '.join(missing)})")
        for key, value in data.items():
            _checked(key, value, field_types[key], on_wire=True)
        return cls(**data)


@dataclass(frozen=True)
class TrainTask(_TaskSettings):
    """Train the attached weights on the client's train part; reply with the updated weights.

    With ``evaluate_first`` the client first evaluates the attached weights, untouched, on its
    held-out part (as an EvaluateTask with ``evaluate_seed`` would) and reports that evaluation
    in the same result (metrics eval_loss, eval_accuracy, eval_samples): the previous round's
    global model is the one this round trains from, so one download serves both."""

    KIND: ClassVar[str] = "train"
    WIRE_OPTIONAL: ClassVar[frozenset[str]] = frozenset({"prox_mu", "deterministic", "evaluate_first",
                                                         "evaluate_seed", "local_loss", *DP_KEYS,
                                                         *SYNTHETIC_KEYS})

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
    # synthetic per real sample and epoch: base64 of uint8 [N, 28, 28] pixels and of uint8 [N]
    # labels, N <= MAX_SYNTHETIC_IMAGES; empty: none.
    synthetic_mix: float = 0.0
    synthetic_images: str = ""
    synthetic_labels: str = ""
    # DP-SGD of the CVAE (genfl_shared.dp); dp = False: none, and the other dp_* keep their defaults.
    dp: bool = False
    dp_noise_multiplier: float = 0.0  # > 0: this sigma; 0: calibrated to dp_target_epsilon
    dp_target_epsilon: float = 0.0  # > 0: the final epsilon to calibrate sigma for (with dp_rounds)
    dp_rounds: int = 0  # the CVAE rounds the target epsilon is planned over
    dp_max_grad_norm: float = 0.0  # per-sample clipping bound C, > 0 with dp
    dp_delta: float = 0.0  # the delta of the accounted guarantee, in (0, 1) with dp
    dp_accountant: str = "rdp"  # one of genfl_shared.dp.ACCOUNTANTS
    seed: int | None = None  # per client and round (set by the round engine); required on the wire

    def _check_ranges(self) -> None:
        super()._check_ranges()
        if self.epochs < 0:
            raise TaskSettingsError("epochs", f"must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise TaskSettingsError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise TaskSettingsError("optimizer", f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.model == "cvae" and self.optimizer != "adam":
            raise TaskSettingsError("optimizer", f"the CVAE trains with 'adam', not {self.optimizer!r}")
        if self.lr <= 0:
            raise TaskSettingsError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.sgd_momentum < 1:
            raise TaskSettingsError("sgd_momentum", f"must be in [0, 1), got {self.sgd_momentum}")
        if self.sgd_momentum and self.optimizer != "sgd":
            raise TaskSettingsError("sgd_momentum", f"applies to SGD only, got {self.sgd_momentum} "
                                                    f"with {self.optimizer!r}")
        if self.prox_mu < 0:
            raise TaskSettingsError("prox_mu", f"must be >= 0, got {self.prox_mu}")
        if not 0 <= self.evaluate_seed < 2**63:
            raise TaskSettingsError("evaluate_seed", f"must be in [0, 2**63), got {self.evaluate_seed}")
        if self.evaluate_seed and not self.evaluate_first:
            raise TaskSettingsError("evaluate_seed", "is set but evaluate_first is not: no evaluation to seed")
        if self.local_loss not in LOCAL_LOSSES:
            raise TaskSettingsError("local_loss", f"unknown loss {self.local_loss!r}; expected one of {LOCAL_LOSSES}")
        if self.local_loss != "ce" and self.model != "classifier":
            raise TaskSettingsError("local_loss", f"{self.local_loss!r} is a classifier loss, not one for the "
                                                  f"{self.model}")
        self._check_dp()
        self._check_synthetic()

    def _check_synthetic(self) -> None:
        if not 0 <= self.synthetic_mix <= MAX_SYNTHETIC_MIX:  # also refuses NaN
            raise TaskSettingsError("synthetic_mix", f"must be in [0, {MAX_SYNTHETIC_MIX:g}], got {self.synthetic_mix}")
        if not (self.synthetic_images or self.synthetic_labels):
            return
        if self.model != "classifier":
            raise TaskSettingsError("synthetic_images", f"synthetic images are for the classifier, not the {self.model}")
        if not self.synthetic_mix:
            raise TaskSettingsError("synthetic_mix", "synthetic images came with synthetic_mix 0: nothing to mix")
        self.synthetic_set()  # decodes and checks them

    def synthetic_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The task's synthetic images (uint8 [N, 28, 28]) and labels (int64 [N]), or None;
        TaskSettingsError for buffers that are not that (bad base64, sizes, labels)."""
        if not self.synthetic_images and not self.synthetic_labels:
            return None
        images, labels = _base64("synthetic_images", self.synthetic_images), _base64("synthetic_labels",
                                                                                     self.synthetic_labels)
        if len(images) % IMAGE_PIXELS or len(images) // IMAGE_PIXELS != len(labels) or not labels:
            raise TaskSettingsError("synthetic_images", f"{len(images)} pixel bytes do not make one 28x28 image "
                                                        f"for each of {len(labels)} labels")
        if len(labels) > MAX_SYNTHETIC_IMAGES:
            raise TaskSettingsError("synthetic_images", f"{len(labels)} images, more than {MAX_SYNTHETIC_IMAGES}")
        label_array = np.frombuffer(labels, dtype=np.uint8).astype(np.int64)
        if int(label_array.max()) >= NUM_LABELS:
            raise TaskSettingsError("synthetic_labels", f"label {int(label_array.max())} outside 0..{NUM_LABELS - 1}")
        return np.frombuffer(images, dtype=np.uint8).reshape(-1, 28, 28), label_array

    def to_json(self) -> str:
        """The wire form; without DP it carries no dp_* keys, with plain cross-entropy no local_loss
        (the task of a run without them reads as it did before they existed)."""
        data = json.loads(super().to_json())
        left_out = ((set() if self.dp else DP_KEYS) | ({"local_loss"} if self.local_loss == "ce" else set())
                    | (set() if self.synthetic_mix else SYNTHETIC_KEYS))
        return json.dumps({k: v for k, v in data.items() if k not in left_out}, allow_nan=False)

    def dp_settings(self) -> DPSettings | None:
        """The task's DP-SGD settings (None without DP)."""
        if not self.dp:
            return None
        return DPSettings(max_grad_norm=self.dp_max_grad_norm, delta=self.dp_delta, accountant=self.dp_accountant,
                          noise_multiplier=self.dp_noise_multiplier or None,
                          target_epsilon=self.dp_target_epsilon or None,
                          planned_rounds=self.dp_rounds if self.dp_target_epsilon else 0)

    def _check_dp(self) -> None:
        if not self.dp:
            for key in DP_KEYS - {"dp"}:
                if getattr(self, key) != _DP_OFF[key]:
                    raise TaskSettingsError(key, "is a DP-SGD setting, but dp is off")
            return
        if self.model != "cvae":
            raise TaskSettingsError("dp", f"DP-SGD is for the CVAE phase, not the {self.model}")
        if self.prox_mu:
            raise TaskSettingsError("dp", "DP-SGD cannot train with FedProx's proximal term (its gradient "
                                          "is not per sample)")
        if (self.dp_noise_multiplier > 0) == (self.dp_target_epsilon > 0):
            raise TaskSettingsError("dp_noise_multiplier", "DP-SGD needs exactly one of dp_noise_multiplier "
                                                           "and dp_target_epsilon > 0")
        if self.dp_noise_multiplier < 0 or self.dp_target_epsilon < 0:
            raise TaskSettingsError("dp_noise_multiplier", "noise multiplier and target epsilon must be >= 0")
        if self.dp_target_epsilon > 0 and self.dp_rounds < 1:
            raise TaskSettingsError("dp_rounds", f"a target epsilon needs dp_rounds >= 1, got {self.dp_rounds}")
        if self.dp_max_grad_norm <= 0:
            raise TaskSettingsError("dp_max_grad_norm", f"must be > 0, got {self.dp_max_grad_norm}")
        if not 0 < self.dp_delta < 1:
            raise TaskSettingsError("dp_delta", f"must be in (0, 1), got {self.dp_delta}")
        if self.dp_accountant not in DP_ACCOUNTANTS:
            raise TaskSettingsError("dp_accountant", f"unknown accountant {self.dp_accountant!r}; "
                                                     f"expected one of {DP_ACCOUNTANTS}")

    def first_evaluation(self) -> "EvaluateTask | None":
        """The evaluation to run before training (None without evaluate_first)."""
        if not self.evaluate_first:
            return None
        return EvaluateTask(model=self.model, binarize=self.binarize, seed=self.evaluate_seed)


@dataclass(frozen=True)
class EvaluateTask(_TaskSettings):
    """Evaluate the attached weights on the client's held-out part; reply with metrics only."""

    KIND: ClassVar[str] = "evaluate"

    model: str  # one of models.MODEL_KINDS
    binarize: bool  # as for training: the held-out images are prepared the same way
    seed: int | None = None  # the CVAE's sampling noise (set by the round engine); required on the wire


_DP_OFF = {key: getattr(TrainTask, key) for key in DP_KEYS}  # the defaults: DP-SGD off

TaskSettings = Union[TrainTask, EvaluateTask]
TASK_KINDS: dict[str, type[TrainTask] | type[EvaluateTask]] = {"train": TrainTask, "evaluate": EvaluateTask}


def from_json(text: str, kind: str) -> TaskSettings:
    """Parse the settings of a ``kind`` task ("train" or "evaluate"); raises TaskSettingsError."""
    try:
        cls = TASK_KINDS[kind]
    except KeyError:
        raise TaskSettingsError(None, f"unknown task kind {kind!r}; expected one of {sorted(TASK_KINDS)}") from None
    return cls.from_json(text)


# -- helpers ----------------------------------------------------------------------------------------

def encode_synthetic(images: np.ndarray, labels: np.ndarray) -> tuple[str, str]:
    """(synthetic_images, synthetic_labels) of a TrainTask from uint8 [N, 28, 28] images and labels."""
    return (base64.b64encode(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).decode("ascii"),
            base64.b64encode(np.asarray(labels, dtype=np.uint8).tobytes()).decode("ascii"))


def _base64(key: str, text: str) -> bytes:
    # Bounded before decoding: a hostile or broken sender cannot make the client decode megabytes.
    if len(text) > 4 * (MAX_SYNTHETIC_IMAGES * IMAGE_PIXELS) // 3 + 4:
        raise TaskSettingsError(key, f"{len(text)} characters, more than {MAX_SYNTHETIC_IMAGES} images take")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise TaskSettingsError(key, f"is not base64: {error}") from None


@functools.cache
def _field_types(cls: type) -> types.MappingProxyType:
    """Each field's type (read-only), resolved once per class: ``typing.get_type_hints`` evaluates
    the annotations' strings on every call, and every task (one per client per step on the
    server, one per task received on a client) is validated through this."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls)})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise TaskSettingsError(key, "given twice")
        data[key] = value
    return data


def _checked(key: str, value: Any, hint: Any, *, on_wire: bool) -> Any:
    """``value`` as a ``hint`` (str, bool, int, float, or ``X | None``), or TaskSettingsError.

    ``None`` is allowed off the wire only (a field the round engine has yet to fill in)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if value is None:
        if optional and not on_wire:
            return None
        raise TaskSettingsError(key, f"must be {base.__name__}, got null")
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
