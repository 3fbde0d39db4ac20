"""IFCA + LoRA: K cluster LoRAs; each client joins the one with the lowest loss on its data.

Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated Learning", NeurIPS 2020
(arXiv 2006.04088), with LoRA adapters as the models, as in the FedLEASE paper's comparison. Every round the
server sends all K cluster LoRAs; each client computes the loss of each on its local training data, picks the
lowest (cluster identity estimation), trains that LoRA and its head, and uploads them with its choice; the
server averages each cluster's LoRA over the clients that chose it (a cluster nobody chose is kept), and heads
among clients of one cluster with one label set.

The cluster LoRAs start from K different seeded initialisations. With B = 0 (the LoRA standard) they all
compute the same function at first, so every loss ties: ties are broken by a seeded random draw per client
and round, which gives IFCA's random initial assignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

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
from fedlease.model.experts import ExpertLayout
from fedlease.seeding import derive_seed, generator
from fedlease.train import LocalClient

PARTS = ("lora_A", "lora_B", "head")
TIE_TOLERANCE = 1e-6


def cluster_key(k: int, key: str) -> str:
    return f"cluster{k}/{key}"


class IFCA(FederatedMethod):
    name = "ifca"

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.num_clusters = config.num_clusters
        self.clusters: dict[int, dict[str, torch.Tensor]] = {}  # trained cluster LoRAs (others: still at init)
        self.assignment: dict[int, int] = {}
        self.heads: dict[int, dict[str, torch.Tensor]] = {}

    def configure_train(self, rnd: int) -> dict[int, Instruction]:
        clusters = {cluster_key(k, key): value for k, state in self.clusters.items() for key, value in state.items()}
        return {c.client_id: Instruction(ExpertLayout(), {**clusters, **self.heads.get(c.client_id, {})},
                                         train=PARTS, upload=PARTS) for c in self.clients}

    def configure_evaluate(self, rnd: int) -> dict[int, Instruction]:
        instructions = {}
        for c in self.clients:
            k = self.assignment.get(c.client_id, 0)
            state = {cluster_key(k, key): v for key, v in self.clusters.get(k, {}).items()}
            instructions[c.client_id] = Instruction(ExpertLayout(), {**state, **self.heads.get(c.client_id, {})},
                                                    extra={"cluster": k})
        return instructions

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        report = RoundReport("federated")
        valid = {}
        for cid, update in updates.items():
            choice = update.metrics.get("cluster")
            if isinstance(choice, int | float) and float(choice).is_integer() and 0 <= choice < self.num_clusters:
                self.assignment[cid] = int(choice)
                valid[cid] = update
            else:
                report.log.append(f"client {cid} named no valid cluster ({choice!r}); its update is left out")
        updates = valid
        for k in range(self.num_clusters):
            members = [cid for cid in updates if self.assignment[cid] == k]
            if members:
                self.clusters[k] = average_states([select(updates[c].state, LORA_PARTS) for c in members],
                                                  [updates[c].num_examples for c in members])
            report.log.append(f"cluster {k}: clients {members}" + ("" if members else " (kept)"))
        self.heads.update(average_groups({cid: u.state for cid, u in updates.items()},
                                         {cid: float(u.num_examples) for cid, u in updates.items()},
                                         lambda cid: (self.assignment[cid], self.clients[cid].labels), ("head",)))
        return report

    def client_map(self) -> dict[int, list[int]]:
        members: dict[int, list[int]] = {}
        for cid, k in sorted(self.assignment.items()):
            members.setdefault(k, []).append(cid)
        return members or {0: [c.client_id for c in self.clients]}

    def server_state(self) -> dict[str, Any]:
        return {"clusters": self.clusters, "assignment": self.assignment, "heads": self.heads}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.clusters, self.assignment, self.heads = (dict(state[k]) for k in ("clusters", "assignment", "heads"))

    # -- client half --------------------------------------------------------------------------------------
    def cluster_lora(self, client: LocalClient, ins: Instruction, k: int) -> dict[str, torch.Tensor]:
        """Cluster k's LoRA: downloaded if the server has trained it, else its seeded initialisation."""
        prefix = cluster_key(k, "")
        downloaded = {key.removeprefix(prefix): v for key, v in ins.state.items() if key.startswith(prefix)}
        if downloaded:
            return downloaded
        return select(client.adapted.initial_state(derive_seed(self.config.seed, "ifca-cluster", k)), LORA_PARTS)

    def candidate(self, client: LocalClient, ins: Instruction, k: int) -> Instruction:
        """The model of cluster k for this client: the cluster's LoRA with the client's head."""
        return Instruction(ExpertLayout(), {**self.cluster_lora(client, ins, k), **select(ins.state, ("head",))})

    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        losses = []
        for k in range(self.num_clusters):
            self.load(client, self.candidate(client, ins, k), store)
            losses.append(client.train_loss())
        losses_t = torch.tensor(losses)
        tied = torch.nonzero(losses_t <= losses_t.min() + TIE_TOLERANCE * losses_t.min().abs()).flatten()
        draw = torch.randint(len(tied), (1,), generator=generator(self.config.seed, "ifca-tie", rnd, client.client_id))
        chosen = int(tied[draw])
        self.load(client, self.candidate(client, ins, chosen), store)
        metrics = client.fit(ins.train, seed=derive_seed(self.config.seed, "train", rnd, client.client_id))
        metrics.update({"cluster": chosen, **{f"loss_cluster_{k}": loss for k, loss in enumerate(losses)}})
        return Update(client.state(ins.upload), client.num_train, metrics)

    def client_evaluate(self, client: LocalClient, ins: Instruction, rnd: int,
                        store: dict[str, torch.Tensor]) -> dict[str, float]:
        self.load(client, self.candidate(client, ins, int(ins.extra.get("cluster", 0))), store)
        return client.evaluate()
