"""A user's own classification data: task folders of JSON lines or CSV in --data_dir, and --train_samples all."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import tiny_run_config
from fedlease.cli import main
from fedlease.data.tasks import TASKS, load_task
from fedlease.data.user import read_task, register_classification_folders
from fedlease.errors import ConfigError, DataError
from fedlease.runtime.clients import load_partition
from fedlease.runtime.simulation import prepare_config


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    write_jsonl(root / "My Reviews" / "train.jsonl",
                [{"text": f"{'great' if i % 2 else 'awful'} film {i}", "label": "good" if i % 2 else "bad"}
                 for i in range(80)])
    write_csv(root / "pairs" / "train.csv", ["text", "text_pair", "label"],
              [[f"q{i}", f"q{i}" if i % 3 else f"r{i}", i % 3] for i in range(30)])
    write_csv(root / "pairs" / "test.csv", ["text", "text_pair", "label"],
              [[f"t{i}", f"t{i}", i % 3] for i in range(9)])
    return root


def test_task_folders_are_registered_with_their_labels_and_splits(data_dir):
    assert register_classification_folders(str(data_dir)) == ["my_reviews", "pairs"]
    reviews, pairs = TASKS["my_reviews"], TASKS["pairs"]
    assert reviews.labels == ("bad", "good") and not reviews.pair and reviews.extra_metric is None
    assert pairs.labels == ("0", "1", "2") and pairs.pair and pairs.extra_metric == "macro_f1"
    data = load_task("my_reviews", str(data_dir))
    # no test file: a fixed share of the rows is held out, disjoint from training, the same every time
    assert len(data.train) + len(data.validation) == 80 and 5 <= len(data.validation) <= 30
    assert not {e.text_a for e in data.train} & {e.text_a for e in data.validation}
    assert [e.text_a for e in read_task.__wrapped__(data_dir / "My Reviews")[2]] == [e.text_a for e in data.validation]
    pairs_data = load_task("pairs", str(data_dir))
    assert len(pairs_data.validation) == 9 and pairs_data.train[1] == ("q1", "q1", 1)


def test_train_samples_all_gives_each_example_to_exactly_one_client(data_dir, tiny_model, tmp_path):
    config = prepare_config(tiny_run_config(tiny_model, tmp_path / "out", data_dir=str(data_dir),
                                            tasks=["my_reviews:3", "pairs:2"], train_samples="all",
                                            test_samples="all"))
    assert config.train_samples == 0
    data, splits = load_partition(config)
    for task, count in (("my_reviews", 3), ("pairs", 2)):
        mine = [s for s in splits if s.task == task]
        assert len(mine) == count
        for split, everything in (("train", data[task].train), ("test", data[task].validation)):
            got = [e for s in mine for e in getattr(s, split)]
            assert sorted(got) == sorted(everything)  # every example, once
            sizes = [len(getattr(s, split)) for s in mine]
            assert max(sizes) - min(sizes) <= 1


def test_a_run_on_user_folders_and_its_clients_predictions(data_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model_name", tiny_model, "--data_dir", str(data_dir), "--tasks", "my_reviews:2", "pairs:2",
            "--train_samples", "all", "--test_samples", "all", "--global_rounds", "2", "--warmup_rounds", "1",
            "--batch_size", "8", "--max_length", "24", "--precision", "fp32", "--output_dir", str(out),
            "--no_progress"]
    assert main(args) == 0
    recorded = json.loads((out / "training_history.json").read_text())["rounds"][-1]["clients"]["3"]["eval"]
    assert main(["predict", str(out), "--client", "3", "--split", "test", "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sum(r["label"] == r["reference"] for r in rows) / len(rows) == recorded["accuracy"]
    assert {r["reference"] for r in rows} <= {"0", "1", "2"}


@pytest.mark.parametrize(("write", "message"), [
    (lambda d: write_jsonl(d / "t" / "train.jsonl", [{"text": "a", "label": "x"}] * 5), "every row has label 'x'"),
    (lambda d: (d / "t").mkdir(parents=True)
     or (d / "t" / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{oops\n'),
     "train.jsonl:2: not valid JSON"),
    (lambda d: write_csv(d / "t" / "train.csv", ["text", "category"], [["a", "x"]]), "must name the columns"),
    (lambda d: write_jsonl(d / "t" / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "", "label": "y"}]),
     "train.jsonl:2: 'text' must be a non-empty string"),
    (lambda d: (write_jsonl(d / "t" / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]),
                write_jsonl(d / "t" / "test.jsonl", [{"text": "c", "label": "z"}])), "test.jsonl:1: label 'z' never"),
    (lambda d: write_jsonl(d / "t" / "train.jsonl", [{"text": "a", "text_pair": "b", "label": "x"},
                                                      {"text": "c", "label": "y"}]), "train.jsonl:2: no 'text_pair'"),
])
def test_bad_user_data_is_refused_naming_file_and_line(tmp_path, tiny_model, capsys, write, message):
    write(tmp_path / "d")
    read_task.cache_clear()
    with pytest.raises(DataError, match=message):
        register_classification_folders(str(tmp_path / "d"))
    assert main(["run", "--model_name", tiny_model, "--data_dir", str(tmp_path / "d"), "--tasks", "t:2",
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert message.split(":")[-1].strip()[:20] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_samples_all_is_refused_with_dirichlet_and_negative_counts(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="all shares a task's examples evenly"):
        tiny_run_config(tiny_model, tmp_path, train_samples="all", partition="dirichlet").validate()
    with pytest.raises(ConfigError, match="must be at least 1 or all, got -1"):
        tiny_run_config(tiny_model, tmp_path, test_samples=-1).validate()
