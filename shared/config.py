"""Run settings grouped by concern, the two presets, and the one definition of every run option's CLI form.

``paper`` is exactly the poster's configuration. ``quick`` keeps every step of the method but
shrinks the amounts so that ``genfl-launch --compare`` finishes in minutes on a 2-core CPU while
still showing the pre-training effect at alpha = 0.1; README.md lists its reductions.

A ``RunConfig`` is a set of frozen groups, one per concern (``cfg.data``, ``cfg.training``,
``cfg.aggregation``, ``cfg.guard``, ``cfg.transport``, ``cfg.dp``, ``cfg.generator``,
``cfg.pretraining``, ``cfg.mitigations``, ``cfg.reproducibility``); ``PathSettings``, the files a server run reads,
is a group of its own beside it. Every setting has one name, unique across the groups, which is
also its flat name: the key in ``to_dict()`` (summary.json, the run state), the ``--option``
(dashes for underscores) and the GENFL_* variable. Every setting carries its command-line form
(``RunOption``: help, bounds as plain ``IntRange`` / ``FloatRange`` / ``Choice`` /
``ExistingPath`` descriptions, old spellings); genfl_shared.cli_settings turns these into click options, so
genfl-server, genfl-launch, genfl-sweep, genfl-centralised and genfl-partition spell, bound,
document and read a setting the same way, while the settings themselves need no click.
``preset_config`` is the one place where a preset and the explicitly given options become a
``RunConfig``; ``RunConfig.to_argv`` is how tools that start a server pass settings on. A name
that is not a setting is refused everywhere, never ignored.
"""

from __future__ import annotations

import difflib
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from .dp import ACCOUNTANTS, DEFAULT_DELTA
from .tasks import LOCAL_LOSSES

DISTILL_TEACHERS = ("clients", "previous")  # genfl_server/distill.py
# The aggregation strategies, in the order choice lists and reports show them, and those among
# them that hold every update of a round and do not trust their mean (the robust ones).
# genfl_server/strategy.py implements each under its name and refuses to load if its registry
# differs, so the settings can offer them without importing the server.
STRATEGY_NAMES = ("fedavg", "fedprox", "fedavgm", "median", "trimmed_mean", "krum")
ROUND_HOLDING_STRATEGIES = frozenset({"median", "trimmed_mean", "krum"})
# How the CVAE phase's client models become the generator the server samples (genfl_server/generator.py).
CVAE_AGGREGATIONS = ("fedavg", "classwise", "ensemble", "distill")


# What a setting's option accepts, described without click: genfl_shared.cli_settings.click_type
# makes the click type that enforces it on the command line (a RunConfig built in code is not checked).
@dataclass(frozen=True)
class IntRange:
    """Integers from ``min`` to ``max``, both included (None: unbounded on that side)."""

    min: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class FloatRange:
    """Numbers from ``min`` to ``max`` (None: unbounded on that side); an open end excludes its bound."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False


@dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class ExistingPath:
    """The path of an existing folder (``folder``) or file."""

    folder: bool = False


@dataclass(frozen=True)
class RunOption:
    """The command-line form of a setting (``--<name>`` unless it is a boolean pair)."""

    help: str
    type: IntRange | FloatRange | Choice | ExistingPath | None = None  # None: the field's own type (bool: a pair)
    deprecated: tuple[str, ...] = ()  # old spellings, still accepted for one release, with a warning


def _setting(default, help: str, type=None, *, strategy_option: tuple[str, str] | None = None, **kwargs) -> Any:
    """A setting's default and command-line form; ``strategy_option`` = (strategy, parameter) marks
    a setting that one strategy is built from, under that parameter name."""
    metadata: dict[str, Any] = {"option": RunOption(help, type, **kwargs)}
    if strategy_option is not None:
        metadata["strategy_option"] = strategy_option
    return field(default=default, metadata=metadata)


_COUNT = IntRange(0)
_POSITIVE = IntRange(1)
_RATE = FloatRange(min=0, min_open=True)


@dataclass(frozen=True)
class DataSettings:
    """The federation's data: how many clients, which images, and how they are encoded."""

    clients: int = _setting(10, "Number of federated clients.", _POSITIVE)
    train_subset: int | None = _setting(None, "Use this many randomly chosen training images (0: all).", _COUNT)
    binarize: bool = _setting(True, "Binarise images at 0.5 as the paper does (--no-binarize keeps grey levels).")


