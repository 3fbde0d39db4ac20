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

Under sampling a client chooses its cluster whenever it is sampled; a cluster no sampled client chose is kept.
A client the server has not placed yet (never sampled, or a newcomer held out of training) is evaluated as IFCA
places any client: it receives all K cluster models and takes the one with the lowest loss on its own training
data, without training.

The cluster LoRAs start from K different seeded initialisations. With B = 0 (the LoRA standard) they all
compute the same function at first, so every loss ties: ties are broken by a seeded random draw per client
and round, which gives IFCA's random initial assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    label_set_key,
    select,
)
from fedlease.model.experts import ExpertLayout
from fedlease.seeding import derive_seed, generator
from fedlease.train import LocalClient

PARTS = ("lora_A", "lora_B", "head")
TIE_TOLERANCE = 1e-6
NEWCOMER = "newcomer"  # Instruction.extra flag: choose the cluster by loss, then evaluate


def cluster_key(k: int, key: str) -> str:
    return f"cluster{k}/{key}"


class IFCA(FederatedMethod):
    name = "ifca"

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.num_clusters = config.num_clusters
        self.clusters: dict[int, dict[str, torch.Tensor]] = {}  # trained cluster LoRAs (others: still at init)
        self.assignment: dict[int, int] = {}
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # label_set_key(label set, cluster) -> head

    def cluster_model(self, k: int, cid: int) -> dict[str, torch.Tensor]:
        """Cluster k's LoRA and its head for the client's label set, as far as the server has them."""
        state = {**self.clusters.get(k, {}), **self.heads.get(label_set_key(self.clients[cid].labels, k), {})}
        return {cluster_key(k, key): value for key, value in state.items()}

    def all_clusters(self, cid: int) -> dict[str, torch.Tensor]:
        return {key: value for k in range(self.num_clusters) for key, value in self.cluster_model(k, cid).items()}

    def configure_train(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        return {cid: Instruction(ExpertLayout(), self.all_clusters(cid), train=PARTS, upload=PARTS)
                for cid in self.ids(cohort)}

    def configure_evaluate(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        instructions = {}
        for cid in self.ids(cohort):
            if cid not in self.assignment:  # never placed: it chooses as a newcomer does
                instructions.update(self.configure_newcomers(rnd, [cid]))
                continue
            k = self.assignment[cid]
            instructions[cid] = Instruction(ExpertLayout(), self.cluster_model(k, cid), extra={"cluster": k})
        return instructions

    def configure_newcomers(self, rnd: int, cohort: Iterable[int]) -> dict[int, Instruction]:
        return {cid: Instruction(ExpertLayout(), self.all_clusters(cid), extra={NEWCOMER: 1}) for cid in cohort}

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
                # under DP a cluster's expected contributors are a K-th of the federation's: who chooses a
                # cluster is decided by the clients' data, so it cannot fix the divisor
                self.clusters[k] = self.mean([select(updates[c].state, LORA_PARTS) for c in members],
                                             [updates[c].num_examples for c in members],
                                             lambda k=k: self.clusters.get(k) or self.initial_parts(
                                                 LORA_PARTS, derive_seed(self.config.seed, "ifca-cluster", k)),
                                             self.ids(None), f"cluster {k}", 1 / self.num_clusters)
            report.log.append(f"cluster {k}: clients {members}" + ("" if members else " (kept)"))
        self.heads.update(self.mean_groups(
            {cid: u.state for cid, u in updates.items()}, {cid: u.num_examples for cid, u in updates.items()},
            lambda cid: label_set_key(self.clients[cid].labels, self.assignment[cid]), ("head",),
            lambda key: self.heads.get(key) or self.initial_parts(("head",)),
            lambda key: [c.client_id for c in self.clients if label_set_key(c.labels) == key.partition("/")[2]],
            1 / self.num_clusters))
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
            self.heads = {label_set_key(self.clients[cid].labels, self.assignment[cid]): head
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

    def choose(self, client: LocalClient, ins: Instruction, rnd: int, store: dict[str, torch.Tensor]
               ) -> tuple[int, list[float]]:
        """Cluster identity estimation: the cluster whose model has the lowest loss on the client's training data
        (ties drawn, seeded by client and round); the chosen model is left loaded."""
        losses = []
        for k in range(self.num_clusters):
            self.load(client, self.candidate(client, ins, k), store)
            losses.append(client.train_loss())
        losses_t = torch.tensor(losses)
        tied = torch.nonzero(losses_t <= losses_t.min() + TIE_TOLERANCE * losses_t.min().abs()).flatten()
        draw = torch.randint(len(tied), (1,), generator=generator(self.config.seed, "ifca-tie", rnd, client.client_id))
        chosen = int(tied[draw])
        self.load(client, self.candidate(client, ins, chosen), store)
        return chosen, losses

    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        chosen, losses = self.choose(client, ins, rnd, store)
        metrics = client.fit(ins.train, seed=derive_seed(self.config.seed, "train", rnd, client.client_id))
        metrics.update({"cluster": chosen, **{f"loss_cluster_{k}": loss for k, loss in enumerate(losses)}})
        return Update(client.state(ins.upload), client.num_train, metrics)

    def client_evaluate(self, client: LocalClient, ins: Instruction, rnd: int,
                        store: dict[str, torch.Tensor]) -> dict[str, float]:
        if ins.extra.get(NEWCOMER):
            chosen, _ = self.choose(client, ins, rnd, store)
            return {**client.evaluate(), "cluster": chosen}
        self.load(client, self.candidate(client, ins, int(ins.extra.get("cluster", 0))), store)
        return client.evaluate()
