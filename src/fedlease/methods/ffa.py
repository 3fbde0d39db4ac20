"""FFA-LoRA: A frozen at its shared random initialisation; only B is trained and averaged.

Sun, Qin, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024 (arXiv 2403.12313).
Freezing A makes the average of the clients' updates B_i A the exact update of the average B: FedAvg of the
product stays exact. A is never sent: every client regenerates it from the run seed (the seeded initial state
every client loads first).
"""

from __future__ import annotations

from fedlease.methods.shared import SharedAdapterMethod


class FFALoRA(SharedAdapterMethod):
    name = "ffa_lora"
    shared = ("lora_B",)
    trained = uploaded = ("lora_B", "head")
