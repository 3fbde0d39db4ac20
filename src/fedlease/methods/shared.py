"""The server half shared by the methods that average one adapter over all clients.

FedIT averages A and B, FFA-LoRA only B, FedSA-LoRA only A (B stays on each client), FedDPA its global
adapter. Each keeps the example-weighted mean of its shared parts over the clients that were sampled and replied,
and one head per label set (a head is shared by the clients whose label sets match, including those that missed
the round). A client that was absent downloads the current adapter and its label set's head when it is next
sampled; its personal parts (FedSA-LoRA's B, FedDPA's local adapter) wait in its own store. A newcomer gets the
adapter and its label set's head, with personal parts at their initialisation (B = 0 for FedSA-LoRA, so the
shared A has no effect there; FedDPA without a local adapter evaluates the global one alone).
A method module only says which parts are shared, trained, uploaded and kept by the client; FedDPA adds its own
client half.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedlease.config import RunConfig
from fedlease.methods.base import (
    ClientInfo,
    FederatedMethod,
    Instruction,
    RoundReport,
    Update,
    label_set_key,
    select,
)
from fedlease.model.experts import ExpertLayout


class SharedAdapterMethod(FederatedMethod):
    shared: ClassVar[tuple[str, ...]]  # LoRA parts averaged over all clients
    trained: ClassVar[tuple[str, ...]]  # parts each client trains
    uploaded: ClassVar[tuple[str, ...]]  # parts each client sends back
    personal: ClassVar[tuple[str, ...]] = ()  # parts that stay on the client

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.state: dict[str, torch.Tensor] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # label_set_key -> head

    def head_key(self, cid: int) -> str:
        return label_set_key(self.clients[cid].labels)

    def download(self, cid: int) -> dict[str, torch.Tensor]:
        # Round 0 downloads nothing: every client starts from the shared seeded init.
        return {**self.state, **self.heads.get(self.head_key(cid), {})}

    def configure_train(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        return {cid: Instruction(ExpertLayout(), self.download(cid), train=self.trained, upload=self.uploaded,
                                 restore=self.personal, keep=self.personal) for cid in self.ids(cohort)}

    def configure_evaluate(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        return {cid: Instruction(ExpertLayout(), self.download(cid), restore=self.personal)
                for cid in self.ids(cohort)}

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        if not updates:
            return RoundReport("federated", ["no client replied; the shared adapter is unchanged"])
        states = {cid: u.state for cid, u in updates.items()}
        weights = {cid: float(u.num_examples) for cid, u in updates.items()}
        everyone = [c.client_id for c in self.clients]
        self.state = self.mean([select(s, self.shared) for s in states.values()], list(weights.values()),
                               lambda: self.state or self.initial_parts(self.shared), everyone, "shared")
        self.heads.update(self.mean_groups(
            states, weights, self.head_key, ("head",),
            lambda key: self.heads.get(key) or self.initial_parts(("head",)),
            lambda key: [cid for cid in everyone if self.head_key(cid) == key]))
        return RoundReport("federated", [f"FedAvg of {'/'.join(self.shared)} over {len(updates)} clients; "
                                         f"heads per label set"])

    def secure_slots(self, rnd: int, instructions: Mapping[int, Instruction]
                     ) -> dict[int, dict[str, tuple[str, ...]]] | str:
        """The shared parts over all of the round's clients; each head over its label set's."""
        return {cid: {"shared": self.shared, f"head {self.head_key(cid)}": ("head",)} for cid in instructions}

    def client_map(self) -> dict[int, list[int]]:
        return {0: [c.client_id for c in self.clients]}

    def server_state(self) -> dict[str, Any]:
        return {"state": self.state, "heads": self.heads}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state["state"])
        # a checkpoint from before heads were kept per label set holds one per client (equal within a label set)
        self.heads = {key if isinstance(key, str) and not key.isdigit()
                      else label_set_key(self.clients[int(key)].labels): head for key, head in state["heads"].items()}
