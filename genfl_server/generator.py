"""How the CVAE phase's client models become the generator the server samples (``--cvae-aggregation``).

At extreme label skew a client holds one or two classes, so its CVAE's label input is constant and
its decoder learns to draw its own classes whatever label it is given; FedAvg of such decoders
blurs the classes together. The modes other than ``fedavg`` give each class to the clients that
hold it, by the label counts they share (genfl-client --share-label-counts):

- ``fedavg``: one averaged CVAE (the poster's method).
- ``classwise``: FedAvg, except that each class's label-input column of the decoder's first layer
  is the mean over the clients holding that class, weighted by their shares (``ClasswiseConditioning``).
- ``ensemble``: every client's CVAE stays its own through the phase (each round starts from the
  client's previous model, ``OwnModels``); each class's synthetic images come from the clients that
  hold it, in proportion to their shares (genfl_shared.ensemble).
- ``distill`` (FedCVAE-KD): after every round the clients' decoders, each asked only for its own
  classes, are distilled into the global decoder (``DistilledDecoder``), which the next round
  starts from and which samples the synthetic set.

Shares (``ClassShares``): a client's share of class c is its count of c over the holders' total,
counting only holders of at least MIN_CLASS_IMAGES images when any client holds that many; no
client takes more than ``--class-share-cap`` of a class that others hold too. A client that shares
no label counts draws no class (its model is trained, checked by the guard and averaged where the
mode averages, never sampled); a run in which no client shares them is refused. A class no client
holds is drawn from every member equally, with a warning: no client has taught any decoder that
label.

Every client model passes the round's update guard before it is kept, weighed or distilled: these
steps see only the round's accepted updates (engine.RoundModels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from genfl_shared.ensemble import CVAEEnsemble
from genfl_shared.models import model_from_state
from genfl_shared.seeding import derive_seed
from genfl_shared.tasks import EvaluateTask, TrainTask

from .engine import RoundModels
from .guard import aggregate_problem
from .strategy import Instruction, Strategy

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
NUM_CLASSES = 10
LABEL_INPUT = "decoder.0.weight"  # [256, latent + classes]: column latent + c conditions on class c
# A client holding fewer images of a class than this does not draw it when another holds more.
MIN_CLASS_IMAGES = 5
CLIENT_ID = "__client_id__"  # OwnModels.state_dict's entry holding a client's id


class NoLabelCountsError(ValueError):
    """A mode that needs the clients' label counts, in a run where no client shares them."""


class NoMembersError(RuntimeError):
    """An ensemble without a single model of a client that shares its label counts."""


def capped_shares(counts: torch.Tensor, cap: float) -> torch.Tensor:
    """Shares proportional to ``counts`` (float64 [K], >= 0), none above ``cap`` while at least
    two holders can take the excess (water-filling: the excess goes to the others by their counts)."""
    shares = torch.zeros_like(counts, dtype=torch.float64)
    holders = counts > 0
    if not holders.any():
        return shares
    shares[holders] = counts[holders] / counts[holders].sum()
    held = int(holders.sum())
    if held == 1 or cap >= 1:
        return shares
    cap = max(cap, 1.0 / held)  # k holders cannot all stay below 1/k
    fixed = torch.zeros_like(holders)
    while True:
        over = (shares > cap + 1e-12) & ~fixed
        if not over.any():
            return shares
        fixed |= over
        shares[fixed] = cap
        free = holders & ~fixed
        shares[free] = (1 - cap * int(fixed.sum())) * counts[free] / counts[free].sum()


