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
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedlease.clustering import ClusteringResult
from fedlease.config import RunConfig
from fedlease.model.experts import ExpertLayout, own_expert_from_bank
from fedlease.seeding import derive_seed
from fedlease.train import LocalClient

Scalar = int | float | str | bool

LORA_PARTS = ("lora_A", "lora_B")
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

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        self.config = config
        self.clients = list(clients)

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

    # -- client half --------------------------------------------------------------------------------------
    # ``store`` is the client's own persistent state (a name -> tensor mapping the runtime keeps for it across
    # rounds: a dict in process, the node's state under Flower). It never travels to the server.
    def load(self, client: LocalClient, ins: Instruction, store: Mapping[str, torch.Tensor]) -> None:
        client.adapted.configure(ins.layout)
        state = client.adapted.initial_state(self.config.seed)
        state.update(select(store, ins.restore))
        state.update(ins.state)
        state.update(own_expert_from_bank(ins.state, ins.layout))
        client.apply(ins.layout, state)

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
