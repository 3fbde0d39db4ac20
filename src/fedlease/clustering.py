"""How many experts, and which clients share one: FedLEASE's allocation step (Sec. 3.2 of the paper).

Two allocations, chosen with ``--allocation``:

- ``paper``: clients are compared by their warmup LoRA B matrices only (B carries the task; A stays near its
  shared random init): for every adapted site l, d_l(i, j) = 1 - cos(vec B_i^l, vec B_j^l), and d(i, j) is the
  mean over sites. Average-linkage agglomerative clustering on d is run for every K in 2..min(max_clusters,
  N-1), and K is the one with the best silhouette score (ties go to the smaller K). K = 1 is never chosen.
  This is the paper and its released code, exactly.
- ``embedding``: clients are compared by a data signature, the frozen encoder's mean-pooled embeddings of their
  training examples averaged per class and weighted by the client's class shares
  (``fedlease.methods.fedlease.data_signature``), with the same cosine distance, linkage and silhouette search; and
  K = 1 when even the best silhouette is below ``--min_silhouette`` (no cluster structure worth an expert).
  It compares two tiers of the signature: first the mean embedding (the sum of its class blocks), which tells
  tasks apart; only where that finds no structure (K = 1, e.g. one task over all clients) the class blocks,
  which tell label mixes of one task apart. The class blocks alone split clients of several tasks by their
  label mix under label skew (measured: ARI 0.24 against the tasks where the mean gives 1.0). At small data
  sizes the warmup B matrices are dominated by sampling and training noise and find no tasks
  (benchmarks/results/details.md, "Allocation"); the data signature finds them at every size measured.

Davies-Bouldin on a 2-D classical-MDS embedding is computed and reported, as the released code does, but does
not decide.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from sklearn.manifold import ClassicalMDS
from sklearn.metrics import davies_bouldin_score, silhouette_score


@dataclass
class ClusteringResult:
    num_clusters: int
    labels: list[int]  # cluster of each client; clusters are numbered by their first client
    distances: np.ndarray  # (N, N) mean B-cosine distance
    reason: str  # how K was decided, for the log
    silhouette: dict[int, float] = field(default_factory=dict)
    davies_bouldin: dict[int, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None  # (N, 2) classical MDS of the distances
    signature: str = "lora_b"  # what the distances compare: "lora_b", "embedding_mean" or "embedding"
    clients: list[int] | None = None  # the client id of each row, where not every client was clustered

    def client_ids(self) -> list[int]:
        return list(range(len(self.labels))) if self.clients is None else list(self.clients)

    def members(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {k: [] for k in range(self.num_clusters)}
        for client, k in zip(self.client_ids(), self.labels, strict=True):
            groups[k].append(client)
        return groups

    def to_dict(self) -> dict:
        return {
            "num_clusters": self.num_clusters,
            "labels": self.labels,
            "reason": self.reason,
            "silhouette": {str(k): v for k, v in self.silhouette.items()},
            "davies_bouldin": {str(k): v for k, v in self.davies_bouldin.items()},
            "distances": self.distances.round(6).tolist(),
            "embedding": None if self.embedding is None else self.embedding.round(6).tolist(),
            "signature": self.signature,
            "clients": self.client_ids(),
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> ClusteringResult:
        return cls(int(values["num_clusters"]), [int(x) for x in values["labels"]], np.array(values["distances"]),
                   values["reason"], {int(k): v for k, v in values["silhouette"].items()},
                   {int(k): v for k, v in values["davies_bouldin"].items()},
                   None if values["embedding"] is None else np.array(values["embedding"]),
                   values.get("signature", "lora_b"), values.get("clients"))


def cosine_distances(signatures: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Mean over the named tensors (e.g. the B matrix of every site) of 1 - cosine similarity of the flattened
    tensors, for every pair of clients; a shorter tensor is zero-padded (data signatures of tasks with fewer
    classes)."""
    sites = sorted(signatures[0])
    n = len(signatures)
    total = torch.zeros(n, n, dtype=torch.float64)
    for site in sites:
        flats = [b[site].reshape(-1).double() for b in signatures]
        width = max(len(f) for f in flats)
        flat = torch.stack([F.pad(f, (0, width - len(f))) for f in flats])  # (N, d)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        total += 1.0 - unit @ unit.t()
    distances = (total / len(sites)).clamp_min(0.0).numpy()
    np.fill_diagonal(distances, 0.0)
    return (distances + distances.T) / 2  # exact symmetry for the precomputed-metric estimators


def unit_centroid(signatures: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per named tensor, the mean of the members' unit-normalised flattened tensors. For a unit vector u,
    1 - u . centroid is the mean of 1 - cos(u, member) over the members: the mean distance average linkage uses,
    computed from one vector per cluster instead of every member's signature."""
    centroid = {}
    for site in sorted(signatures[0]):
        flat = torch.stack([s[site].reshape(-1).double() for s in signatures])
        centroid[site] = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)
    return centroid


def distances_to_centroids(signature: Mapping[str, torch.Tensor], centroids: Sequence[Mapping[str, torch.Tensor]]
                           ) -> list[float]:
    """The mean cosine distance (as ``cosine_distances``) of ``signature`` to each cluster's members, from the
    clusters' ``unit_centroid``s."""
    distances = []
    for centroid in centroids:
        total = 0.0
        for site, center in centroid.items():
            flat = signature[site].reshape(-1).double()
            total += 1.0 - float(flat @ center) / max(float(flat.norm()), 1e-12)
        distances.append(max(total / len(centroid), 0.0))
    return distances