@dataclass(frozen=True)
class TrainingSettings:
    """The federated rounds of each phase and every client's local training in them."""

    cvae_rounds: int = _setting(20, "Rounds of the federated CVAE phase.", _COUNT)
    classifier_rounds: int = _setting(10, "Rounds of the federated classifier phase.", _COUNT)
    local_epochs: int = _setting(2, "Local epochs per round (0: clients only evaluate).", _COUNT)
    cvae_local_epochs: int | None = _setting(
        None, "Local epochs per CVAE round, when not --local-epochs (e.g. one round of many epochs: "
        "--cvae-rounds 1 --cvae-local-epochs 20, FedCVAE's one-shot form).", _COUNT)
    batch_size: int = _setting(32, "Local batch size.", _POSITIVE)
    cvae_lr: float = _setting(1e-3, "Clients' Adam learning rate for the CVAE.", _RATE)
    classifier_lr: float = _setting(1e-3, "Clients' SGD learning rate for the classifier.", _RATE)
    sgd_momentum: float = _setting(0.5, "Clients' SGD momentum for the classifier.", FloatRange(0),
                                   deprecated=("--classifier-momentum",))
    local_loss: str = _setting("ce", "Clients' local loss for the classifier: 'ce' (cross-entropy) or 'balanced' "
                               "(balanced softmax: logits adjusted by the client's own label prior, computed "
                               "from its train part and never sent).", Choice(LOCAL_LOSSES))


@dataclass(frozen=True)
class StrategySettings:
    """One strategy and the settings it is built from, under its own parameter names
    (``genfl_server.strategy.build_strategy`` refuses any it does not take)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationSettings:
    """The strategy that turns a round's updates into the next global model, and each strategy's own
    settings; ``strategy_settings()`` picks the chosen one's."""

    strategy: str = _setting("fedavg", "Aggregation strategy of the federated phases (README.md describes "
                             "each).", Choice(STRATEGY_NAMES))
    prox_mu: float = _setting(0.01, "FedProx proximal weight mu.", FloatRange(0),
                              strategy_option=("fedprox", "prox_mu"))
    fedavgm_lr: float = _setting(1.0, "FedAvgM server learning rate.", _RATE, strategy_option=("fedavgm", "lr"))
    fedavgm_momentum: float = _setting(0.9, "FedAvgM server momentum.", FloatRange(0, 1),
                                       strategy_option=("fedavgm", "momentum"))
    # Robust strategies (they hold every update of a round)
    trim_fraction: float = _setting(0.2, "Trimmed mean: share of the values dropped at each end, per weight.",
                                    FloatRange(0, 0.5, max_open=True),
                                    strategy_option=("trimmed_mean", "trim_fraction"))
    krum_byzantine: int = _setting(1, "Krum: Byzantine clients tolerated, F (needs more than 2F + 2 clients).",
                                   _COUNT, strategy_option=("krum", "byzantine"))
    krum_select: int = _setting(1, "Krum: best-scored updates averaged, M (1: Krum; more: multi-Krum).",
                                _POSITIVE, strategy_option=("krum", "select"))

    def strategy_settings(self) -> StrategySettings:
        """The chosen strategy with the settings it is built from (none of the other strategies')."""
        options = {}
        for f in fields(self):
            owner = f.metadata.get("strategy_option")
            if owner is not None and owner[0] == self.strategy:
                options[owner[1]] = getattr(self, f.name)
        return StrategySettings(self.strategy, options)


