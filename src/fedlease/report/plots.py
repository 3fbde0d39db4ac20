"""PNG plots of a run: the clustering decision and the metrics over rounds.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so no GUI backend or global state
is touched and plotting is safe in any process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import dendrogram, linkage
from scipy.spatial.distance import squareform


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_dendrogram(distances: np.ndarray, names: Sequence[str], path: Path, what: str) -> None:
    fig = Figure(figsize=(max(6, 0.5 * len(names)), 5))
    ax = fig.add_subplot()
    dendrogram(linkage(squareform(distances, checks=False), method="average"), labels=list(names),
               leaf_rotation=90, ax=ax)
    ax.set_title(f"Clients by {what} similarity (average linkage)")
    ax.set_ylabel(f"1 - cosine ({what})")
    _save(fig, path)


def plot_distance_heatmap(distances: np.ndarray, names: Sequence[str], path: Path, what: str) -> None:
    size = max(5, 0.45 * len(names))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    # Scale colours to the off-diagonal range: the zero diagonal would otherwise flatten the block structure.
    off = distances[~np.eye(len(distances), dtype=bool)]
    image = ax.imshow(distances, cmap="viridis", vmin=off.min() if off.size else 0, vmax=off.max() if off.size else 1)
    fig.colorbar(image, ax=ax, label=f"1 - cosine ({what})")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{what} distance between clients")
    _save(fig, path)


def plot_cluster_scores(silhouette: Mapping[int, float], davies_bouldin: Mapping[int, float], chosen: int,
                        path: Path) -> None:
    fig = Figure(figsize=(9, 4))
    left, right = fig.subplots(1, 2)
    ks = sorted(silhouette)
    left.plot(ks, [silhouette[k] for k in ks], "o-")
    left.axvline(chosen, color="grey", linestyle="--", label=f"chosen K={chosen}")
    left.set(xlabel="K (experts)", ylabel="silhouette (higher is better)", title="Silhouette vs K")
    left.legend()
    right.plot(ks, [davies_bouldin[k] for k in ks], "o-", color="tab:red")
    right.set(xlabel="K (experts)", ylabel="Davies-Bouldin on 2-D MDS (lower is better)",
              title="Davies-Bouldin vs K (reported only)")
    for ax in (left, right):
        ax.set_xticks(ks)
        ax.grid(True, alpha=0.3)
    _save(fig, path)


def plot_embedding(embedding: np.ndarray, clusters: Sequence[int], tasks: Sequence[str], path: Path,
                   what: str) -> None:
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    markers = "osD^v<>ph*"
    task_names = sorted(set(tasks))
    for cid, ((x, y), cluster, task) in enumerate(zip(embedding, clusters, tasks, strict=True)):
        ax.scatter(x, y, s=90, color=f"C{cluster % 10}", marker=markers[task_names.index(task) % len(markers)])
        ax.annotate(str(cid), (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    for k in sorted(set(clusters)):
        ax.scatter([], [], color=f"C{k % 10}", label=f"expert {k}")
    for i, task in enumerate(task_names):
        ax.scatter([], [], color="black", marker=markers[i % len(markers)], label=task)
    ax.legend(fontsize=8)
    ax.set(title=f"Clients in 2-D (classical MDS of {what} distances)", xlabel="dimension 1", ylabel="dimension 2")
    _save(fig, path)


def plot_metric_by_round(rounds: Sequence[int], by_task: Mapping[str, Sequence[float]], metric: str,
                         warmup_rounds: int, path: Path) -> None:
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for task, values in by_task.items():
        ax.plot(rounds, values, "o-", markersize=3, label=task)
    if 0 < warmup_rounds < max(rounds, default=0):
        ax.axvline(warmup_rounds + 0.5, color="grey", linestyle="--", label="end of warmup")
    ax.set(xlabel="round", ylabel=metric, title=f"Per-task {metric} (mean over the task's clients)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