def nearest_cluster(distances: Sequence[float]) -> int:
    """The cluster at the smallest distance; a tie goes to the lower number."""
    return min(range(len(distances)), key=lambda k: (distances[k], k))


def canonical_labels(labels: Sequence[int]) -> list[int]:
    """Renumber clusters in order of their first client, so the numbering does not depend on the estimator."""
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in labels]


def agglomerative(distances: np.ndarray, k: int) -> list[int]:
    model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
    return canonical_labels(model.fit_predict(distances))


def classical_mds(distances: np.ndarray) -> np.ndarray:
    """A 2-D classical MDS of ``distances``. A dimension whose eigenvalue is not positive (e.g. two identical
    clients among three) has no real coordinate: scikit-learn returns NaN there, and the standard is 0."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in sqrt", RuntimeWarning)
        embedding = ClassicalMDS(n_components=2, metric="precomputed").fit_transform(distances)
    return np.nan_to_num(embedding, nan=0.0)


def cluster_clients_by_lora_b(b_matrices: Sequence[Mapping[str, torch.Tensor]], max_clusters: int,
                              fixed_clusters: int | None = None) -> ClusteringResult:
    """The paper's allocation: B-cosine distances, K by silhouette over 2..max_clusters (never 1)."""
    return cluster_clients(cosine_distances(b_matrices), max_clusters, fixed_clusters, signature="lora_b")


def signature_mean(signature: torch.Tensor, block_size: int) -> torch.Tensor:
    """The mean embedding of a class-block data signature: the sum of its blocks of ``block_size``."""
    return signature.reshape(-1, block_size).sum(0)


def cluster_clients_by_embedding(embeddings: Sequence[torch.Tensor], max_clusters: int,
                                 fixed_clusters: int | None = None, min_silhouette: float = 0.25,
                                 block_size: int | None = None) -> ClusteringResult:
    """Clients compared by their data signatures; K = 1 when the best silhouette is below ``min_silhouette``.
    With ``block_size`` (the width of one class block of class-block signatures): by the mean embedding (the sum
    of the blocks) first, and by the class blocks only where the mean finds one expert (``signature`` says which
    decided: ``embedding_mean`` or ``embedding``). ``fixed_clusters`` fixes K only: the tier is chosen as without
    it, so fixing K at the K the silhouette would choose reproduces the automatic allocation."""
    if block_size is not None:
        means = [signature_mean(e, block_size) for e in embeddings]
        mean_distances = cosine_distances([{"embedding": m} for m in means])
        by_mean = cluster_clients(mean_distances, max_clusters, None, min_silhouette, signature="embedding_mean")
        if by_mean.num_clusters > 1:
            return by_mean if fixed_clusters is None else cluster_clients(
                mean_distances, max_clusters, fixed_clusters, min_silhouette, signature="embedding_mean")
    distances = cosine_distances([{"embedding": e} for e in embeddings])
    return cluster_clients(distances, max_clusters, fixed_clusters, min_silhouette, signature="embedding")


def cluster_clients(distances: np.ndarray, max_clusters: int, fixed_clusters: int | None = None,
                    min_silhouette: float | None = None, signature: str = "lora_b") -> ClusteringResult:
    """Choose the number of experts and assign clients to them from pairwise ``distances``
    (``fixed_clusters`` skips the choice; ``min_silhouette`` None never chooses K = 1, as the paper)."""
    n = len(distances)
    embedding = classical_mds(distances) if n >= 3 else None
    candidates = range(2, min(max_clusters, n - 1) + 1)
    silhouette: dict[int, float] = {}
    davies_bouldin: dict[int, float] = {}
    labelings: dict[int, list[int]] = {}
    for k in candidates:
        labelings[k] = agglomerative(distances, k)
        silhouette[k] = float(silhouette_score(distances, labelings[k], metric="precomputed"))
        davies_bouldin[k] = float(davies_bouldin_score(embedding, labelings[k]))

    def result(k: int, labels: list[int], reason: str) -> ClusteringResult:
        return ClusteringResult(k, labels, distances, reason, silhouette, davies_bouldin, embedding, signature)

    if fixed_clusters is not None:
        k = min(fixed_clusters, n)
        labels = [0] if n == 1 else labelings.get(k) or agglomerative(distances, k)
        return result(k, labels, f"fixed at {k} by --num_experts")
    if n == 1 or max_clusters == 1:
        return result(1, [0] * n, "one expert: " + ("a single client" if n == 1 else "--max_clusters 1"))
    if n == 2:
        return result(2, [0, 1], "two clients: the silhouette is undefined, so each client gets its own expert")
    best = max(candidates, key=lambda k: (silhouette[k], -k))  # ties go to the smaller K
    capped = " (K capped at clients-1)" if max_clusters > n - 1 else ""
    searched = f"best silhouette {silhouette[best]:.4f} over K={candidates.start}..{candidates.stop - 1}{capped}"
    if min_silhouette is not None and silhouette[best] < min_silhouette:
        return result(1, [0] * n, f"one expert: {searched} is below --min_silhouette {min_silhouette:g}")
    return result(best, labelings[best], searched)