@dataclass(frozen=True)
class ClassShares:
    """Which clients draw (or weigh in) each class, and how much: ``weights[k, c]`` for
    ``clients[k]``; each held class's column sums to 1, an unheld class's is 0."""

    clients: tuple[str, ...]
    weights: torch.Tensor  # float64 [clients, classes]

    @classmethod
    def from_counts(cls, counts: Mapping[str, Sequence[int] | None], cap: float) -> "ClassShares":
        clients = tuple(sorted(cid for cid, held in counts.items() if held is not None))  # the others draw nothing
        table = torch.zeros((len(clients), NUM_CLASSES), dtype=torch.float64)
        for row, client_id in enumerate(clients):
            table[row] = torch.tensor([float(n) for n in counts[client_id]], dtype=torch.float64)
        weights = torch.zeros_like(table)
        for c in range(NUM_CLASSES):
            column = table[:, c].clone()
            if (column >= MIN_CLASS_IMAGES).any():
                column[column < MIN_CLASS_IMAGES] = 0
            weights[:, c] = capped_shares(column, cap)
        return cls(clients, weights)

    @property
    def unheld(self) -> list[int]:
        return [c for c in range(NUM_CLASSES) if not self.weights[:, c].any()]

    def restricted(self, client_ids) -> "ClassShares":
        """The rows of ``client_ids`` (those among ``clients``), each class renormalised over them
        (a class none of them holds: 0): the round's accepted clients, or those with a model. The
        cap was applied over all holders: when some of a class's holders are missing, the others'
        shares grow, possibly past it."""
        rows = [self.clients.index(cid) for cid in sorted(client_ids) if cid in self.clients]
        weights = self.weights[rows].clone()
        totals = weights.sum(0)
        weights[:, totals > 0] /= totals[totals > 0]
        return ClassShares(tuple(self.clients[r] for r in rows), weights)


def class_shares(clients, cap: float, mode: str) -> ClassShares:
    """The registered clients' shares; NoLabelCountsError when none of them shares its counts."""
    counts = {c.client_id: c.label_counts for c in clients}
    silent = sorted(cid for cid, n in counts.items() if n is None)
    if len(silent) == len(counts):
        raise NoLabelCountsError(f"--cvae-aggregation {mode} gives each class to the clients that hold it, but no "
                                 "client shares its label counts (run the clients with --share-label-counts)")
    if silent:
        log.warning("--cvae-aggregation %s: clients %s share no label counts: they draw no class",
                    mode, ", ".join(silent))
    shares = ClassShares.from_counts(counts, cap)
    if shares.unheld:
        log.warning("--cvae-aggregation %s: no client reports holding classes %s", mode, shares.unheld)
    return shares


# -- ensemble ------------------------------------------------------------------------------------------
class OwnModels(Strategy):
    """A strategy whose clients each start from their own previous model (``models``, client_id ->
    state; the shared model for a client without one). The round's aggregate is still ``inner``'s:
    it is what a client without a model of its own starts from. ``state_dict`` carries the models,
    so that a resumed phase continues from them."""

    def __init__(self, inner: Strategy, models: dict[str, State]):
        self.inner = inner
        self.models = models
        self.name, self.label, self.client_config = inner.name, inner.label, inner.client_config

    def configure_train(self, rnd: int, model, tasks: Mapping[str, TrainTask]) -> dict[str, Instruction]:
        return {cid: Instruction(instruction.task, self.models.get(cid, model))
                for cid, instruction in self.inner.configure_train(rnd, model, tasks).items()}

    def configure_evaluate(self, rnd: int, model, tasks: Mapping[str, EvaluateTask]) -> dict[str, Instruction]:
        return {cid: Instruction(task, self.models.get(cid, model)) for cid, task in tasks.items()}

    def begin(self, global_state) -> None:
        self.inner.begin(global_state)

    def accumulate(self, update, num_samples: float) -> None:
        self.inner.accumulate(update, num_samples)

    def finish(self) -> State:
        return self.inner.finish()

    def state_dict(self) -> State:
        # Client ids may hold any printable character, dots included: entries are numbered, each
        # client's id stored as its UTF-8 bytes.
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        for index, cid in enumerate(sorted(self.models)):
            state[f"client{index}.{CLIENT_ID}"] = torch.tensor(list(cid.encode()), dtype=torch.uint8)
            state.update({f"client{index}.{name}": tensor for name, tensor in self.models[cid].items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("inner.")})
        numbered: dict[str, State] = {}
        for key, tensor in state.items():
            if key.startswith("client"):
                index, _, name = key.partition(".")
                numbered.setdefault(index, {})[name] = tensor
        self.models.clear()
        for entries in numbered.values():
            cid = bytes(entries.pop(CLIENT_ID).tolist()).decode()
            self.models[cid] = entries


