"""Allocation: B-distance, planted groups recovered with their K, the edge cases of K, and the embedding
allocation's K = 1 when there is no structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlease.clustering import (
    canonical_labels,
    cluster_clients_by_embedding,
    cluster_clients_by_lora_b,
    cosine_distances,
)

SITES = ("layer.0.query", "layer.0.value", "layer.1.query")


def planted(groups: list[int], noise: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Clients whose B matrices are their group's direction plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = {k: {s: torch.randn(24, 4, generator=g) for s in SITES} for k in set(groups)}
    return [{s: centres[k][s] + noise * torch.randn(24, 4, generator=g) for s in SITES} for k in groups]


def test_distance_is_mean_over_sites_of_one_minus_cosine():
    b = torch.randn(6, 2)
    clients = [{"a": b, "b": b}, {"a": 3 * b, "b": -b}, {"a": torch.zeros(6, 2), "b": b}]
    d = cosine_distances(clients)
    # identical direction on site a (0) and opposite on site b (2): mean 1
    assert d[0, 1] == pytest.approx(1.0)
    # a zero B has cosine 0 with anything: site a gives 1, site b gives 0
    assert d[0, 2] == pytest.approx(0.5)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)


@pytest.mark.parametrize("groups", [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], [0, 1, 0, 1, 2, 2],
                                    [0, 0, 1, 1, 1, 2, 2, 2]])
def test_planted_groups_are_recovered_with_their_k(groups):
    k = len(set(groups))
    result = cluster_clients_by_lora_b(planted(groups, noise=0.4), max_clusters=8)
    assert result.num_clusters == k
    assert result.labels == canonical_labels(groups)
    assert max(result.silhouette, key=result.silhouette.get) == k
    assert set(result.silhouette) == set(range(2, min(8, len(groups) - 1) + 1))
    assert result.embedding.shape == (len(groups), 2)


def test_k_is_capped_by_max_clusters():
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    result = cluster_clients_by_lora_b(planted(groups, noise=0.3), max_clusters=2)
    assert result.num_clusters == 2
    assert set(result.silhouette) == {2}


def test_edge_cases_of_k():
    one = cluster_clients_by_lora_b(planted([0], 0.1), max_clusters=4)
    assert (one.num_clusters, one.labels) == (1, [0])
    two = cluster_clients_by_lora_b(planted([0, 1], 0.1), max_clusters=4)
    assert (two.num_clusters, two.labels) == (2, [0, 1])
    assert "silhouette is undefined" in two.reason
    single = cluster_clients_by_lora_b(planted([0, 0, 1, 1], 0.1), max_clusters=1)
    assert (single.num_clusters, single.labels) == (1, [0, 0, 0, 0])
    three = cluster_clients_by_lora_b(planted([0, 0, 1], 0.1), max_clusters=4)
    assert three.num_clusters == 2 and "capped" in three.reason


def test_ties_go_to_the_smaller_k():
    # Four identical clients in two exact copies: K=2 has silhouette 1; K=3 cannot beat it.
    base = planted([0, 1], noise=0.0)
    result = cluster_clients_by_lora_b([base[0], base[0], base[1], base[1]], max_clusters=3)
    assert result.num_clusters == 2


def test_fixed_number_of_clusters():
    groups = [0, 0, 1, 1, 2, 2]
    result = cluster_clients_by_lora_b(planted(groups, 0.3), max_clusters=4, fixed_clusters=6)
    assert result.num_clusters == 6 and result.labels == list(range(6))
    result = cluster_clients_by_lora_b(planted(groups, 0.3), max_clusters=4, fixed_clusters=3)
    assert result.labels == [0, 0, 1, 1, 2, 2]


def planted_embeddings(groups: list[int], noise: float, seed: int = 0) -> list[torch.Tensor]:
    """Mean embeddings that share a large common component (as real sentence embeddings do), plus a group
    direction and per-client noise."""
    g = torch.Generator().manual_seed(seed)
    common = 5 * torch.randn(64, generator=g)
    centres = {k: torch.randn(64, generator=g) for k in set(groups)}
    return [common + centres[k] + noise * torch.randn(64, generator=g) for k in groups]


@pytest.mark.parametrize("groups", [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 2, 2, 2]])
def test_embedding_allocation_recovers_planted_groups(groups):
    result = cluster_clients_by_embedding(planted_embeddings(groups, noise=0.2), max_clusters=4)
    assert result.num_clusters == len(set(groups))
    assert result.labels == canonical_labels(groups)
    assert result.signature == "embedding"


@pytest.mark.parametrize("seed", range(5))
def test_embedding_allocation_chooses_one_expert_without_structure(seed):
    # every client draws from the same distribution: the best silhouette is low, so K = 1
    result = cluster_clients_by_embedding(planted_embeddings([0] * 8, noise=1.0, seed=seed), max_clusters=4)
    assert result.num_clusters == 1 and result.labels == [0] * 8
    assert max(result.silhouette.values()) < 0.25 and "below --min_silhouette" in result.reason
    # the paper's rule on the same distances never chooses K = 1
    paper = cluster_clients_by_lora_b([{"e": e} for e in planted_embeddings([0] * 8, 1.0, seed)], max_clusters=4)
    assert paper.num_clusters >= 2


def test_min_silhouette_is_the_threshold():
    embeddings = planted_embeddings([0, 0, 1, 1, 2, 2], noise=0.2)
    found = cluster_clients_by_embedding(embeddings, max_clusters=4)
    best = max(found.silhouette.values())
    assert cluster_clients_by_embedding(embeddings, 4, min_silhouette=best - 1e-6).num_clusters == 3
    assert cluster_clients_by_embedding(embeddings, 4, min_silhouette=best + 1e-6).num_clusters == 1
    # --num_experts overrides the choice, K = 1 included
    assert cluster_clients_by_embedding(embeddings, 4, fixed_clusters=2, min_silhouette=1.0).num_clusters == 2


def test_two_identical_clients_among_three_do_not_break_the_2d_embedding():
    same = torch.ones(8)
    result = cluster_clients_by_embedding([same, same.clone(), torch.arange(8.0)], max_clusters=4)
    assert np.isfinite(result.embedding).all() and result.labels == [0, 0, 1]


def test_label_mix_separates_clients_of_one_task_and_signatures_of_other_widths_are_padded():
    """Class-block data signatures: the same class centroids, opposite label mixes -> two experts; the same mix
    -> one; a task with three classes (a longer signature) is compared with zero padding."""
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(2, 16, generator=g) + 3.0

    def signature(share: float) -> torch.Tensor:  # share of class 1
        noise = torch.randn(2, 16, generator=g) * 0.05
        return torch.cat([(1 - share) * (centroids[0] + noise[0]), share * (centroids[1] + noise[1])])

    skewed = cluster_clients_by_embedding([signature(p) for p in (0.9, 0.95, 0.85, 0.1, 0.05, 0.15)], 4)
    assert skewed.num_clusters == 2 and skewed.labels[:3] == [skewed.labels[0]] * 3 != skewed.labels[3:]
    same = cluster_clients_by_embedding([signature(0.5) for _ in range(6)], 4)
    assert same.num_clusters == 1
    other_task = torch.cat([torch.randn(16, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g)])
    mixed = cluster_clients_by_embedding([signature(0.5), signature(0.5), other_task, other_task * 1.01], 4)
    assert mixed.num_clusters == 2 and mixed.labels[0] == mixed.labels[1] != mixed.labels[2] == mixed.labels[3]


def test_tasks_decide_before_label_mixes():
    """Two tasks, each over four clients with skewed label mixes: the class blocks alone group clients by label
    mix across the tasks; the two tiers (the mean embedding first) find the tasks. One task: the mean sees no
    structure, and the class blocks split the label mixes. The same mix everywhere: one expert."""
    g = torch.Generator().manual_seed(1)
    DIM = 128  # noqa: N806 -- many dimensions, as sentence embeddings have: noise alone forms no clusters
    common = 4.0 * torch.randn(DIM, generator=g)  # sentence embeddings share a large component
    tasks = [common + torch.randn(DIM, generator=g) for _ in range(2)]
    classes = [[task + 0.2 * torch.randn(DIM, generator=g) for _ in range(2)] for task in tasks]  # within a task: close

    def signature(task: int, share: float) -> torch.Tensor:  # share of class 1
        noise = [0.05 * torch.randn(DIM, generator=g) for _ in range(2)]
        return torch.cat([(1 - share) * (classes[task][0] + noise[0]), share * (classes[task][1] + noise[1])])

    shares = (0.95, 0.05, 0.9, 0.1)
    skewed = [signature(task, p) for task in (0, 1) for p in shares]
    blocks_only = cluster_clients_by_embedding(skewed, 4)
    assert blocks_only.labels[:4] != [blocks_only.labels[0]] * 4  # split by label mix, not by task
    tiers = cluster_clients_by_embedding(skewed, 4, block_size=DIM)
    assert tiers.labels == [0, 0, 0, 0, 1, 1, 1, 1] and tiers.signature == "embedding_mean"
    # one task whose label hardly shows in the mean embedding (as QNLI's: the relation of two texts)
    classes.append([tasks[0] + 0.01 * torch.randn(DIM, generator=g) for _ in range(2)])
    one_task = cluster_clients_by_embedding([signature(2, p) for p in shares * 2], 4, block_size=DIM)
    assert one_task.signature == "embedding" and one_task.num_clusters == 2
    assert one_task.labels == [0, 1, 0, 1, 0, 1, 0, 1]  # the high and the low share of class 1
    iid = cluster_clients_by_embedding([signature(0, 0.5) for _ in range(8)], 4, block_size=DIM)
    assert iid.num_clusters == 1
    # --num_experts fixes K, not the tier: fixed at the K chosen, every case above gives the same allocation
    # (before 2026-12-02 a fixed K always used the mean, which splits the one-task clients at random)
    cases = {"tasks": skewed, "label mixes": [signature(2, p) for p in shares * 2],
             "iid": [signature(0, 0.5) for _ in range(8)]}
    for name, signatures in cases.items():
        chosen = cluster_clients_by_embedding(signatures, 4, block_size=DIM)
        fixed = cluster_clients_by_embedding(signatures, 4, fixed_clusters=chosen.num_clusters, block_size=DIM)
        assert (fixed.labels, fixed.signature) == (chosen.labels, chosen.signature), name
