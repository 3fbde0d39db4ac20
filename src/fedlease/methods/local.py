"""Local: every client trains its own LoRA and head alone; nothing is communicated.

The personalisation reference point of the FedLEASE paper's comparison: the FedLEASE ablation "one expert per
client" shares experts through the router, Local shares nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlease.methods.base import FederatedMethod, Instruction, RoundReport, Update
from fedlease.model.experts import ExpertLayout

PARTS = ("lora_A", "lora_B", "head")


class Local(FederatedMethod):
    name = "local"

    def configure_train(self, rnd: int) -> dict[int, Instruction]:
        # round 0 starts from the shared seeded init; afterwards each client continues what it keeps
        return {c.client_id: Instruction(ExpertLayout(), restore=PARTS, train=PARTS, keep=PARTS)
                for c in self.clients}

    def configure_evaluate(self, rnd: int) -> dict[int, Instruction]:
        return {c.client_id: Instruction(ExpertLayout(), restore=PARTS) for c in self.clients}

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        return RoundReport("local", [f"{len(updates)} clients trained alone"])

    def client_map(self) -> dict[int, list[int]]:
        return {c.client_id: [c.client_id] for c in self.clients}

    def server_state(self) -> dict[str, Any]:
        return {}  # the server holds nothing: every client keeps its own model

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        pass