@dataclass
class KeepClientModels:
    """The ensemble's post-aggregation step: each accepted update becomes its client's model (a
    refused or clipped one, or one whose values are not finite and sane, leaves the client's
    previous model in place); the aggregate passes on. The record names the kept clients and the
    classes whose holders have no model (drawn from every member until they have one)."""

    models: dict[str, State]
    shares: ClassShares
    keeps_updates: bool = True

    def __call__(self, rnd: int, aggregate: State, round_models: RoundModels) -> tuple[State, dict]:
        kept, refused = [], {}
        for cid, update in round_models.accepted.items():
            model = {name: update[name].clone() for name in update}
            problem = aggregate_problem(model)
            if problem is not None:  # with fewer than 3 updates no adaptive bound holds one alone
                refused[cid] = problem
                log.error("round %d: client %s's CVAE is not kept (%s)", rnd, cid, problem)
                continue
            self.models[cid] = model
            kept.append(cid)
        info = {"kind": "ensemble", "kept": sorted(kept),
                "members": len([cid for cid in self.models if cid in self.shares.clients]),
                "classes_without_member": orphan_classes(self.models, self.shares)}
        if refused:
            info["refused"] = refused
        return aggregate, info


def orphan_classes(models: Mapping[str, State], shares: ClassShares) -> list[int]:
    """Classes some client reports holding but none of whose holders has a model."""
    kept = shares.restricted([cid for cid in models if cid in shares.clients])
    return [c for c in range(NUM_CLASSES) if c not in shares.unheld and not kept.weights[:, c].any()]


def ensemble_of(models: Mapping[str, State], shares: ClassShares) -> CVAEEnsemble:
    """The generator of the clients' kept models: each class drawn by the shares of the clients
    that have a model. A class without one (nobody reports it, or its holders never returned a
    model) is drawn from every member equally, with a warning: no member has learnt that label."""
    members = sorted(cid for cid in models if cid in shares.clients)
    if not members:
        raise NoMembersError("no client that shares its label counts has returned a CVAE: nothing to sample from")
    kept = shares.restricted(members)
    weights = kept.weights.clone()
    orphans = [c for c in range(NUM_CLASSES) if not weights[:, c].any()]
    if orphans:
        log.warning("classes %s have no member that holds them: drawn from every member equally", orphans)
    for c in orphans:
        weights[:, c] = 1.0 / len(members)
    return CVAEEnsemble([models[cid] for cid in members], weights)


# -- classwise -----------------------------------------------------------------------------------------
@dataclass
class ClasswiseConditioning:
    """The classwise post-aggregation step: each class's label-input column of the decoder is the
    share-weighted mean of the accepted updates of the clients holding that class (a class none of
    them holds keeps the FedAvg column)."""

    shares: ClassShares
    keeps_updates: bool = True

    def __call__(self, rnd: int, aggregate: State, round_models: RoundModels) -> tuple[State, dict]:
        kept = self.shares.restricted(round_models.accepted)
        weight = aggregate[LABEL_INPUT].clone()
        latent = weight.shape[1] - NUM_CLASSES
        classes = []
        for c in range(NUM_CLASSES):
            if not kept.weights[:, c].any():
                continue
            column = torch.zeros(weight.shape[0], dtype=torch.float64)
            for row, cid in enumerate(kept.clients):
                if kept.weights[row, c] > 0:
                    column += kept.weights[row, c] * round_models.accepted[cid][LABEL_INPUT][:, latent + c].double()
            weight[:, latent + c] = column.to(weight.dtype)
            classes.append(c)
        return {**aggregate, LABEL_INPUT: weight}, {"kind": "classwise", "classes": classes}


