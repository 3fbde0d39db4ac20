"""FedSA-LoRA: A is shared (averaged over all clients), B is personal (kept by each client).

Guo, Wu, Chen, Wang, Lin, Ding, Yang, Chen, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025 (arXiv 2410.01463): A learns general knowledge and B client-specific knowledge, so only
A is uploaded and averaged; B never leaves the client.
"""

from __future__ import annotations

from fedlease.methods.shared import SharedAdapterMethod


class FedSALoRA(SharedAdapterMethod):
    name = "fedsa_lora"
    shared = ("lora_A",)
    trained = ("lora_A", "lora_B", "head")
    uploaded = ("lora_A", "head")
    personal = ("lora_B",)
