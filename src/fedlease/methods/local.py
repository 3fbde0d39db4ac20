"""Local: every client trains its own LoRA and head alone; nothing is communicated.

The personalisation reference point of the FedLEASE paper's comparison: the FedLEASE ablation "one expert per
client" shares experts through the router, Local shares nothing. A client keeps its model across the rounds it
is not sampled; a newcomer that never trains has only the seeded initial model (B = 0 and an untrained head),
which is all local training can give it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedlease.methods.base import FederatedMethod, Instruction, RoundReport, Update
from fedlease.model.experts import ExpertLayout

PARTS = ("lora_A", "lora_B", "head")


class Local(FederatedMethod):
    name = "local"

    def configure_train(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        # a client's first round starts from the shared seeded init; afterwards it continues what it keeps
        return {cid: Instruction(ExpertLayout(), restore=PARTS, train=PARTS, keep=PARTS) for cid in self.ids(cohort)}

    def configure_evaluate(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        return {cid: Instruction(ExpertLayout(), restore=PARTS) for cid in self.ids(cohort)}

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        return RoundReport("local", [f"{len(updates)} clients trained alone"])

    def client_map(self) -> dict[int, list[int]]:
        return {c.client_id: [c.client_id] for c in self.clients}

    def server_state(self) -> dict[str, Any]:
        return {}  # the server holds nothing: every client keeps its own model

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        pass