# -- distill -------------------------------------------------------------------------------------------
@dataclass
class DistilledDecoder:
    """The distill post-aggregation step: the aggregate's decoder fitted, by Adam, to the accepted
    clients' decoders, each asked only for its classes (by the shares) on the same latents; the
    encoder stays the aggregate's. Costs ``steps`` decoder steps of ``batch_size`` on the server."""

    shares: ClassShares
    steps: int
    seed: int
    device: torch.device
    batch_size: int = 256
    lr: float = 1e-3
    keeps_updates: bool = True

    def __call__(self, rnd: int, aggregate: State, round_models: RoundModels) -> tuple[State, dict]:
        members = sorted(cid for cid in round_models.accepted if cid in self.shares.clients)
        if not members:
            return aggregate, {"kind": "distill", "teachers": 0}
        # Only the classes whose holders trained this round: a label no teacher has learnt would be
        # fitted to a decoder that draws its own classes for it, undoing earlier rounds.
        classes = [c for c in range(NUM_CLASSES) if self.shares.restricted(members).weights[:, c].any()]
        if not classes:
            return aggregate, {"kind": "distill", "teachers": len(members), "classes": []}
        teachers = ensemble_of({cid: round_models.accepted[cid] for cid in members}, self.shares)
        decoders = [model_from_state("cvae", {k: m[k] for k in m}, self.device).eval() for m in teachers.members]
        allowed = torch.tensor(classes)
        student = model_from_state("cvae", aggregate, self.device)
        optimizer = torch.optim.Adam(student.decoder.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "distill-cvae", rnd))
        first = last = None
        for _ in range(self.steps):
            labels = allowed[torch.randint(0, len(classes), (self.batch_size,), generator=generator)].sort().values
            z = torch.randn((self.batch_size, student.latent_dim), generator=generator)
            owner = teachers.owners(labels)
            target = torch.empty((self.batch_size, 1, 28, 28))
            with torch.no_grad():
                for index, decoder in enumerate(decoders):
                    chosen = (owner == index).nonzero().flatten()
                    if len(chosen):
                        target[chosen] = decoder.decode(z[chosen].to(self.device),
                                                        labels[chosen].to(self.device)).cpu()
            output = student.decode(z.to(self.device), labels.to(self.device))
            loss = F.mse_loss(output, target.to(self.device), reduction="sum") / self.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            last = loss.item()
        distilled = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        return distilled, {"kind": "distill", "teachers": len(members), "classes": classes, "first_loss": first,
                           "last_loss": last}


# -- the phase's plan ----------------------------------------------------------------------------------
@dataclass
class CVAEAggregation:
    """What a --cvae-aggregation mode changes in the CVAE phase: the strategy the rounds run, the
    step after each aggregate, and what the phase's generator is."""

    mode: str
    strategy: Strategy
    post_aggregation: object | None = None  # an engine.PostAggregation
    shares: ClassShares | None = None
    models: dict[str, State] | None = None  # ensemble: each client's own model

    @classmethod
    def build(cls, settings, strategy: Strategy, clients, *, seed: int, device: torch.device) -> "CVAEAggregation":
        """The plan of ``settings`` (genfl_shared.config.GeneratorSettings) over the registered
        ``clients``; NoLabelCountsError when the mode needs label counts that no client shares."""
        mode = settings.cvae_aggregation
        if mode == "fedavg":
            return cls(mode, strategy)
        shares = class_shares(clients, settings.class_share_cap, mode)
        if mode == "classwise":
            return cls(mode, strategy, ClasswiseConditioning(shares), shares)
        if mode == "distill":
            return cls(mode, strategy, DistilledDecoder(shares, settings.cvae_distill_steps, seed, device), shares)
        if mode == "ensemble":
            models: dict[str, State] = {}
            return cls(mode, OwnModels(strategy, models), KeepClientModels(models, shares), shares, models)
        raise ValueError(f"unknown --cvae-aggregation {mode!r}")

    def ensemble(self) -> CVAEEnsemble | None:
        """The ensemble the clients' kept models make (None for the single-CVAE modes)."""
        return None if self.models is None else ensemble_of(self.models, self.shares)

    def generator(self, model: State) -> State:
        """The phase's generator from its last global ``model``: that model, or the ensemble's state."""
        ensemble = self.ensemble()
        return dict(model) if ensemble is None else ensemble.to_state()
