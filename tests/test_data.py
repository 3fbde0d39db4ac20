"""Task registry, GLUE TSV reader, built-in corpora."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fedlease.data.builtin import read_jsonl_examples
from fedlease.data.glue import load_glue_dir, read_glue_tsv
from fedlease.data.tasks import BUILTIN, TASKS, get_spec, load_task
from fedlease.errors import DataError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_columns_are_found_by_header_and_labels_by_id_or_name(tmp_path):
    qqp = write(tmp_path / "QQP" / "train.tsv",
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tHow?\tWhy \"not\"?\t1\n")
    [ex] = read_glue_tsv(qqp, get_spec("qqp"))
    assert ex == ("How?", 'Why "not"?', 1)
    qnli = write(tmp_path / "QNLI" / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq\ts\tnot_entailment\n")
    assert read_glue_tsv(qnli, get_spec("qnli"))[0].label == 1
    mrpc = write(tmp_path / "MRPC" / "train.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n")
    assert read_glue_tsv(mrpc, get_spec("mrpc"))[0] == ("a", "b", 0)


@pytest.mark.parametrize("body,match", [
    ("sentence\tlabel\ngood\t1\nbad\n", r"train.tsv:3: expected 2 tab-separated fields, found 1"),
    ("sentence\tlabel\ngood\t7\n", r"train.tsv:2: label '7' is not one of negative, positive"),
    ("text\tlabel\ngood\t1\n", r"train.tsv:1: header lacks column\(s\) 'sentence'"),
    ("sentence\tlabel\n", r"train.tsv: no examples"),
])
def test_malformed_glue_rows_name_file_and_line(tmp_path, body, match):
    path = write(tmp_path / "SST-2" / "train.tsv", body)
    with pytest.raises(DataError, match=match):
        read_glue_tsv(path, get_spec("sst2"))


def test_glue_dir_errors(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        load_glue_dir(get_spec("sst2"), tmp_path / "nope")
    with pytest.raises(DataError, match="has no SST-2/ folder"):
        load_glue_dir(get_spec("sst2"), tmp_path)
    write(tmp_path / "MNLI" / "train.tsv", "sentence1\tsentence2\tgold_label\np\th\tneutral\n")
    with pytest.raises(DataError, match="dev_matched.tsv does not exist"):
        load_glue_dir(get_spec("mnli"), tmp_path)
    write(tmp_path / "MNLI" / "dev_matched.tsv", "sentence1\tsentence2\tgold_label\np\th\tcontradiction\n")
    train, dev = load_glue_dir(get_spec("mnli"), tmp_path)
    assert train[0].label == 1 and dev[0].label == 2


def test_glue_without_data_dir_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fedlease import hub

    hub.hub_reachable.cache_clear()
    with pytest.raises(DataError, match="--data_dir") as info:
        load_task("rte", None)
    assert "rotten_tomatoes" in str(info.value)


def test_jsonl_reader_rejects_bad_lines():
    spec = get_spec("snli")
    good = '{"text_a": "a", "text_b": "b", "label": "neutral"}'
    assert read_jsonl_examples(good + "\n", spec, "f")[0].label == 1
    for bad, match in (("{", "f:1: not valid JSON"), ('{"text_a": "a", "label": "neutral"}', "text_b is missing"),
                       ('{"text_a": "a", "text_b": "b", "label": "maybe"}', "label 'maybe'"), ("[1]", "object")):
        with pytest.raises(DataError, match=match):
            read_jsonl_examples(bad, spec, "f")


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_tasks_hold_enough_for_the_defaults(name):
    """4 clients x 1000 train / 200 test, class-balanced and disjoint, must fit every built-in task."""
    data = load_task(name)
    spec = data.spec
    assert spec.source == "builtin"
    train, val = Counter(ex.label for ex in data.train), Counter(ex.label for ex in data.validation)
    assert set(train) == set(val) == set(range(spec.num_labels))
    assert min(train.values()) >= 4 * -(-1000 // spec.num_labels)
    assert min(val.values()) >= 4 * -(-200 // spec.num_labels)
    assert all(ex.text_a for ex in data.train[:100])
    assert (data.train[0].text_b is not None) == spec.pair
    # no example text on both sides of the split
    assert not {(e.text_a, e.text_b) for e in data.train} & {(e.text_a, e.text_b) for e in data.validation}


def test_real_glue_tasks_load(glue_dir):
    for name, rows in (("sst2", 66973), ("mrpc", 3661)):
        data = load_task(name, str(glue_dir))
        assert len(data.train) == rows
    qqp = load_task("qqp", str(glue_dir))
    assert len(qqp.validation) == 1000 and qqp.train[0].text_b


def test_registry_names_are_consistent():
    assert all(name == spec.name for name, spec in TASKS.items())
    assert get_spec("mrpc").metrics == ("accuracy", "f1")
    assert get_spec("newsgroups").metrics == ("accuracy", "macro_f1")
    with pytest.raises(DataError, match="unknown task 'sst3'"):
        get_spec("sst3")
