"""Allocation: B-distance, planted groups recovered with their K, and the edge cases of K."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlease.clustering import canonical_labels, cluster_clients_by_lora_b, lora_b_distances

SITES = ("layer.0.query", "layer.0.value", "layer.1.query")


def planted(groups: list[int], noise: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Clients whose B matrices are their group's direction plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = {k: {s: torch.randn(24, 4, generator=g) for s in SITES} for k in set(groups)}
    return [{s: centres[k][s] + noise * torch.randn(24, 4, generator=g) for s in SITES} for k in groups]


def test_distance_is_mean_over_sites_of_one_minus_cosine():
    b = torch.randn(6, 2)
    clients = [{"a": b, "b": b}, {"a": 3 * b, "b": -b}, {"a": torch.zeros(6, 2), "b": b}]
    d = lora_b_distances(clients)
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
