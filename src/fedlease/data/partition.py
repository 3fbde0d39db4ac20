"""Split tasks into client datasets.

``balanced`` (the paper): each client of a task gets ``train_samples`` training examples drawn from the task's
train split and ``test_samples`` test examples drawn from its validation split, class-balanced, and the clients
of one task get disjoint examples (``0``, "all": the task's whole split, shared evenly among its clients in a
seeded random order, without class balancing). ``dirichlet``: each client's class proportions are drawn from
Dir(alpha) (label skew); its test split follows the same proportions. When a class has too few examples for disjoint
slices the partition stops with a message, unless ``allow_overlap`` (then slices wrap around and reuse
examples, and the result says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlease.data.tasks import Example, TaskData
from fedlease.errors import DataError
from fedlease.seeding import derive_seed


@dataclass(frozen=True)
class ClientSplit:
    client_id: int
    task: str
    train: list[Example]
    test: list[Example]
    reused: int  # examples this client took that an earlier slice already holds; 0 when disjoint


def balanced_counts(total: int, num_classes: int, offset: int) -> np.ndarray:
    """``total`` split evenly over classes; the remainder goes to classes starting at ``offset``."""
    counts = np.full(num_classes, total // num_classes)
    for j in range(total % num_classes):
        counts[(offset + j) % num_classes] += 1
    return counts


def dirichlet_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``total * proportions``: the counts sum to ``total`` exactly."""
    raw = total * proportions
    counts = np.floor(raw).astype(int)
    for idx in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[idx] += 1
    return counts


class _ClassPools:
    """Per-class example indices of one split, shuffled once, handed out in consecutive slices."""

    def __init__(self, examples: list[Example], num_classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        labels = np.fromiter((ex.label for ex in examples), dtype=np.int64, count=len(examples))
        self.pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
        self.cursor = [0] * num_classes

    def take(self, counts: np.ndarray) -> tuple[list[int], int]:
        chosen, reused = [], 0
        for c, need in enumerate(counts):
            pool, start = self.pools[c], self.cursor[c]
            positions = np.arange(start, start + need)
            reused += int(np.sum(positions >= len(pool)))
            chosen.extend(pool[positions % len(pool)].tolist() if need else [])
            self.cursor[c] = start + need
        return chosen, reused


def partition_clients(
    tasks: list[str],
    data: dict[str, TaskData],
    train_samples: int,
    test_samples: int,
    seed: int,
    scheme: str = "balanced",
    alpha: float = 0.5,
    allow_overlap: bool = False,
) -> list[ClientSplit]:
    """One ClientSplit per client whose task is in ``data`` (client i holds task ``tasks[i]``), in client order.

    Tasks are partitioned independently, so a process that loads only its own task's data (a Flower
    SuperNode) gets exactly the slices the whole-federation partition gives.
    """
    members: dict[str, list[int]] = {}
    for cid, task in enumerate(tasks):
        if task in data:
            members.setdefault(task, []).append(cid)

    splits: dict[int, ClientSplit] = {}
    for task, cids in members.items():
        spec = data[task].spec
        counts = {}
        for rank, cid in enumerate(cids):
            if scheme == "dirichlet":
                rng = np.random.default_rng(derive_seed(seed, "dirichlet", task, rank))
                proportions = rng.dirichlet(np.full(spec.num_classes, alpha))
                counts[cid] = (dirichlet_counts(train_samples, proportions),
                               dirichlet_counts(test_samples, proportions))
            else:
                counts[cid] = (balanced_counts(train_samples, spec.num_classes, rank),
                               balanced_counts(test_samples, spec.num_classes, rank))
        chosen: dict[int, dict[str, list[Example]]] = {cid: {} for cid in cids}
        reused = dict.fromkeys(cids, 0)
        for split_index, (split, examples) in enumerate((("train", data[task].train),
                                                         ("validation", data[task].validation))):
            if (train_samples, test_samples)[split_index] == 0:  # "all": the split shared evenly, in random order
                rng = np.random.default_rng(derive_seed(seed, "partition-all", task, split))
                order = rng.permutation(len(examples))
                if len(order) < len(cids):
                    raise DataError(f"task {task}: {len(cids)} clients share {len(order)} {split} examples; give each "
                                    f"at least one")
                for cid, part in zip(cids, np.array_split(order, len(cids)), strict=True):
                    chosen[cid][split] = [examples[i] for i in part.tolist()]
                continue
            need = np.sum([counts[cid][split_index] for cid in cids], axis=0)
            available = np.bincount([ex.label for ex in examples], minlength=spec.num_classes)
            empty = [c for c in range(spec.num_classes) if need[c] and not available[c]]
            if empty:
                raise DataError(f"task {task}: the {split} split has no example of class '{spec.class_name(empty[0])}'")
            short = [c for c in range(spec.num_classes) if need[c] > available[c]]
            if short and not allow_overlap:
                c = short[0]
                raise DataError(
                    f"task {task}: {len(cids)} client(s) need {need[c]} {split} examples of class "
                    f"'{spec.class_name(c)}' in all, but the {split} split has {available[c]}; lower "
                    f"--{'train' if split == 'train' else 'test'}_samples, use fewer clients of this task, "
                    f"or pass --allow_overlap to reuse examples")
            pools = _ClassPools(examples, spec.num_classes, derive_seed(seed, "partition", task, split))
            for cid in cids:
                indices, n_reused = pools.take(counts[cid][split_index])
                chosen[cid][split] = [examples[i] for i in indices]
                reused[cid] += n_reused
        for cid in cids:
            splits[cid] = ClientSplit(cid, task, chosen[cid]["train"], chosen[cid]["validation"], reused[cid])
    return [splits[cid] for cid in sorted(splits)]