@dataclass(frozen=True)
class GuardSettings:
    """Hostile-client bounds (genfl_server/guard.py); none of them binds on an honest run."""

    max_update_norm: float | None = _setting(
        None, "Reject (or with --clip-updates, clip) an update farther than this from the global model (L2 norm "
        "of w_client - w_global; default: no fixed bound).", _RATE)
    clip_updates: bool = _setting(False, "Beyond --max-update-norm, scale the update's step down to the bound "
                                  "instead of rejecting it.")
    update_norm_factor: float = _setting(
        10.0, "Adaptive bound: redo a round without any update farther than this many times the round's median "
        "distance (from 3 updates; 0: off).", FloatRange(0))
    max_client_samples: int = _setting(60_000, "Most training samples one client may register (0: no limit).",
                                       _COUNT)
    max_client_weight_share: float = _setting(
        0.5, "Largest share of the FedAvg weight one client may hold, from 3 clients on (1: no cap).",
        FloatRange(0, 1, min_open=True))


@dataclass(frozen=True)
class TransportSettings:
    """Resource bounds of the server's transport (genfl_server/flow.py and the gRPC servicer); none binds an honest run."""

    upload_timeout: float = _setting(
        60.0, "Seconds a result upload may take to arrive (not counting waits for the server's receive slots); "
        "a slower one is cut with DEADLINE_EXCEEDED and its task stays open for a retry.", _RATE)
    max_concurrent_uploads: int = _setting(
        2, "Weight uploads received and checked at once (each holds about one model of memory until it is "
        "folded in; the others wait in flow control): more trades server memory for round time with many "
        "clients.", IntRange(1))
    max_streams_per_connection: int = _setting(
        64, "Most RPCs open at once on one client connection (0: no limit).", _COUNT)
    max_streams_per_ip: int = _setting(
        0, "Most RPCs open at once from one IP address, all its connections together (0: no limit; loopback "
        "clients all share 127.0.0.1).", _COUNT)


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of the CVAE phase: DP-SGD on the clients (genfl_shared.dp; README.md,
    "Differential privacy"). Giving a noise multiplier or a target epsilon turns it on."""

    dp_noise_multiplier: float | None = _setting(
        None, "DP-SGD for the CVAE phase with this noise multiplier sigma (Gaussian noise of std sigma * "
        "--dp-max-grad-norm on each step's sum of clipped per-sample gradients).", _RATE)
    dp_target_epsilon: float | None = _setting(
        None, "DP-SGD for the CVAE phase with the noise multiplier calibrated (per client, to its shard size, "
        "--batch-size, --local-epochs and --cvae-rounds) so that each client's final epsilon is at most this.",
        _RATE)
    dp_max_grad_norm: float = _setting(1.0, "DP-SGD: per-sample gradient clipping bound C (L2 norm).", _RATE)
    dp_delta: float = _setting(DEFAULT_DELTA, "DP-SGD: delta of the (epsilon, delta) guarantee (the default is "
                               "below 1/n for every shard of up to 60,000 samples).",
                               FloatRange(0, 1, min_open=True, max_open=True))
    dp_accountant: str = _setting("rdp", "DP-SGD: Opacus privacy accountant, 'rdp' (Renyi DP) or 'prv' (privacy "
                                  "random variables, tighter).", Choice(ACCOUNTANTS))

    @property
    def enabled(self) -> bool:
        """DP-SGD in the CVAE phase (a noise multiplier or a target epsilon was given)."""
        return self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None


@dataclass(frozen=True)
class GeneratorSettings:
    """How the CVAE phase's client models become the generator the server samples its synthetic set
    from (genfl_server/generator.py; docs/method.md, "Generators at extreme skew")."""

    cvae_aggregation: str = _setting(
        "fedavg", "How the clients' CVAEs become the server's generator: 'fedavg' (one averaged CVAE, the "
        "poster's method), 'classwise' (each class's label input averaged over the clients holding it), "
        "'ensemble' (every client keeps its own CVAE; each class is drawn from the clients holding it) or "
        "'distill' (the ensemble distilled into one decoder after every round). All but fedavg need the "
        "clients' label counts (genfl-client --share-label-counts).", Choice(CVAE_AGGREGATIONS))
    class_share_cap: float = _setting(
        1.0, "Largest share of one class's synthetic images one client's CVAE may draw (or weigh in "
        "classwise/distill) when other clients hold that class too (1: no cap; 0.5 bounds what one client's "
        "claimed counts can take of another's class, at a cost in CAS at extreme skew: docs/method.md).",
        FloatRange(0, 1, min_open=True))
    cvae_distill_steps: int = _setting(
        200, "distill: Adam steps per CVAE round that fit the global decoder to the ensemble's decoders.",
        _POSITIVE)


@dataclass(frozen=True)
class PretrainingSettings:
    """The server's synthetic data from the federated CVAE: its size, the CAS classifier trained on
    it, and the synthetic pre-training of the federated classifier."""

    synthetic_samples: int = _setting(60_000, "Class-balanced synthetic images sampled from the CVAE.",
                                      IntRange(10))
    cas_epochs: int = _setting(20, "Epochs of the CAS classifier on synthetic data (0: skip CAS).", _COUNT)
    pretrain_epochs: int = _setting(5, "Epochs of synthetic pre-training.", _COUNT)
    pretrain_lr: float = _setting(1e-3, "Server's Adam learning rate for CAS and pre-training.", _RATE,
                                  deprecated=("--server-lr",))
    pretrain_batch_size: int = _setting(32, "Server's batch size for CAS and pre-training.", _POSITIVE,
                                        deprecated=("--server-batch-size",))
    pretrain: bool = _setting(True, "Pre-train the classifier on synthetic data (--no-pretrain: the baseline, "
                              "seeded random start).")


@dataclass(frozen=True)
class MitigationSettings:
    """The synthetic set used during the classifier rounds (genfl_server/finetune.py, distill.py,
    synthmix.py): each mitigation needs the CVAE."""

    server_finetune_steps: int = _setting(
        0, "After every classifier aggregation, this many class-balanced SGD steps of the aggregate on the "
        "server's synthetic set before it is broadcast (0: off; needs the CVAE: --phase all, or "
        "--cvae-checkpoint).", _COUNT)
    server_finetune_lr: float = _setting(0.01, "Server fine-tuning: SGD learning rate (momentum 0.9).", _RATE)
    server_finetune_batch_size: int = _setting(
        50, "Server fine-tuning: batch size (the same number of images of every class in each batch).", _POSITIVE)
    server_distill: bool = _setting(
        False, "After every classifier aggregation, distil the aggregate on the server's synthetic inputs (labels "
        "unused) towards the mean logits of --server-distill-teacher (FedDF) before it is broadcast (needs the "
        "CVAE, as --server-finetune-steps does; with both, distillation runs first).")
    server_distill_teacher: str = _setting(
        "clients", "Server distillation's teacher: 'clients' (the ensemble of the round's accepted client models, "
        "kept for the round: --clients x the model's size in memory) or 'previous' (the round's starting global "
        "model).", Choice(DISTILL_TEACHERS))
    server_distill_max_teachers: int = _setting(
        32, "Server distillation with teacher 'clients': refuse to start a run of more clients than this (each "
        "kept client model costs the model's size, 3.7 MB for ExquisiteNetV1).", _POSITIVE)
    server_distill_steps: int = _setting(100, "Server distillation: Adam steps per round.", _POSITIVE)
    server_distill_lr: float = _setting(1e-3, "Server distillation: Adam learning rate.", _RATE)
    server_distill_temperature: float = _setting(
        1.0, "Server distillation: softmax temperature of teacher and student (the KL is scaled by T^2).", _RATE)
    server_distill_batch_size: int = _setting(64, "Server distillation: synthetic images per step.", _POSITIVE)
    client_synthetic_mix: float = _setting(
        0.0, "Send each client that reports its label counts synthetic (never real) images of the classes it "
        "lacks, mixed into its local classifier training at this many synthetic per real sample and epoch "
        "(0: off; at most 10; needs the CVAE, as --server-finetune-steps does).", FloatRange(0, 10))

    def federated_synthetic_options(self) -> list[str]:
        """The options in use that need the synthetic set during the classifier rounds (and so the CVAE)."""
        return [flag for flag, used in (("--server-finetune-steps", bool(self.server_finetune_steps)),
                                        ("--server-distill", self.server_distill),
                                        ("--client-synthetic-mix", bool(self.client_synthetic_mix))) if used]


@dataclass(frozen=True)
class ReproducibilitySettings:
    """The seed every random choice derives from, and whether a run is bit-reproducible."""

    seed: int = _setting(0, "Seed of every random choice: partition, model init, client shuffling, synthetic "
                         "data (genfl-sweep: the first of --repeats seeds).", _COUNT)
    deterministic: bool = _setting(False, "Bit-reproducible runs: deterministic kernels and updates summed in "
                                   "client order (holds a round's updates in memory). With fixed seeds, a "
                                   "resumed run ends with the same weights.")


@dataclass(frozen=True)
class PathSettings:
    """The files a server run reads: the real test split, the partition registrations must match,
    and the checkpoints a classifier phase starts from.

    Not a group of ``RunConfig``: a path says where one machine keeps an input, while a config
    (summary.json, the presets, ``to_argv``) describes the run wherever it runs. The server saves
    them with its other settings for --resume (genfl_server.app.ServerSettings)."""

    test_data: Path | None = _setting(None, "Data root holding the real test split (server-side test accuracy and "
                                      "CAS).", ExistingPath(folder=True))
    partition_info: Path | None = _setting(None, "partition.json of the shards, to record dataset/alpha in "
                                           "summary.json.", ExistingPath())
    cvae_checkpoint: Path | None = _setting(None, "Global CVAE for --phase classifier.", ExistingPath())
    pretrained_checkpoint: Path | None = _setting(
        None, "--phase classifier: start from this already pre-trained classifier (skips sampling, CAS and "
        "pre-training; genfl-sweep shares one pre-training between its arms).", ExistingPath())

    def saved(self) -> dict[str, str | None]:
        """Each path as text, by name (as a run state keeps them)."""
        return {f.name: None if getattr(self, f.name) is None else str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_saved(cls, saved: Mapping[str, str | None]) -> "PathSettings":
        """Paths from ``saved()`` output; a path it lacks is not given."""
        return cls(**{f.name: Path(saved[f.name]) for f in fields(cls) if saved.get(f.name) is not None})


@dataclass(frozen=True)
class RunConfig:
    """A run's settings, one group per concern (read as ``cfg.training.local_epochs``); flat names
    (``to_dict``, ``override``, ``to_argv``) reach any setting without knowing its group."""

    data: DataSettings = field(default_factory=DataSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    dp: PrivacySettings = field(default_factory=PrivacySettings)
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)
    pretraining: PretrainingSettings = field(default_factory=PretrainingSettings)
    mitigations: MitigationSettings = field(default_factory=MitigationSettings)
    reproducibility: ReproducibilitySettings = field(default_factory=ReproducibilitySettings)

    def check_dp(self) -> None:
        """ValueError for DP settings that cannot run (the server checks them before it starts)."""
        if self.dp.dp_noise_multiplier is not None and self.dp.dp_target_epsilon is not None:
            raise ValueError("give --dp-noise-multiplier or --dp-target-epsilon, not both")
        if self.dp.enabled and self.aggregation.strategy == "fedprox" and self.aggregation.prox_mu > 0:
            raise ValueError("DP-SGD cannot train with FedProx's proximal term (its gradient is not per sample); "
                             "use another --strategy")

    def check_distill(self) -> None:
        """ValueError for server-distillation settings that cannot run (checked before the server starts)."""
        mitigations = self.mitigations
        if not mitigations.server_distill or mitigations.server_distill_teacher != "clients":
            return
        strategy = self.aggregation.strategy
        if strategy in ROUND_HOLDING_STRATEGIES:
            raise ValueError(f"--server-distill towards the clients' models cannot go with --strategy {strategy}: "
                             "the teacher is the mean of the accepted models, which a robust strategy exists not to "
                             "trust (use --server-distill-teacher previous, or another strategy)")
        if self.data.clients > mitigations.server_distill_max_teachers:
            raise ValueError(f"--server-distill keeps every client's model of a round as a teacher: "
                             f"{self.data.clients} clients exceed --server-distill-max-teachers "
                             f"{mitigations.server_distill_max_teachers} (raise it if the server has the memory, or "
                             "use --server-distill-teacher previous)")

    def setting(self, name: str) -> Any:
        """One setting's value by its flat name (``cfg.setting("local_epochs")``)."""
        return getattr(getattr(self, _group_of(name)), name)

    def override(self, **changes) -> "RunConfig":
        """Apply the options a user set explicitly, by flat name (None means 'not given');
        a name that is not a setting is refused."""
        return self.replace_settings(**{k: v for k, v in changes.items() if v is not None})

    def replace_settings(self, **values) -> "RunConfig":
        """``dataclasses.replace`` by flat name, None included; a name that is not a setting is refused."""
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            by_group.setdefault(_group_of(name), {})[name] = value
        return replace(self, **{group: replace(getattr(self, group), **changes)
                                for group, changes in by_group.items()})

    def to_dict(self) -> dict:
        """Every setting by its flat name, in definition order (summary.json, the run state)."""
        return {name: value for group in fields(self) for name, value in asdict(getattr(self, group.name)).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """A config from ``to_dict()`` output, also as saved before fields were renamed
        (summary.json ``config`` of recorded sweeps, old run_state.pt); settings it lacks keep
        their defaults."""
        values = {}
        for key, value in data.items():
            name = LEGACY_FIELD_NAMES.get(key, key)
            if name not in _FIELDS:
                raise UnknownSettingError(key)
            values[name] = value
        return cls().replace_settings(**values)

    @classmethod
    def field_names(cls) -> set[str]:
        """The flat names of every setting."""
        return set(_FIELDS)

    def to_options(self, names: Iterable[str] | None = None) -> list[tuple[str, ...]]:
        """These settings as command-line options, one tuple per setting (``("--seed", "3")``,
        ``("--no-pretrain",)``); ``names`` picks settings (default: all that a server takes)."""
        chosen = SERVER_FIELDS if names is None else tuple(names)
        # A setting that is None (e.g. no --max-update-norm) has no spelling: leaving it out gives
        # the same None, as only settings whose default is None can be None.
        return [option_tokens(name, self.setting(name)) for name in chosen if self.setting(name) is not None]

    def to_argv(self, names: Iterable[str] | None = None) -> list[str]:
        """``to_options`` flattened, for a child process's argument list."""
        return [token for tokens in self.to_options(names) for token in tokens]


class UnknownSettingError(KeyError, ValueError):
    """A name that is not a run setting (a misspelling, or a setting that does not exist)."""

    def __init__(self, name: str):
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown run setting {name!r}{hint}")
        self.name = name

    def __str__(self) -> str:  # KeyError's would quote the message
        return self.args[0]


def _index_settings() -> tuple[dict[str, str], dict[str, Field]]:
    """flat name -> the group it belongs to, and flat name -> its dataclass field (default, CLI
    metadata), in definition order; a flat name must be unique across the groups."""
    group_of: dict[str, str] = {}
    by_name: dict[str, Field] = {}
    for group in fields(RunConfig):
        for setting in fields(group.default_factory):
            if setting.name in by_name:
                raise RuntimeError(f"run setting {setting.name!r} is defined in two groups")
            group_of[setting.name], by_name[setting.name] = group.name, setting
    return group_of, by_name


_GROUP_OF, _FIELDS = _index_settings()


def _group_of(name: str) -> str:
    try:
        return _GROUP_OF[name]
    except KeyError:
        raise UnknownSettingError(name) from None


def setting_fields() -> dict[str, Field]:
    """Every setting's dataclass field by flat name (its default, and its ``RunOption`` under
    ``metadata["option"]``), in definition order."""
    return dict(_FIELDS)


# Saved files (summary.json configs, run_state.pt) written before the renames use these names.
LEGACY_FIELD_NAMES = {"server_lr": "pretrain_lr", "server_batch_size": "pretrain_batch_size",
                      "classifier_momentum": "sgd_momentum"}

# DP-SGD of the CVAE phase: the settings a tool that starts runs passes on (genfl-launch, genfl-sweep).
DP_FIELDS = tuple(f.name for f in fields(PrivacySettings))
# The CVAE phase's generator: the settings such a tool passes on.
GENERATOR_FIELDS = tuple(f.name for f in fields(GeneratorSettings))

# The paths a server run reads (not settings of RunConfig: see PathSettings).
PATH_FIELDS = tuple(f.name for f in fields(PathSettings))

# The server records the partitioner's train_subset; it does not take one.
SERVER_FIELDS = tuple(name for name in _FIELDS if name != "train_subset")


PRESETS: dict[str, RunConfig] = {
    "paper": RunConfig(),
    # Quick: 1/6 of the training images (1,000 per client), half the CVAE rounds, 5 classifier
    # rounds, a 10,000-image synthetic set and short server-side training; same models, optimisers,
    # batch size, local epochs and learning rates as the paper.
    "quick": RunConfig().override(train_subset=10_000, cvae_rounds=10, classifier_rounds=5,
                                  synthetic_samples=10_000, cas_epochs=2, pretrain_epochs=3),
}

ROUNDS = "rounds"  # not a field: the default of both cvae_rounds and classifier_rounds


def option_flag(name: str) -> str:
    """A setting's ``--option`` (its name, dashes for underscores)."""
    return "--" + name.replace("_", "-")


def is_switch(setting: Field) -> bool:
    """Whether a setting (its dataclass field) is a boolean, spelled ``--x`` / ``--no-x``."""
    return setting.type in (bool, "bool")


def option_tokens(name: str, value: Any) -> tuple[str, ...]:
    """One setting as command-line tokens, spelled as ``genfl_shared.cli_settings.run_options`` parses it."""
    if name not in _FIELDS:
        raise UnknownSettingError(name)
    if is_switch(_FIELDS[name]):
        return (option_flag(name) if value else "--no-" + name.replace("_", "-"),)
    return (option_flag(name), str(value))  # str() of a float round-trips exactly (repr)


def argv_for(**values: Any) -> list[str]:
    """Command-line tokens for the given settings, e.g. ``argv_for(strategy="fedprox", pretrain=False)``."""
    return [token for name, value in values.items() for token in option_tokens(name, value)]


class UnknownPresetError(ValueError):
    """A preset name that is not one of ``PRESETS``."""


def preset_config(preset: str, given: Mapping[str, Any]) -> RunConfig:
    """The preset, overridden by the options given explicitly (None: not given); a name that is
    not a setting is refused (``UnknownSettingError``).

    ``rounds`` is the default of both ``cvae_rounds`` and ``classifier_rounds``; ``train_subset``
    0 means all the training images. The settings are not checked against each other here
    (``check_dp``, ``check_distill``): the caller says how a conflict is reported."""
    if preset not in PRESETS:
        raise UnknownPresetError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    changes = {k: v for k, v in given.items() if k != ROUNDS and v is not None}
    rounds = given.get(ROUNDS)
    if rounds is not None:
        changes.setdefault("cvae_rounds", rounds)
        changes.setdefault("classifier_rounds", rounds)
    if changes.get("train_subset") == 0:
        changes["train_subset"] = None
    return PRESETS[preset].replace_settings(**changes)
