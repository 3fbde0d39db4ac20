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

Open federations (a cohort sampled each round, clients that first appear late, newcomers that never train):
allocation clusters the clients whose warmup upload arrived (it waits a round if none did). A client without an
expert after the allocation is *placed*: it receives every expert, every cluster's router and head for its label
set, and one centroid per cluster (the mean of the members' unit-normalised allocation signatures), computes its
own signature locally (its data signature; with ``--allocation paper`` the B of one local warmup call, compared
with the members' B after their first warmup call, so equal training is compared), takes the cluster at the
smallest mean distance (1 - cosine against the centroid, which is the mean distance to the members, the criterion
average linkage used to form the clusters) and, when it is sampled to train, trains that expert, router and head
at once and uploads its signature with them. The server recomputes the placement from the signature against the
same centroids before it averages the update into the expert. An expert none of whose members was sampled stays
as it was. A newcomer that never trains (``--unseen_clients``) is placed the same way and evaluated with its
cluster's experts and router. With K = 1 every client holds the one expert and nothing is placed.
"""

from __future__ import annotations

import functools
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedlease.clustering import (
    ClusteringResult,
    cluster_clients_by_embedding,
    cluster_clients_by_lora_b,
    distances_to_centroids,
    nearest_cluster,
    signature_mean,
    unit_centroid,
)
from fedlease.config import RunConfig
from fedlease.methods.base import (
    LORA_PARTS,
    PLACEMENT_SECONDS,
    ClientInfo,
    FederatedMethod,
    Instruction,
    RoundReport,
    Update,
    average_states,
    client_secret,
    label_set_key,
    select,
)
from fedlease.model.experts import ExpertLayout, init_router
from fedlease.privacy import LOCAL_NOISE, accounting_rate, enabled, noise_multiplier, record_level
from fedlease.privacy import record as record_dp
from fedlease.privacy.accounting import Release
from fedlease.privacy.mechanism import add_noise, clip_change
from fedlease.runtime.participation import unseen_clients
from fedlease.seeding import derive_seed
from fedlease.train import LocalClient

PLAIN_LORA = ExpertLayout()
WARMUP_PARTS = ("lora_A", "lora_B", "head")
ADAPTIVE_PARTS = ("lora_A", "lora_B", "router", "head")
SIGNATURE = "signature.embedding"  # the data signature's name in a warmup upload
SEND_SIGNATURE = "signature"  # Instruction.extra flag: upload the data signature with this update
PLACE = "place"  # Instruction.extra: the client chooses its cluster (the value names the allocation signature)
PLACED_B = "signature.lora_b."  # + site: a placed client's B after one local warmup call (--allocation paper);
# no ".lora_B" suffix, so that no part selection takes it for a LoRA
PLACED_UPLOAD = (*ADAPTIVE_PARTS, "signature")


class FedLease(FederatedMethod):
    name = "fedlease"

    def __init__(self, config: RunConfig, clients: Sequence[ClientInfo]) -> None:
        super().__init__(config, clients)
        self.warmup_loras: dict[int, dict[str, torch.Tensor]] = {}  # latest warmup upload of each client
        self.first_b: dict[int, dict[str, torch.Tensor]] = {}  # --allocation paper: B after a client's first call
        self.signatures: dict[int, torch.Tensor] = {}  # --allocation embedding: each client's data signature
        self.clustering: ClusteringResult | None = None
        self.assignment: dict[int, int] = {}  # client -> expert, for clustered and placed clients
        self.experts: list[dict[str, torch.Tensor]] = []  # expert k: <site>.lora_A / .lora_B
        self.routers: list[dict[str, torch.Tensor]] = []  # router of cluster k: <site>.router
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # label_set_key(labels, cluster) -> head

    @classmethod
    def privacy_plan(cls, config: RunConfig) -> list[Release]:
        """Under DP, with the paper's allocation: each warmup round, every sampled client's clipped warmup upload,
        noised by the client itself (the allocation compares each client's own B). With the embedding allocation:
        once, each client's data signature, noised by the client (the allocation compares them); the warmup
        uploads are clipped but not noised, and leave the server only as the experts' and heads' noised starting
        means, one release after the last warmup round, in which a client takes part if it was sampled in any
        warmup round. Then one aggregate release per adaptive round."""
        rate = accounting_rate(config)
        last = config.warmup_rounds - 1
        if config.allocation == "embedding":
            plan = [Release("signature", 0, 1.0), Release("warmup", last, 1 - (1 - rate) ** config.warmup_rounds)]
        else:
            plan = [Release("warmup", rnd, rate) for rnd in range(config.warmup_rounds)]
        return plan + [Release("round", rnd, rate) for rnd in range(config.warmup_rounds, config.global_rounds)]

    @classmethod
    def record_releases(cls, config: RunConfig) -> int:
        """Under record-level DP, the embedding allocation's data signature: one Gaussian release per client."""
        return 1 if config.allocation == "embedding" else 0

    # -- who shares what ----------------------------------------------------------------------------------
    def in_warmup(self, rnd: int) -> bool:
        """Warmup lasts ``--warmup_rounds`` rounds, and longer only if no client's warmup upload arrived."""
        return rnd < self.config.warmup_rounds or self.clustering is None

    @property
    def num_experts(self) -> int:
        assert self.clustering is not None
        return self.clustering.num_clusters

    def cluster_of(self, cid: int) -> int:
        return 0 if self.num_experts == 1 else self.assignment[cid]

    def has_expert(self, cid: int) -> bool:
        return cid in self.assignment or self.num_experts == 1

    def head_key(self, cid: int, k: int | None = None) -> str:
        """Heads are averaged among clients of one cluster that share a label set."""
        return label_set_key(self.clients[cid].labels, self.cluster_of(cid) if k is None else k)

    def head_of(self, cid: int) -> dict[str, torch.Tensor]:
        """The head a placed client downloads: its cluster's for its label set (empty while there is none)."""
        return dict(self.heads.get(self.head_key(cid), {}))

    def layout(self, k: int) -> ExpertLayout:
        """The layout of a client whose own expert is ``k``."""
        if self.num_experts == 1:
            return PLAIN_LORA
        if self.config.top_k is not None:  # ablation: fixed top-k over K slots
            return ExpertLayout(num_experts=self.num_experts, own_expert=k, routing="topk",
                                top_k=min(self.config.top_k, self.num_experts))
        return ExpertLayout(num_experts=self.num_experts, own_expert=k, routing="adaptive")

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
        return {"warmup_loras": self.warmup_loras, "first_b": self.first_b, "signatures": self.signatures,
                "experts": self.experts, "routers": self.routers, "heads": self.heads,
                "clustering": None if self.clustering is None else self.clustering.to_dict(),
                "assignment": {str(cid): k for cid, k in self.assignment.items()}}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.warmup_loras = {int(cid): lora for cid, lora in state["warmup_loras"].items()}
        self.signatures = {int(cid): value for cid, value in state.get("signatures", {}).items()}
        self.experts, self.routers = list(state["experts"]), list(state["routers"])
        self.clustering = None if state["clustering"] is None else ClusteringResult.from_dict(state["clustering"])
        if "assignment" in state:
            self.assignment = {int(cid): int(k) for cid, k in state["assignment"].items()}
        elif self.clustering is not None:  # a checkpoint from before late joiners: every client was clustered
            self.assignment = dict(zip(self.clustering.client_ids(), self.clustering.labels, strict=True))
        # checkpoints from before first_b (the warmup B stands in) and before heads were kept per group
        self.first_b = {int(cid): b for cid, b in state.get("first_b", {}).items()} or {
            cid: select(lora, ("lora_B",)) for cid, lora in self.warmup_loras.items()}
        self.heads = {}
        for key, head in state["heads"].items():
            if isinstance(key, str) and not key.isdigit():
                self.heads[key] = head
            elif self.clustering is not None and int(key) in self.assignment:
                self.heads.setdefault(self.head_key(int(key)), head)

    # -- server half --------------------------------------------------------------------------------------
    def bank(self) -> dict[str, torch.Tensor]:
        """All K experts as one bank per site (the own expert travels once, in its slot: own_expert_from_bank)."""
        sites = [key.removesuffix(".lora_A") for key in self.experts[0] if key.endswith(".lora_A")]
        return {f"{site}.experts_{p}": torch.stack([e[f"{site}.lora_{p}"] for e in self.experts])
                for site in sites for p in "AB"}

    def download(self, cid: int, bank: Mapping[str, torch.Tensor] | None = None) -> Instruction:
        own = self.cluster_of(cid)
        layout = self.layout(own)
        state = self.head_of(cid)
        if layout.routing == "none":
            state.update(self.experts[own])
        else:
            state.update(self.routers[own])
            state.update(self.bank() if bank is None else bank)
        return Instruction(layout, state, train=ADAPTIVE_PARTS, upload=ADAPTIVE_PARTS)

    def centroids(self) -> list[dict[str, torch.Tensor]]:
        """Per cluster, the unit centroid of its members' placement signatures (``placement_signature``)."""
        return [unit_centroid([self.placement_signature(cid) for cid in group]) for group in self.members().values()]

    def placement(self, cid: int, train: bool, bank: Mapping[str, torch.Tensor],
                  centroids: Sequence[Mapping[str, torch.Tensor]]) -> Instruction:
        """For a client without an expert: every expert, every cluster's router and head for its label set, and
        the centroids it places itself by (``client_place``); to train that expert at once, or to be evaluated."""
        state = dict(bank)
        for k in range(self.num_experts):
            cluster = {**self.routers[k], **self.heads.get(self.head_key(cid, k), {})}
            state.update({f"cluster{k}/{key}": value for key, value in cluster.items()})
            state.update({f"centroid{k}/{key}": value for key, value in centroids[k].items()})
        extra: dict = {PLACE: self.placement_kind()}
        if self.config.allocation == "embedding":
            extra[SEND_SIGNATURE] = self.signature_blocks()
        # its upload carries its signature: another set of keys than the members' (update validation groups by it)
        return Instruction(self.layout(0), state, train=ADAPTIVE_PARTS if train else (),
                           upload=PLACED_UPLOAD if train else (), extra=extra)

    def placement_kind(self) -> str:
        """What a placed client compares: its B after one warmup call, or its data signature in the tier (the mean
        embedding or the class blocks) that decided the allocation."""
        return "lora_b" if self.config.allocation == "paper" else self.clustering.signature

    def warmup_instruction(self) -> Instruction:
        """Train and keep the client's own LoRA and head; a client's first warmup round starts from the shared
        seeded init, later ones continue what it keeps. With ``--allocation embedding`` the update carries the
        client's data signature."""
        extra = {SEND_SIGNATURE: self.signature_blocks()} if self.config.allocation == "embedding" else {}
        if enabled(self.config) and self.config.allocation == "paper":
            extra[LOCAL_NOISE] = 1
        return Instruction(PLAIN_LORA, train=WARMUP_PARTS, upload=WARMUP_PARTS, keep=WARMUP_PARTS,
                           restore=WARMUP_PARTS, extra=extra)

    def adaptive_instructions(self, cohort: Iterable[int] | None, train: bool) -> dict[int, Instruction]:
        bank = self.bank() if self.num_experts > 1 else {}  # stacked once for the whole cohort
        unplaced = [cid for cid in self.ids(cohort) if not self.has_expert(cid)]
        centroids = self.centroids() if unplaced else []
        return {cid: self.download(cid, bank) if self.has_expert(cid) else self.placement(cid, train, bank, centroids)
                for cid in self.ids(cohort)}

    def configure_train(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        if self.in_warmup(rnd):
            return {cid: self.warmup_instruction() for cid in self.ids(cohort)}
        return self.adaptive_instructions(cohort, train=True)

    def configure_evaluate(self, rnd: int, cohort: Iterable[int] | None = None) -> dict[int, Instruction]:
        if self.in_warmup(rnd):
            return {cid: Instruction(PLAIN_LORA, restore=WARMUP_PARTS) for cid in self.ids(cohort)}
        return self.adaptive_instructions(cohort, train=False)

    def keep_warmup_upload(self, cid: int, update: Update) -> None:
        if SIGNATURE in update.state:
            self.signatures[cid] = update.state[SIGNATURE]
        self.warmup_loras[cid] = {k: v for k, v in update.state.items() if k != SIGNATURE}
        if self.config.allocation == "paper":
            self.first_b.setdefault(cid, select(self.warmup_loras[cid], ("lora_B",)))

    def aggregate_train(self, rnd: int, updates: Mapping[int, Update]) -> RoundReport:
        if self.in_warmup(rnd):
            for cid, update in updates.items():
                self.keep_warmup_upload(cid, update)
            report = RoundReport("warmup", [f"warmup: {len(updates)} clients trained their own LoRA"])
            if rnd >= self.config.warmup_rounds - 1:
                self.allocate(report)
            return report
        report = RoundReport("adaptive")
        updates = dict(updates)
        sizes = self.group_sizes(self.assignment) if self.noisy is not None else {}
        if self.num_experts == 1:
            self.assignment.update(dict.fromkeys(updates, 0))
        placed = self.place({cid: u for cid, u in updates.items() if cid not in self.assignment}, report)
        for cid in placed:
            if placed[cid] is None:
                del updates[cid]
        for k, members in self.members().items():
            replied = [cid for cid in members if cid in updates]
            if not replied:
                report.log.append(f"expert {k}: no member replied (none was sampled, or none answered), kept as "
                                  f"it was")
                continue
            states = [updates[cid].state for cid in replied]
            weights = [updates[cid].num_examples for cid in replied]
            self.experts[k] = self.mean([select(s, LORA_PARTS) for s in states], weights,
                                        lambda k=k: self.experts[k], members, f"expert {k}", size=sizes.get(k))
            if self.routers:
                self.routers[k] = self.mean([select(s, ("router",)) for s in states], weights,
                                            lambda k=k: self.routers[k], members, f"router {k}", size=sizes.get(k))
        groups = self.members()
        self.heads.update(self.mean_groups(
            {cid: u.state for cid, u in updates.items()}, {cid: u.num_examples for cid, u in updates.items()},
            self.head_key, ("head",), lambda key: self.heads.get(key) or self.initial_parts(("head",)),
            lambda key: [cid for cid in groups[int(key.partition("/")[0])] if self.head_key(cid) == key],
            size_of=(lambda key: sizes.get(key)) if sizes else None))
        return report

    def group_sizes(self, placed: Mapping[int, int]) -> dict[int | str, float]:
        """Under DP, the trainable clients each expert (key k) and each head group (its ``head_key``) holds in
        expectation before the round, the group sizes its aggregates are divided by (times the sample rate):
        the clients ``placed`` before the round, and each client not placed yet, which joins the expert its
        signature picks when it is first sampled, by its chance of joining k: the share of the placed clients of
        its label set that hold k (of all placed clients where none of its label set is). Only the placements
        decide it, never who is sampled this round: counting this round's newcomers as members made an open
        federation's divisor the members so far, while the sum held every sampled newcomer's change too (at
        1,000 clients, 10% a round, about 3.7 times the expected contributors after one adaptive round)."""
        held = set(unseen_clients(self.config))
        sizes: dict[int | str, float] = defaultdict(float)
        by_labels: dict[str, Counter] = defaultdict(Counter)
        for cid, k in placed.items():
            if cid not in held:
                by_labels[label_set_key(self.clients[cid].labels)][k] += 1
        overall = sum(by_labels.values(), Counter()) or Counter({0: 1})
        for client in self.clients:
            if client.client_id in held:
                continue
            labels = label_set_key(client.labels)
            if client.client_id in placed:
                chances = {placed[client.client_id]: 1.0}
            else:
                counts = by_labels.get(labels) or overall
                chances = {k: n / sum(counts.values()) for k, n in counts.items()}
            for k, chance in chances.items():
                sizes[k] += chance
                sizes[label_set_key(client.labels, k)] += chance
        return sizes

    def secure_slots(self, rnd: int, instructions: Mapping[int, Instruction]
                     ) -> dict[int, dict[str, tuple[str, ...]]] | str:
        """Adaptive rounds: expert k and router k over cluster k; each head over its cluster's label set. Warmup
        rounds and rounds in which clients place themselves are not sums (see docs/deployment.md)."""
        if self.in_warmup(rnd):
            return ("FedLEASE's warmup uploads each client's own LoRA" +
                    (" and data signature" if self.config.allocation == "embedding" else "") +
                    ", which the allocation clusters")
        placing = sorted(cid for cid, ins in instructions.items() if PLACE in ins.extra)
        if placing:
            return (f"client(s) {placing} place themselves this round, and the server checks each one's signature "
                    f"before it averages that client's update")
        return {cid: {f"expert {self.cluster_of(cid)}": (*LORA_PARTS, "router"),
                      f"head {self.head_key(cid)}": ("head",)} for cid in instructions}

    def place(self, joiners: Mapping[int, Update], report: RoundReport) -> dict[int, int | None]:
        """Assign each client that placed itself this round, by the signature it uploaded against the centroids it
        was sent (those of the members before this round's placements). Returns client -> its expert, or None
        where the client trained another expert than the server computes (its update is then left out)."""
        if not joiners:
            return {}
        centroids = self.centroids()
        placed: dict[int, int | None] = {}
        for cid, update in sorted(joiners.items()):
            signature = self.uploaded_signature(cid, update.state)
            distance = distances_to_centroids(signature, centroids)
            k = nearest_cluster(distance)
            self.assignment[cid] = k
            trained = update.metrics.get("expert")
            placed[cid] = k if trained == k else None
            note = "" if trained == k else f"; it trained expert {trained}, so its update is left out this round"
            report.log.append(f"client {cid} placed: expert {k} (mean {self.placement_kind()} distance "
                              f"{distance[k]:.4f} to its members){note}")
        return placed

    def uploaded_signature(self, cid: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Take a placed client's signature out of its upload, keep it, and return it in placement form."""
        if self.config.allocation == "paper":
            self.first_b[cid] = {f"{site}.lora_B": b for site, b in prefixed(state, PLACED_B).items()}
        else:
            self.signatures[cid] = state[SIGNATURE]
        return self.placement_signature(cid)

    @functools.cached_property
    def blocks(self) -> int:
        return max(max(len(c.labels), 1) for c in self.clients)

    def signature_blocks(self) -> int:
        """The data signature's number of class blocks: the largest label set of the federation, so every
        client's signature has one shape (update validation fixes a key's shape by the majority of a round's
        uploads). Computed once: placement compares every member's signature each round, and this was a pass
        over the whole federation for each of them."""
        return self.blocks

    def placement_signature(self, cid: int) -> dict[str, torch.Tensor]:
        """What placement compares: B after the client's first warmup call, or its data signature as the
        allocation compared it (its mean embedding, the sum of the class blocks, where that tier decided)."""
        if self.config.allocation == "paper":
            return self.first_b[cid]
        return {"embedding": placement_form(self.signatures[cid], self.placement_kind(), self.signature_blocks())}

    def delivered(self, cid: int) -> bool:
        return cid in self.warmup_loras and (self.config.allocation == "paper" or cid in self.signatures)

    def allocate(self, report: RoundReport) -> None:
        """Cluster the clients whose warmup upload arrived, pick K, and build experts, routers and heads from
        the members. The others are placed when they are next sampled (``placement``)."""
        clients = [cid for cid in sorted(self.warmup_loras) if self.delivered(cid)]
        if not clients:
            report.log.append("allocation postponed: no client has delivered a warmup upload yet; warmup goes on")
            return
        missing = len(self.clients) - len(clients)
        if missing:
            report.log.append(f"allocation over the {len(clients)} clients that warmed up; the other {missing} "
                              f"are placed by their signature when they are next sampled")
        config = self.config
        if config.allocation == "paper":
            result = cluster_clients_by_lora_b([select(self.warmup_loras[cid], ("lora_B",)) for cid in clients],
                                               config.max_clusters, fixed_clusters=config.num_experts)
        else:
            signatures = [self.signatures[cid] for cid in clients]
            result = cluster_clients_by_embedding(signatures, config.max_clusters, config.num_experts,
                                                  config.min_silhouette,
                                                  block_size=signatures[0].numel() // self.signature_blocks())
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
        self.experts = [self.starting_mean([select(self.warmup_loras[cid], LORA_PARTS) for cid in members],
                                           LORA_PARTS, f"warmup expert {k}")
                        for k, members in result.members().items()]
        self.routers = []
        if result.num_clusters > 1:
            slots = self.layout(0).num_slots
            router = {}
            for key, value in self.experts[0].items():
                if key.endswith(".lora_A"):
                    site = key.removesuffix(".lora_A")
                    router[f"{site}.router"] = init_router(value.shape[1], slots, self.config.seed, site)
            self.routers = [dict(router) for _ in range(result.num_clusters)]
        groups: dict[str, list[int]] = {}
        for cid in clients:
            groups.setdefault(self.head_key(cid), []).append(cid)
        self.heads.update({key: self.starting_mean([select(self.warmup_loras[cid], ("head",)) for cid in members],
                                                   ("head",), f"warmup head {key}")
                           for key, members in groups.items()})

    def starting_mean(self, states: list[dict[str, torch.Tensor]], parts: tuple[str, ...],
                      name: str) -> dict[str, torch.Tensor]:
        """An expert's or head's starting value: the mean of its members' warmup uploads. Under client-level DP
        with the paper's allocation those were noised by each client (the allocation needs each one), so their
        mean needs no more noise; with the embedding allocation they are clipped changes from the seeded initial
        state, which the server keeps to itself and releases only as this mean, noised at noise x clip on the
        sum (the ``warmup`` release of ``privacy_plan``): a client-side noise of that size on each upload left
        a mean of m of them with sqrt(m) times the noise, and a 1,000-client run's one expert started from noise
        larger than the encoder's own weights."""
        if self.noisy is None or self.config.allocation == "paper":
            return average_states(states, [1.0] * len(states))
        return self.noisy.mean(states, self.initial_parts(parts), float(len(states)), name)

    # -- client half --------------------------------------------------------------------------------------
    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        """With the embedding allocation, every warmup upload carries the client's data signature, computed once
        and kept in the client's store (a client that missed rounds still delivers it). A client without an
        expert places itself first and uploads its signature with what it trained."""
        if PLACE in ins.extra:
            start = time.perf_counter()
            k, signature = self.client_place(client, ins, rnd, store)
            placing = time.perf_counter() - start
            metrics = client.fit(ins.train, seed=derive_seed(self.config.seed, "train", rnd, client.client_id))
            return Update({**client.state(ins.train), **signature}, client.num_train,
                          {**metrics, "expert": k, PLACEMENT_SECONDS: placing})
        blocks = int(ins.extra.get(SEND_SIGNATURE, 0))
        if blocks:
            self.keep_signature(client, store, blocks)
        update = super().client_train(client, ins, rnd, store)
        if blocks:
            update.state[SIGNATURE] = store[SIGNATURE]
        return update

    def client_evaluate(self, client: LocalClient, ins: Instruction, rnd: int,
                        store: dict[str, torch.Tensor]) -> dict[str, float]:
        if PLACE in ins.extra:
            k, _ = self.client_place(client, ins, rnd, store)
            return {**client.evaluate(), "expert": k}
        return super().client_evaluate(client, ins, rnd, store)

    def client_place(self, client: LocalClient, ins: Instruction, rnd: int, store: dict[str, torch.Tensor]
                     ) -> tuple[int, dict[str, torch.Tensor]]:
        """Choose the nearest cluster by the client's own signature (computed here; nothing leaves but what the
        upload carries), and load that cluster's model. Returns the cluster and the signature to upload."""
        kind = str(ins.extra[PLACE])
        if kind == "lora_b":  # one local warmup call from the shared init, as the members' first call was
            client.apply(PLAIN_LORA, client.adapted.initial_state(self.config.seed))
            client.fit(WARMUP_PARTS, seed=derive_seed(self.config.seed, "placement", client.client_id))
            compared = client.state(("lora_B",))
            if enabled(self.config):  # a release of this client alone, as its warmup upload would be
                compared = self.noised(compared, select(client.adapted.initial_state(self.config.seed),
                                                        ("lora_B",)), store, "dp-placement")
            upload = {PLACED_B + key.removesuffix(".lora_B"): value for key, value in compared.items()}
        else:
            blocks = int(ins.extra[SEND_SIGNATURE])
            self.keep_signature(client, store, blocks)
            upload = {SIGNATURE: store[SIGNATURE]}
            compared = {"embedding": placement_form(store[SIGNATURE], kind, blocks)}
        centroids = [prefixed(ins.state, f"centroid{j}/") for j in range(ins.layout.num_experts)]
        k = nearest_cluster(distances_to_centroids(compared, centroids))
        chosen = {**{key: v for key, v in ins.state.items() if "/" not in key}, **prefixed(ins.state, f"cluster{k}/")}
        self.load(client, Instruction(replace(ins.layout, own_expert=k), chosen), store)
        return k, upload


    def keep_signature(self, client: LocalClient, store: dict[str, torch.Tensor], blocks: int) -> None:
        """Compute the client's data signature once and keep it in its store. Under DP every example's embedding
        is clipped to norm 1 first, so the signature (a mean of them) has norm at most 1, and Gaussian noise of
        standard deviation sigma is added once: what the store keeps, and every upload repeats, is that release.
        Under record-level DP the signature is the sum of the clipped embeddings (class by class) divided by the
        client's example count n, which is public there (its Poisson rate is batch / n): one example moves it by at
        most 1/n, so the noise has standard deviation sigma / n, sigma the client's DP-SGD noise multiplier, and
        the release is charged once in the client's accountant (``record_releases``)."""
        if SIGNATURE in store:
            return
        private = enabled(self.config)
        record = record_level(self.config)
        signature = data_signature(client, self.config.seed, blocks, clip_examples=private or record)
        if private:
            signature = self.noised({"s": signature}, {}, store, "dp-signature", sensitivity=1.0)["s"]
        elif record:
            # within a round's training the client's DP-SGD charges it; an evaluation-only placement (whose store
            # is not kept) noises it the same way, without a charge: it never leaves the client
            dp = client.record or record_dp.session(self.config, dict(store), client.num_train,
                                                    client_secret(store), self.local_calls,
                                                    self.record_releases(self.config))
            signature = add_noise({"s": signature}, ["s"], dp.noise / client.num_train,
                                  derive_seed(client_secret(store), "dp-record-signature"))["s"]
            if client.record is not None:
                client.record.released()
        store[SIGNATURE] = signature

    def noised(self, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
               store: dict[str, torch.Tensor], purpose: str, sensitivity: float | None = None
               ) -> dict[str, torch.Tensor]:
        """A client's own release under DP: its change against ``reference`` clipped to --dp_clip (a state with no
        reference: its norm is already at most ``sensitivity``) plus Gaussian noise of standard deviation
        sigma x that bound, from the client's own secret seed."""
        bound = sensitivity if sensitivity is not None else self.config.dp_clip
        if reference:
            state, _ = clip_change(state, reference, bound)
        std = noise_multiplier(self.config, self.privacy_plan(self.config)) * bound
        return add_noise(state, list(state), std, derive_seed(client_secret(store), purpose))


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, without it."""
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def placement_form(signature: torch.Tensor, kind: str, blocks: int) -> torch.Tensor:
    """The data signature as the allocation compared it: the mean embedding (the sum of its class blocks) where
    that tier decided, else the class blocks."""
    return signature_mean(signature, signature.numel() // blocks) if kind == "embedding_mean" else signature


def data_signature(client: LocalClient, seed: int, blocks: int = 1, clip_examples: bool = False) -> torch.Tensor:
    """The client's data, class by class, in the frozen encoder's embedding (``LocalClient.embed``; a sentence
    embedding with a bi-encoder): block c is the client's share of class c times the mean embedding of its examples
    of class c, the blocks flattened into one vector (``blocks`` x hidden, zero blocks beyond the client's classes;
    a free-text task has one class). The
    blocks sum to the mean embedding of all its examples, so clients of different tasks differ as their data do,
    and clients of one task with different label mixes put their weight in different blocks. The shared initial
    LoRA has B = 0, so with it loaded the model is the frozen encoder."""
    client.apply(PLAIN_LORA, client.adapted.initial_state(seed))
    embeddings = client.embed(client.train_data)
    if clip_examples:  # each example's embedding to L2 norm at most 1 (differential privacy's per-example bound)
        embeddings = embeddings / embeddings.norm(dim=1, keepdim=True).clamp(min=1.0)
    labels = client.train_data.labels
    signature = torch.zeros(max(blocks, client.spec.num_classes), embeddings.shape[1])
    for c in labels.unique().tolist():
        chosen = labels == c
        signature[c] = chosen.float().mean() * embeddings[chosen].mean(0)
    return signature.reshape(-1)
