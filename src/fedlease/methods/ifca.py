"""IFCA + LoRA: K cluster LoRAs; each client joins the one with the lowest loss on its data.

Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated Learning", NeurIPS 2020
(arXiv 2006.04088), with LoRA adapters as the models, as in the FedLEASE paper's comparison. Every round the
server sends all K cluster LoRAs; each client computes the loss of each on its local training data, picks the
lowest (cluster identity estimation), trains that LoRA and its head, and uploads them with its choice; the
server averages each cluster's LoRA over the clients that chose it (a cluster nobody chose is kept), and heads
among clients of one cluster with one label set.

A cluster's model is its LoRA and its head for the client's label set: IFCA compares complete models, so each
client receives every cluster's head for its label set with the cluster LoRAs, and scores cluster k with k's
own head (the client's seeded head where cluster k has none for its label set yet). Scoring every cluster with
the head trained in the client's previous cluster would favour staying there.

The cluster LoRAs start from K different seeded initialisations. With B = 0 (the LoRA standard) they all
compute the same function at first, so every loss ties: ties are broken by a seeded random draw per client
and round, which gives IFCA's random initial assignment.
"""

from __future__ import annotations

import json
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


def head_key(k: int, labels: Sequence[str]) -> str:
    """The server's key of cluster k's head for one label set (a string: checkpoints keep it as JSON)."""
    return f"{k}/{json.dumps(list(labels))}"


class IFCA(FederatedMethod):
    name = "ifca"

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.num_clusters = config.num_clusters
        self.clusters: dict[int, dict[str, torch.Tensor]] = {}  # trained cluster LoRAs (others: still at init)
        self.assignment: dict[int, int] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # head_key(cluster, label set) -> head

    def cluster_model(self, k: int, cid: int) -> dict[str, torch.Tensor]:
        """Cluster k's LoRA and its head for the client's label set, as far as the server has them."""
        state = {**self.clusters.get(k, {}), **self.heads.get(head_key(k, self.clients[cid].labels), {})}
        return {cluster_key(k, key): value for key, value in state.items()}

    def configure_train(self, rnd: int) -> dict[int, Instruction]:
        return {c.client_id: Instruction(ExpertLayout(), {key: value for k in range(self.num_clusters)
                                                          for key, value in self.cluster_model(k, c.client_id).items()},
                                         train=PARTS, upload=PARTS) for c in self.clients}

    def configure_evaluate(self, rnd: int) -> dict[int, Instruction]:
        instructions = {}
        for c in self.clients:
            k = self.assignment.get(c.client_id, 0)
            instructions[c.client_id] = Instruction(ExpertLayout(), self.cluster_model(k, c.client_id),
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
        groups: dict[str, list[int]] = {}
        for cid in updates:
            groups.setdefault(head_key(self.assignment[cid], self.clients[cid].labels), []).append(cid)
        for key, members in groups.items():
            self.heads[key] = average_states([select(updates[c].state, ("head",)) for c in members],
                                             [updates[c].num_examples for c in members])
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
        if any(isinstance(key, int) for key in self.heads):  # a checkpoint from before heads were kept per cluster
            self.heads = {head_key(self.assignment[cid], self.clients[cid].labels): head
                          for cid, head in sorted(self.heads.items()) if cid in self.assignment}

    # -- client half --------------------------------------------------------------------------------------
    def candidate(self, client: LocalClient, ins: Instruction, k: int) -> Instruction:
        """The model of cluster k for this client: the cluster's LoRA (its seeded initialisation until the server
        has trained it) and its head for the client's label set (else the client's seeded head)."""
        prefix = cluster_key(k, "")
        downloaded = {key.removeprefix(prefix): v for key, v in ins.state.items() if key.startswith(prefix)}
        lora = select(downloaded, LORA_PARTS) or select(
            client.adapted.initial_state(derive_seed(self.config.seed, "ifca-cluster", k)), LORA_PARTS)
        return Instruction(ExpertLayout(), {**lora, **select(downloaded, ("head",))})

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
