"""FedLEASE: adaptive LoRA experts allocation and selection.

Wang, Bian, Zhang, Xu, "Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning",
NeurIPS 2025 (arXiv 2509.15087).

Rounds 0..W-1 (warmup): every client trains its own LoRA and head from one shared initialisation and keeps it;
nothing is averaged, and each client uploads its LoRA so the server can cluster (as the released code does;
the server clusters on the latest LoRA it received from each client). With ``--allocation embedding`` a client
also sends with every warmup upload its data signature (computed once): the mean of the frozen encoder's
mean-pooled embeddings of its training examples. End of round W-1 (allocation): clients are clustered
by their LoRA B matrices (``paper``) or their data signatures (``embedding``) and K is chosen by silhouette
(``fedlease.clustering``); expert k starts
as the average of its members' warmup LoRAs (the paper; the released code starts from each client's own LoRA
instead). Rounds W..R-1 (adaptive): each client holds
all K experts, trains its own expert, its cluster's router and its head; the server averages expert k over
cluster k, routers within a cluster, and heads among clients of one cluster that share a label set (the
released code never trains the head; a head with no such peer stays the client's own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlease.clustering import ClusteringResult, cluster_clients_by_embedding, cluster_clients_by_lora_b
from fedlease.config import RunConfig
from fedlease.methods.base import (
    LORA_PARTS,
    ClientInfo,
    FederatedMethod,
    Instruction,
    RoundReport,
    Update,
    average_groups,
    average_states,
    select,
)
from fedlease.model.experts import ExpertLayout, init_router
from fedlease.train import LocalClient

PLAIN_LORA = ExpertLayout()
WARMUP_PARTS = ("lora_A", "lora_B", "head")
ADAPTIVE_PARTS = ("lora_A", "lora_B", "router", "head")
SIGNATURE = "signature.embedding"  # the data signature's name in a warmup upload


class FedLease(FederatedMethod):
    name = "fedlease"

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.warmup_loras: dict[int, dict[str, torch.Tensor]] = {}  # latest warmup upload of each client
        self.signatures: dict[int, torch.Tensor] = {}  # --allocation embedding: each client's data signature
        self.clustering: ClusteringResult | None = None
        self.experts: list[dict[str, torch.Tensor]] = []  # expert k: <site>.lora_A / .lora_B
        self.routers: list[dict[str, torch.Tensor]] = []  # router of cluster k: <site>.router
        self.heads: dict[int, dict[str, torch.Tensor]] = {}  # adaptive phase: each client's head

    # -- who shares what ----------------------------------------------------------------------------------
    def in_warmup(self, rnd: int) -> bool:
        return rnd < self.config.warmup_rounds

    def cluster_of(self, cid: int) -> int:
        assert self.clustering is not None
        return self.clustering.labels[cid]

    def head_group(self, cid: int) -> tuple[int, tuple[str, ...]]:
        """Heads are averaged among clients of one cluster that share a label set."""
        return self.cluster_of(cid), self.clients[cid].labels

    def layout(self, cid: int) -> ExpertLayout:
        assert self.clustering is not None
        k = self.clustering.num_clusters
        if k == 1:
            return PLAIN_LORA
        if self.config.top_k is not None:  # ablation: fixed top-k over K slots
            return ExpertLayout(num_experts=k, own_expert=self.cluster_of(cid), routing="topk",
                                top_k=min(self.config.top_k, k))
        return ExpertLayout(num_experts=k, own_expert=self.cluster_of(cid), routing="adaptive")

    def client_map(self) -> dict[int, list[int]]:
        if self.clustering is None:
            return {c.client_id: [c.client_id] for c in self.clients}
        return self.clustering.members()

    def server_state(self) -> dict[str, Any]:
        return {"warmup_loras": self.warmup_loras, "signatures": self.signatures, "experts": self.experts,
                "routers": self.routers, "heads": self.heads,
                "clustering": None if self.clustering is None else self.clustering.to_dict()}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.warmup_loras = dict(state["warmup_loras"])
        self.signatures = {int(cid): value for cid, value in state.get("signatures", {}).items()}
        self.experts, self.routers, self.heads = list(state["experts"]), list(state["routers"]), dict(state["heads"])
        self.clustering = None if state["clustering"] is None else ClusteringResult.from_dict(state["clustering"])

    # -- server half --------------------------------------------------------------------------------------
    def download(self, cid: int) -> Instruction:
        layout, own = self.layout(cid), self.cluster_of(cid)
        state = dict(self.heads[cid])
        if layout.routing == "none":
            state.update(self.experts[own])
        else:  # all K experts as one bank: the own expert travels once, in its slot (own_expert_from_bank)
            state.update(self.routers[own])
            for site in (key.removesuffix(".lora_A") for key in self.experts[own] if key.endswith(".lora_A")):
                state[f"{site}.experts_A"] = torch.stack([e[f"{site}.lora_A"] for e in self.experts])
                state[f"{site}.experts_B"] = torch.stack([e[f"{site}.lora_B"] for e in self.experts])
        return Instruction(layout, state, train=ADAPTIVE_PARTS, upload=ADAPTIVE_PARTS)

    def configure_train(self, rnd: int) -> dict[int, Instruction]:
        if self.in_warmup(rnd):
            # Round 0 starts from the shared seeded init; later warmup rounds continue the client's own LoRA.
            return {c.client_id: Instruction(PLAIN_LORA, train=WARMUP_PARTS, upload=WARMUP_PARTS, keep=WARMUP_PARTS,
                                             restore=WARMUP_PARTS)
                    for c in self.clients}
        return {c.client_id: self.download(c.client_id) for c in self.clients}

    def configure_evaluate(self, rnd: int) -> dict[int, Instruction]:
        if self.in_warmup(rnd):
            return {c.client_id: Instruction(PLAIN_LORA, restore=WARMUP_PARTS) for c in self.clients}
        return {c.client_id: self.download(c.client_id) for c in self.clients}

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        if self.in_warmup(rnd):
            for cid, update in updates.items():
                if SIGNATURE in update.state:
                    self.signatures[cid] = update.state[SIGNATURE]
                self.warmup_loras[cid] = {k: v for k, v in update.state.items() if k != SIGNATURE}
            report = RoundReport("warmup", [f"warmup: {len(updates)} clients trained their own LoRA"])
            if rnd == self.config.warmup_rounds - 1:
                self.allocate(report)
            return report
        report = RoundReport("adaptive")
        for k, members in self.clustering.members().items():
            replied = [cid for cid in members if cid in updates]
            if not replied:
                report.log.append(f"expert {k}: no member replied, kept as it was")
                continue
            states = [updates[cid].state for cid in replied]
            weights = [updates[cid].num_examples for cid in replied]
            self.experts[k] = average_states([select(s, LORA_PARTS) for s in states], weights)
            if self.routers:
                self.routers[k] = average_states([select(s, ("router",)) for s in states], weights)
        self.average_heads({cid: u.state for cid, u in updates.items()},
                           {cid: u.num_examples for cid, u in updates.items()})
        return report

    def allocate(self, report: RoundReport) -> None:
        """Cluster the warmup LoRAs, pick K, and build experts, routers and heads from the members."""
        clients = [c.client_id for c in self.clients]
        missing = [cid for cid in clients if cid not in self.warmup_loras]
        if missing:
            raise RuntimeError(f"cannot cluster: clients {missing} never delivered a warmup LoRA")
        config = self.config
        if config.allocation == "paper":
            b_matrices = [select(self.warmup_loras[cid], ("lora_B",)) for cid in clients]
            result = cluster_clients_by_lora_b(b_matrices, config.max_clusters, fixed_clusters=config.num_experts)
        else:
            missing = [cid for cid in clients if cid not in self.signatures]
            if missing:
                raise RuntimeError(f"cannot cluster: clients {missing} never delivered a data signature")
            result = cluster_clients_by_embedding([self.signatures[cid] for cid in clients], config.max_clusters,
                                                  config.num_experts, config.min_silhouette)
        self.clustering = result
        report.clustering = result
        report.log.append(f"clustering: K={result.num_clusters} ({result.reason}; {config.allocation} allocation, "
                          f"{result.signature} cosine distance)")
        for k, score in result.silhouette.items():
            report.log.append(f"  K={k}: silhouette {score:.4f}, Davies-Bouldin (2-D MDS) "
                              f"{result.davies_bouldin[k]:.4f}")
        for k, members in result.members().items():
            tasks = " ".join(self.clients[cid].task for cid in members)
            report.log.append(f"  expert {k}: clients {members} ({tasks})")
        if self.config.top_k is not None and result.num_clusters > 1:
            report.log.append(f"routing: fixed top-{min(self.config.top_k, result.num_clusters)} of "
                              f"{result.num_clusters} experts (ablation)")
        self.experts = [average_states([select(self.warmup_loras[cid], LORA_PARTS) for cid in members],
                                       [1.0] * len(members)) for members in result.members().values()]
        self.routers = []
        if result.num_clusters > 1:
            slots = self.layout(0).num_slots
            router = {}
            for key, value in self.experts[0].items():
                if key.endswith(".lora_A"):
                    site = key.removesuffix(".lora_A")
                    router[f"{site}.router"] = init_router(value.shape[1], slots, self.config.seed, site)
            self.routers = [dict(router) for _ in range(result.num_clusters)]
        self.average_heads({cid: self.warmup_loras[cid] for cid in clients}, dict.fromkeys(clients, 1.0))

    # -- client half --------------------------------------------------------------------------------------
    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        """With the embedding allocation, every warmup upload carries the client's data signature, computed once
        and kept in the client's store (a client that missed rounds still delivers it)."""
        wanted = self.config.allocation == "embedding" and self.in_warmup(rnd)
        if wanted and SIGNATURE not in store:
            store[SIGNATURE] = data_signature(client, self.config.seed)
        update = super().client_train(client, ins, rnd, store)
        if wanted:
            update.state[SIGNATURE] = store[SIGNATURE]
        return update

    def average_heads(self, states: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float]) -> None:
        self.heads.update(average_groups(states, weights, self.head_group, ("head",)))


def data_signature(client: LocalClient, seed: int) -> torch.Tensor:
    """The mean over the client's training examples of the frozen encoder's embedding of each (``LocalClient.embed``;
    a sentence embedding with a bi-encoder): one vector (hidden,). The shared initial LoRA has B = 0, so with it
    loaded the model is the frozen encoder."""
    client.apply(PLAIN_LORA, client.adapted.initial_state(seed))
    return client.embed(client.train_data).mean(0)
