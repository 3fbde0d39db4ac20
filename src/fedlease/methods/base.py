"""The small interface every federated method implements.

A method is both halves of one algorithm. The server half says, each round, what every client downloads and
trains (``configure_train``), how uploads are combined (``aggregate_train``) and which model each client is
evaluated with (``configure_evaluate``). The client half (``client_train``, ``client_evaluate``) runs on the
process that holds the client's data. Runtimes (the in-process runner, Flower) only move the two message
types below between the halves; no runtime contains algorithm code.

State moves as flat ``name -> tensor`` mappings (see ``fedlease.model.experts``), safetensors-friendly.
"""

from __future__ import annotations

import json
import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedlease.clustering import ClusteringResult
from fedlease.config import RunConfig
from fedlease.model.experts import ExpertLayout, own_expert_from_bank
from fedlease.privacy import (
    LOCAL_NOISE,
    delta,
    expected_contributors,
    expected_fraction,
    noise_multiplier,
    record_level,
)
from fedlease.privacy import record as record_dp
from fedlease.privacy.accounting import Release
from fedlease.privacy.mechanism import NoisyMean, add_noise, clip_change
from fedlease.seeding import derive_seed
from fedlease.train import Encoded, LocalClient

Scalar = int | float | str | bool

LORA_PARTS = ("lora_A", "lora_B")
SECRET = "privacy.secret"  # a client's store: the seed of the noise it adds itself
CHANGE_NORM = "change_norm"  # an update's metric with --max_update_norm: its change's L2 norm, as the client measured
# a late client's metric (FedLEASE): the seconds it took to place itself (its data signature: one inference pass)
PLACEMENT_SECONDS = "placement_seconds"
# training metrics that tell how much data a client holds
SIZE_METRICS = ("examples", "steps", "seconds", PLACEMENT_SECONDS)
PART_SUFFIXES = {"lora_A": (".lora_A",), "lora_B": (".lora_B",), "router": (".router",),
                 "experts": (".experts_A", ".experts_B")}


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of a client: never its data."""

    client_id: int
    task: str
    labels: tuple[str, ...]


@dataclass
class Instruction:
    """Server -> client for one round.

    The client arranges the model as ``layout`` and loads, in this order: the seeded initial LoRA and head
    (so nothing of another client's state can survive in the shared model), the ``restore`` parts of its own
    store (state that never leaves the client), and the downloaded ``state`` (a bank sent without the own
    expert's ``lora_A``/``lora_B`` supplies them from its own slot). It trains ``train``, saves ``keep`` to its
    store and uploads ``upload``.
    """

    layout: ExpertLayout
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    train: tuple[str, ...] = ()
    upload: tuple[str, ...] = ()
    restore: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    extra: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class Update:
    """Client -> server: the uploaded state, how many examples it was trained on, and training metrics."""

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundReport:
    """What the server half did with a round's uploads, for the log and the artifacts."""

    phase: str
    log: list[str] = field(default_factory=list)
    clustering: ClusteringResult | None = None


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                   keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of ``keys`` (default: all keys of the first state) over ``states``."""
    total = float(sum(weights))
    keys = list(states[0]) if keys is None else list(keys)
    return {key: sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
            .to(states[0][key].dtype) for key in keys}


def average_groups(states: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
                   group_of: Callable[[int], Hashable], parts: Iterable[str]
                   ) -> dict[Hashable, dict[str, torch.Tensor]]:
    """Average ``parts`` of the clients' ``states`` within groups: group -> its average, for every group with a
    client in ``states``. The server keeps one copy per group, which every member downloads next (a client that
    missed the round too, as FedAvg sends the current model to every client)."""
    groups: dict[Hashable, list[int]] = {}
    for cid in states:
        groups.setdefault(group_of(cid), []).append(cid)
    return {group: average_states([select(states[c], parts) for c in members], [weights[c] for c in members])
            for group, members in groups.items()}


def client_secret(store: dict[str, torch.Tensor]) -> int:
    """A seed only this client knows, drawn once and kept in its store: the noise of its own releases."""
    if SECRET not in store:
        store[SECRET] = torch.tensor(secrets.randbits(62), dtype=torch.int64)
    return int(store[SECRET])


def label_set_key(labels: Sequence[str], cluster: int | None = None) -> str:
    """The server's key of a head shared by the clients of one label set (and one cluster): a string, so that
    checkpoints keep it as JSON."""
    key = json.dumps(list(labels))
    return key if cluster is None else f"{cluster}/{key}"


def select(state: Mapping[str, torch.Tensor], parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that belong to ``parts`` (names end in ``.lora_A``, start with ``head.``, ...)."""
    parts = tuple(parts)
    suffixes = tuple(suffix for part in parts for suffix in PART_SUFFIXES.get(part, ()))
    return {k: v for k, v in state.items() if k.endswith(suffixes) or ("head" in parts and k.startswith("head."))}


class FederatedMethod(ABC):
    """Base of all methods: holds the run configuration and the clients, and the generic client half."""

    name: ClassVar[str]
    # local training calls a client makes in a round at most (record-level DP plans each client's steps with it)
    local_calls: ClassVar[int] = 1

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        self.config = config
        self.clients = list(clients)
        # differential privacy (--dp_clip), set by the runtime: the server's noised mean, and the seeded initial
        # state (seed -> LoRA and head) that is the reference of an aggregate no client downloaded yet
        self.noisy: NoisyMean | None = None
        self.initial: Callable[[int], dict[str, torch.Tensor]] | None = None
        self.initial_cache: dict[int, dict[str, torch.Tensor]] = {}
        self.reference: dict[str, torch.Tensor] = {}  # client half: the public state the last load started from

    # -- differential privacy -------------------------------------------------------------------------------
    @classmethod
    def privacy_plan(cls, config: RunConfig) -> list[Release]:
        """What the method releases under DP, round by round: by default one aggregate release per round."""
        from fedlease.privacy import accounting_rate

        return [Release("round", rnd, accounting_rate(config)) for rnd in range(config.global_rounds)]

    @classmethod
    def record_releases(cls, config: RunConfig) -> int:
        """Under record-level DP: how many times a client releases something computed from all its data at once
        (outside DP-SGD), each charged as a Gaussian mechanism at its noise multiplier. None by default."""
        return 0

    def initial_parts(self, parts: Iterable[str], seed: int | None = None) -> dict[str, torch.Tensor]:
        """``parts`` of the seeded initial state (the server's reference for an aggregate not yet formed)."""
        seed = self.config.seed if seed is None else seed
        if seed not in self.initial_cache:
            assert self.initial is not None, "a DP run's server needs the seeded initial state"
            self.initial_cache[seed] = self.initial(seed)
        return select(self.initial_cache[seed], parts)

    def mean(self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
             reference: Callable[[], Mapping[str, torch.Tensor]], members: Iterable[int], name: str,
             share: float = 1.0, size: float | None = None) -> dict[str, torch.Tensor]:
        """The aggregate of ``states``: their example-weighted mean, or under DP the noised mean change against
        ``reference()`` (what the clients started from), divided by the contributors expected among
        ``members`` (the group's clients; ``share`` of them where membership is chosen each round). ``size``:
        instead of ``members``, the group's trainable clients in expectation, where clients still to join it
        count by their chance of joining (FedLEASE's experts in an open federation)."""
        if self.noisy is None:
            return average_states(states, weights)
        expected = expected_contributors(self.config, members) if size is None else \
            expected_fraction(self.config) * size
        return self.noisy.mean(states, reference(), share * expected, name)

    def mean_groups(self, states: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
                    group_of: Callable[[int], Hashable], parts: Iterable[str],
                    reference_of: Callable[[Hashable], Mapping[str, torch.Tensor]],
                    members_of: Callable[[Hashable], Iterable[int]], share: float = 1.0,
                    size_of: Callable[[Hashable], float] | None = None
                    ) -> dict[Hashable, dict[str, torch.Tensor]]:
        """``average_groups``, or under DP each group's noised mean (``mean``; ``size_of``: its ``size``)."""
        if self.noisy is None:
            return average_groups(states, weights, group_of, parts)
        groups: dict[Hashable, list[int]] = {}
        for cid in states:
            groups.setdefault(group_of(cid), []).append(cid)
        return {group: self.mean([select(states[c], parts) for c in cids], [], lambda g=group: reference_of(g),
                                 members_of(group), f"group {group}", share,
                                 None if size_of is None else size_of(group))
                for group, cids in groups.items()}

    # -- server half --------------------------------------------------------------------------------------
    # ``cohort``: the clients the runtime sampled for the round (None: every client). A method never samples; it
    # must only be correct when a client is absent, for one round or for all of them so far.
    def ids(self, cohort: Iterable[int] | None) -> list[int]:
        return [c.client_id for c in self.clients] if cohort is None else sorted(cohort)

    @abstractmethod
    def configure_train(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        """What each client of ``cohort`` downloads and trains in round ``rnd`` (0-based)."""

    @abstractmethod
    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        """Combine the uploads of round ``rnd``; clients missing from ``updates`` were not sampled or did not
        reply, and their state on the server stays as it was."""

    @abstractmethod
    def configure_evaluate(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        """The model each client of ``cohort`` is evaluated with after round ``rnd``: what it would download
        next."""

    def configure_newcomers(self, rnd: int, cohort: Iterable[int]) -> dict[int, Instruction]:
        """What each client of ``cohort``, which never trained (``--unseen_clients``), is evaluated with after the
        last round ``rnd``: what the method gives a newcomer. Default: what any client without state of its own
        would download; a method that places clients overrides it."""
        return self.configure_evaluate(rnd, cohort)

    @abstractmethod
    def client_map(self) -> dict[int, list[int]]:
        """Which clients share each adapter now: adapter id -> client ids (lora_client_map_round_X.json)."""

    @abstractmethod
    def server_state(self) -> dict[str, Any]:
        """Everything the server half holds between rounds, as nested dicts/lists of tensors and JSON values
        (what a checkpoint saves)."""

    @abstractmethod
    def load_server_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``server_state`` returned."""

    # -- secure aggregation (Flower's SecAgg+: one sum over the round's clients) ----------------------------
    def secure_slots(self, rnd: int, instructions: Mapping[int, Instruction]
                     ) -> dict[int, dict[str, tuple[str, ...]]] | str:
        """Where this round's aggregation is nothing but example-weighted means of the uploads over known groups of
        clients: for each client, the sums its upload enters (slot name -> the parts of its upload summed there;
        the slots must cover its whole upload). Else why not, in one line: the round then trains in the clear."""
        return f"{self.name}'s server needs each client's own upload"

    # -- client half --------------------------------------------------------------------------------------
    # ``store`` is the client's own persistent state (a name -> tensor mapping the runtime keeps for it across
    # rounds: a dict in process, the node's state under Flower). It never travels to the server.
    def load(self, client: LocalClient, ins: Instruction, store: Mapping[str, torch.Tensor]) -> None:
        client.adapted.configure(ins.layout)
        state = client.adapted.initial_state(self.config.seed)
        own = own_expert_from_bank(ins.state, ins.layout)
        self.reference = {**state, **ins.state, **own}  # all but the client's own kept state: public
        state.update(select(store, ins.restore))
        state.update(ins.state)
        state.update(own)
        client.apply(ins.layout, state)

    def client_update(self, client: LocalClient, ins: Instruction, rnd: int,
                      store: dict[str, torch.Tensor]) -> Update:
        """``client_train``; with --max_update_norm, the L2 norm of the upload's change against what the client
        started from, reported as the ``change_norm`` metric for the server's check (--update_norm_action reject)
        or, with clip, measured before the change is scaled down to the bound; under DP, the change clipped to
        --dp_clip (and noised here where the instruction makes the upload a release of this client alone)."""
        if record_level(self.config):
            return self.record_update(client, ins, rnd, store)
        update = self.client_train(client, ins, rnd, store)
        if self.config.max_update_norm is not None:
            clip = self.config.max_update_norm if self.config.update_norm_action == "clip" else math.inf
            update.state, update.metrics[CHANGE_NORM] = clip_change(update.state, self.reference, clip)
        if self.config.dp_clip is None:
            return update
        update.state, _ = clip_change(update.state, self.reference, self.config.dp_clip)
        if ins.extra.get(LOCAL_NOISE):
            std = noise_multiplier(self.config, self.privacy_plan(self.config)) * self.config.dp_clip
            update.state = add_noise(update.state, [k for k in update.state if k in self.reference], std,
                                     derive_seed(client_secret(store), "dp-upload", rnd))
        # equal weights: the server needs no example count, so none leaves the client, nor what implies one
        update.num_examples = 1
        update.metrics = {k: v for k, v in update.metrics.items() if k not in SIZE_METRICS}
        return update

    def record_update(self, client: LocalClient, ins: Instruction, rnd: int,
                      store: dict[str, torch.Tensor]) -> Update:
        """``client_train`` under record-level DP: every local training call of the round is DP-SGD (the client's
        noise multiplier and steps so far come from its store and go back to it), and the update reports the
        client's noise, rate, steps and the epsilon it has spent. What it uploads is DP-SGD's output, sent as it
        is: the server adds no noise."""
        dp = record_dp.session(self.config, store, client.num_train, client_secret(store), self.local_calls,
                               self.record_releases(self.config))
        client.record = dp
        try:
            update = self.client_train(client, ins, rnd, store)
        finally:
            client.record = None
        record_dp.save(dp, store)
        update.metrics.update(dp.report(delta(self.config)))
        return update

    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        self.load(client, ins, store)
        metrics = client.fit(ins.train, seed=derive_seed(self.config.seed, "train", rnd, client.client_id))
        store.update(client.state(ins.keep))
        return Update(client.state(ins.upload), client.num_train, metrics)

    def client_evaluate(self, client: LocalClient, ins: Instruction, rnd: int,
                        store: dict[str, torch.Tensor]) -> dict[str, float]:
        self.load(client, ins, store)
        return client.evaluate()

    # -- using the trained client (fedlease.use) ----------------------------------------------------------
    reads_train_data = False  # whether using a trained client needs its training split (FedDPA's references)

    def apply_final(self, client: LocalClient, layout: ExpertLayout, state: Mapping[str, torch.Tensor],
                    data: Encoded) -> torch.Tensor | None:
        """Make ``client`` the model a run saved for it (``layout`` and ``state``: what it was last evaluated with)
        for the rows of ``data``; return their per-example expert weights where its evaluation set them ("fixed"
        routing), else None."""
        client.apply(layout, state)
        return None
