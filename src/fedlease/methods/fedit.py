"""FedIT: one LoRA shared by all clients, FedAvg of A and B.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024
(arXiv 2305.05644). Every round each client downloads the global LoRA, trains it locally, and the server
replaces it by the example-weighted mean of the uploads. Heads are averaged among clients that share a label
set. ``--method fedit --rank 16`` is the FedLEASE paper's "one expert, rank 16" ablation.
"""

from __future__ import annotations

from fedlease.methods.shared import SharedAdapterMethod


class FedIT(SharedAdapterMethod):
    name = "fedit"
    shared = ("lora_A", "lora_B")
    trained = uploaded = ("lora_A", "lora_B", "head")
