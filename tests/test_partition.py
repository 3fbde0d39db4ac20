"""Partition: disjoint, class-balanced, seed-stable, and honest about overlap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fedlease.data.partition import balanced_counts, dirichlet_counts, partition_clients
from fedlease.data.tasks import Example, TaskData, TaskSpec
from fedlease.errors import DataError

SPEC = TaskSpec("toy", ("a", "b", "c"), False, "builtin", "toy task")


def toy_data(per_class_train=(50, 40, 30), per_class_val=(20, 20, 20)) -> TaskData:
    def rows(split, counts):
        return [Example(f"{split}-{label}-{i}", None, label) for label, n in enumerate(counts) for i in range(n)]

    return TaskData(SPEC, rows("train", per_class_train), rows("val", per_class_val))


def test_balanced_partition_is_disjoint_and_class_balanced():
    data = {"toy": toy_data()}
    splits = partition_clients(["toy", "toy", "toy"], data, train_samples=30, test_samples=12, seed=1)
    assert [s.task for s in splits] == ["toy"] * 3
    seen_train, seen_test = set(), set()
    for split in splits:
        assert len(split.train) == 30 and len(split.test) == 12 and split.reused == 0
        assert Counter(ex.label for ex in split.train) == {0: 10, 1: 10, 2: 10}
        assert Counter(ex.label for ex in split.test) == {0: 4, 1: 4, 2: 4}
        texts = {ex.text_a for ex in split.train}
        assert not texts & seen_train
        seen_train |= texts
        test_texts = {ex.text_a for ex in split.test}
        assert not test_texts & seen_test and all(t.startswith("val") for t in test_texts)
        seen_test |= test_texts


def test_remainders_rotate_across_clients():
    assert list(balanced_counts(10, 3, 0)) == [4, 3, 3]
    assert list(balanced_counts(10, 3, 1)) == [3, 4, 3]
    data = {"toy": toy_data()}
    splits = partition_clients(["toy"] * 3, data, train_samples=10, test_samples=3, seed=0)
    totals = Counter(ex.label for s in splits for ex in s.train)
    assert totals == {0: 10, 1: 10, 2: 10}


def test_same_seed_same_partition_other_seed_other_partition():
    data = {"toy": toy_data()}
    a = partition_clients(["toy", "toy"], data, 20, 10, seed=3)
    b = partition_clients(["toy", "toy"], data, 20, 10, seed=3)
    c = partition_clients(["toy", "toy"], data, 20, 10, seed=4)
    assert a == b
    assert [s.train for s in a] != [s.train for s in c]


def test_partition_does_not_depend_on_python_hash_seed():
    code = ("import json; from fedlease.data.tasks import load_task; from fedlease.data.partition import "
            "partition_clients; d={'election_tweets': load_task('election_tweets')}; "
            "s=partition_clients(['election_tweets']*2, d, 40, 10, seed=5); "
            "print(json.dumps([[e.text_a for e in c.train] for c in s]))")
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outputs.append(json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                                 capture_output=True, text=True).stdout))
    assert outputs[0] == outputs[1]


def test_too_few_examples_stop_with_a_clear_message_unless_overlap_is_allowed():
    data = {"toy": toy_data(per_class_train=(50, 40, 5))}
    with pytest.raises(DataError, match=r"class 'c'.*--allow_overlap"):
        partition_clients(["toy", "toy"], data, train_samples=30, test_samples=6, seed=0)
    splits = partition_clients(["toy", "toy"], data, 30, 6, seed=0, allow_overlap=True)
    assert all(len(s.train) == 30 for s in splits)
    assert sum(s.reused for s in splits) == 20 - 5
    assert Counter(ex.label for ex in splits[1].train)[2] == 10


def test_missing_class_is_an_error_even_with_overlap():
    data = {"toy": toy_data(per_class_val=(5, 5, 0))}
    with pytest.raises(DataError, match="no example of class 'c'"):
        partition_clients(["toy"], data, 6, 3, seed=0, allow_overlap=True)


def test_dirichlet_partition_skews_labels_and_keeps_sizes():
    data = {"toy": toy_data(per_class_train=(400, 400, 400), per_class_val=(100, 100, 100))}
    splits = partition_clients(["toy"] * 4, data, 90, 30, seed=2, scheme="dirichlet", alpha=0.1)
    for split in splits:
        assert len(split.train) == 90 and len(split.test) == 30
    skewed = [max(Counter(ex.label for ex in s.train).values()) / 90 for s in splits]
    assert max(skewed) > 0.6  # alpha 0.1 concentrates a client on few classes
    counts = dirichlet_counts(7, np.array([0.5, 0.3, 0.2]))
    assert counts.sum() == 7 and list(counts) == [4, 2, 1]


def test_one_task_alone_gets_the_same_slices():
    """A SuperNode loads only its own task: its slice must equal the whole-federation partition's."""
    other = TaskData(TaskSpec("other", ("x", "y"), False, "builtin", "other"),
                     [Example(f"o{i}", None, i % 2) for i in range(60)], [Example(f"v{i}", None, i % 2)
                                                                         for i in range(20)])
    data = {"toy": toy_data(), "other": other}
    tasks = ["other", "toy", "other", "toy"]
    everything = partition_clients(tasks, data, 12, 6, seed=4)
    alone = partition_clients(tasks, {"toy": data["toy"]}, 12, 6, seed=4)
    assert [s.client_id for s in alone] == [1, 3]
    assert alone == [everything[1], everything[3]]
