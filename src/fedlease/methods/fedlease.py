"""FedLEASE: adaptive LoRA experts allocation and selection.

Wang, Bian, Zhang, Xu, "Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning",
NeurIPS 2025 (arXiv 2509.15087).

Rounds 0..W-1 (warmup): every client trains its own LoRA and head from one shared initialisation and keeps it;
nothing is averaged, and each client uploads its LoRA so the server can cluster (as the released code does;
the server clusters on the latest LoRA it received from each client). With ``--allocation embedding`` a client
also sends with every warmup upload its data signature (computed once): the frozen encoder's mean-pooled
embeddings of its training examples, averaged class by class and weighted by the client's share of each class
(``data_signature``). End of round W-1 (allocation): clients are clustered
by their LoRA B matrices (``paper``) or their data signatures (``embedding``: by the signatures' mean embedding,
and by their class blocks only where the mean finds one expert) and K is chosen by silhouette
(``fedlease.clustering``); expert k starts
as the average of its members' warmup LoRAs (the paper; the released code starts from each client's own LoRA
instead). Rounds W..R-1 (adaptive): each client holds
all K experts, trains its own expert, its cluster's router and its head; the server averages expert k over
cluster k, routers within a cluster, and heads among clients of one cluster that share a label set (the
released code never trains the head; a head with no such peer stays the client's own).

A client that misses rounds never stops the run. Allocation clusters the clients whose warmup upload arrived
(it waits a round if none did). A client without an expert is asked, whenever it next answers, for one warmup
round (its own LoRA, and its data signature); the server then gives it the expert of the nearest cluster, by
the mean allocation distance (B cosine or signature cosine) to the cluster's members, the criterion average
linkage used to form the clusters, and it trains that expert from the next round on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedlease.clustering import (
    ClusteringResult,
    cluster_clients_by_embedding,
    cluster_clients_by_lora_b,
    cosine_distances,
    signature_mean,
)
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
SEND_SIGNATURE = "signature"  # Instruction.extra flag: upload the data signature with this update


class FedLease(FederatedMethod):
    name = "fedlease"

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.warmup_loras: dict[int, dict[str, torch.Tensor]] = {}  # latest warmup upload of each client
        self.signatures: dict[int, torch.Tensor] = {}  # --allocation embedding: each client's data signature
        self.clustering: ClusteringResult | None = None
        self.assignment: dict[int, int] = {}  # client -> expert, for clustered clients and late joiners
        self.experts: list[dict[str, torch.Tensor]] = []  # expert k: <site>.lora_A / .lora_B
        self.routers: list[dict[str, torch.Tensor]] = []  # router of cluster k: <site>.router
        self.heads: dict[int, dict[str, torch.Tensor]] = {}  # adaptive phase: each client's head

    # -- who shares what ----------------------------------------------------------------------------------
    def in_warmup(self, rnd: int) -> bool:
        """Warmup lasts ``--warmup_rounds`` rounds, and longer only if no client's warmup upload arrived."""
        return rnd < self.config.warmup_rounds or self.clustering is None

    def cluster_of(self, cid: int) -> int:
        return self.assignment[cid]

    def has_expert(self, cid: int) -> bool:
        return cid in self.assignment

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
        return self.members()

    def members(self) -> dict[int, list[int]]:
        """Expert k -> the clients that hold it as their own."""
        groups: dict[int, list[int]] = {k: [] for k in range(self.clustering.num_clusters)}
        for cid in sorted(self.assignment):
            groups[self.assignment[cid]].append(cid)
        return groups

    def server_state(self) -> dict[str, Any]:
        return {"warmup_loras": self.warmup_loras, "signatures": self.signatures, "experts": self.experts,
                "routers": self.routers, "heads": self.heads,
                "clustering": None if self.clustering is None else self.clustering.to_dict(),
                "assignment": {str(cid): k for cid, k in self.assignment.items()}}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.warmup_loras = dict(state["warmup_loras"])
        self.signatures = {int(cid): value for cid, value in state.get("signatures", {}).items()}
        self.experts, self.routers, self.heads = list(state["experts"]), list(state["routers"]), dict(state["heads"])
        self.clustering = None if state["clustering"] is None else ClusteringResult.from_dict(state["clustering"])
        if "assignment" in state:
            self.assignment = {int(cid): int(k) for cid, k in state["assignment"].items()}
        elif self.clustering is not None:  # a checkpoint from before late joiners: every client was clustered
            self.assignment = dict(zip(self.clustering.client_ids(), self.clustering.labels, strict=True))

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

    def warmup_instruction(self) -> Instruction:
        """Train and keep the client's own LoRA and head; round 0 starts from the shared seeded init, later
        warmup rounds continue what the client keeps. With ``--allocation embedding`` the update carries the
        client's data signature."""
        extra = {SEND_SIGNATURE: self.signature_blocks()} if self.config.allocation == "embedding" else {}
        return Instruction(PLAIN_LORA, train=WARMUP_PARTS, upload=WARMUP_PARTS, keep=WARMUP_PARTS,
                           restore=WARMUP_PARTS, extra=extra)

    def configure_train(self, rnd: int) -> dict[int, Instruction]:
        warmup = self.in_warmup(rnd)
        return {c.client_id: self.warmup_instruction() if warmup or not self.has_expert(c.client_id)
                else self.download(c.client_id) for c in self.clients}

    def configure_evaluate(self, rnd: int) -> dict[int, Instruction]:
        warmup = self.in_warmup(rnd)
        return {c.client_id: Instruction(PLAIN_LORA, restore=WARMUP_PARTS)
                if warmup or not self.has_expert(c.client_id) else self.download(c.client_id) for c in self.clients}

    def keep_warmup_upload(self, cid: int, update: Update) -> None:
        if SIGNATURE in update.state:
            self.signatures[cid] = update.state[SIGNATURE]
        self.warmup_loras[cid] = {k: v for k, v in update.state.items() if k != SIGNATURE}

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        if self.in_warmup(rnd):
            for cid, update in updates.items():
                self.keep_warmup_upload(cid, update)
            report = RoundReport("warmup", [f"warmup: {len(updates)} clients trained their own LoRA"])
            if rnd >= self.config.warmup_rounds - 1:
                self.allocate(report)
            return report
        report = RoundReport("adaptive")
        joiners = {cid: u for cid, u in updates.items() if not self.has_expert(cid)}
        updates = {cid: u for cid, u in updates.items() if cid not in joiners}
        for cid, update in sorted(joiners.items()):
            self.keep_warmup_upload(cid, update)
            self.join(cid, report)
        for k, members in self.members().items():
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
                           {cid: u.num_examples for cid, u in updates.items()},
                           recipients=[cid for cid in self.assignment if cid not in joiners])  # a joiner keeps its own
        return report

    def signature_blocks(self) -> int:
        """The data signature's number of class blocks: the largest label set of the federation, so every
        client's signature has one shape (update validation fixes a key's shape by the majority of a round's
        uploads)."""
        return max(max(len(c.labels), 1) for c in self.clients)

    def allocation_signature(self, cid: int) -> dict[str, torch.Tensor]:
        """What the allocation compared of a client: its warmup B matrices, or its data signature (its mean
        embedding, the sum of the class blocks, where that tier decided the allocation)."""
        if self.config.allocation == "paper":
            return select(self.warmup_loras[cid], ("lora_B",))
        signature = self.signatures[cid]
        if self.clustering is not None and self.clustering.signature == "embedding_mean":
            return {"embedding": signature_mean(signature, self.signature_block_size(signature))}
        return {"embedding": signature}

    def signature_block_size(self, signature: torch.Tensor) -> int:
        return signature.numel() // self.signature_blocks()

    def delivered(self, cid: int) -> bool:
        return cid in self.warmup_loras and (self.config.allocation == "paper" or cid in self.signatures)

    def allocate(self, report: RoundReport) -> None:
        """Cluster the clients whose warmup upload arrived, pick K, and build experts, routers and heads from
        the members. Clients that never delivered one get an expert when they next answer (``join``)."""
        clients = [c.client_id for c in self.clients if self.delivered(c.client_id)]
        missing = [c.client_id for c in self.clients if not self.delivered(c.client_id)]
        if not clients:
            report.log.append("allocation postponed: no client has delivered a warmup upload yet; warmup goes on")
            return
        if missing:
            report.log.append(f"allocation without clients {missing}: they never delivered a warmup upload; each "
                              f"gets the nearest expert when it next answers")
        config = self.config
        if config.allocation == "paper":
            result = cluster_clients_by_lora_b([self.allocation_signature(cid) for cid in clients],
                                               config.max_clusters, fixed_clusters=config.num_experts)
        else:
            signatures = [self.signatures[cid] for cid in clients]
            result = cluster_clients_by_embedding(signatures, config.max_clusters, config.num_experts,
                                                  config.min_silhouette,
                                                  block_size=self.signature_block_size(signatures[0]))
        if missing:
            result.clients = clients
        self.clustering = result
        self.assignment = dict(zip(clients, result.labels, strict=True))
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
            slots = self.layout(clients[0]).num_slots
            router = {}
            for key, value in self.experts[0].items():
                if key.endswith(".lora_A"):
                    site = key.removesuffix(".lora_A")
                    router[f"{site}.router"] = init_router(value.shape[1], slots, self.config.seed, site)
            self.routers = [dict(router) for _ in range(result.num_clusters)]
        self.average_heads({cid: self.warmup_loras[cid] for cid in clients}, dict.fromkeys(clients, 1.0))

    def join(self, cid: int, report: RoundReport) -> None:
        """Give a client that missed the allocation the expert of the nearest cluster (mean allocation distance to
        the cluster's members); its head is its own until it is averaged with its peers'."""
        members = {k: group for k, group in self.members().items() if group}
        others = [m for group in members.values() for m in group]
        row = cosine_distances([self.allocation_signature(c) for c in (cid, *others)])[0, 1:]
        to = dict(zip(others, row, strict=True))
        distance = {k: float(sum(to[m] for m in group) / len(group)) for k, group in members.items()}
        k = min(distance, key=lambda j: (distance[j], j))
        self.assignment[cid] = k
        self.average_heads({cid: self.warmup_loras[cid]}, {cid: 1.0})
        report.log.append(f"client {cid} joined late: expert {k} (mean {self.config.allocation} allocation distance "
                          f"{distance[k]:.4f} to its members {members[k]})")

    # -- client half --------------------------------------------------------------------------------------
    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        """With the embedding allocation, every warmup upload carries the client's data signature, computed once
        and kept in the client's store (a client that missed rounds still delivers it)."""
        blocks = int(ins.extra.get(SEND_SIGNATURE, 0))
        wanted = blocks > 0
        if wanted and SIGNATURE not in store:
            store[SIGNATURE] = data_signature(client, self.config.seed, blocks)
        update = super().client_train(client, ins, rnd, store)
        if wanted:
            update.state[SIGNATURE] = store[SIGNATURE]
        return update

    def average_heads(self, states: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
                      recipients: Iterable[int] = ()) -> None:
        self.heads.update(average_groups(states, weights, self.head_group, ("head",), recipients))


def data_signature(client: LocalClient, seed: int, blocks: int = 1) -> torch.Tensor:
    """The client's data, class by class, in the frozen encoder's embedding (``LocalClient.embed``; a sentence
    embedding with a bi-encoder): block c is the client's share of class c times the mean embedding of its examples
    of class c, the blocks flattened into one vector (``blocks`` x hidden, zero blocks beyond the client's classes;
    a free-text task has one class). The
    blocks sum to the mean embedding of all its examples, so clients of different tasks differ as their data do,
    and clients of one task with different label mixes put their weight in different blocks. The shared initial
    LoRA has B = 0, so with it loaded the model is the frozen encoder."""
    client.apply(PLAIN_LORA, client.adapted.initial_state(seed))
    embeddings = client.embed(client.train_data)
    labels = client.train_data.labels
    signature = torch.zeros(max(blocks, client.spec.num_classes), embeddings.shape[1])
    for c in labels.unique().tolist():
        chosen = labels == c
        signature[c] = chosen.float().mean() * embeddings[chosen].mean(0)
    return signature.reshape(-1)
