"""Property-based: any input to the readers and the flag parser gives a valid result or one clean error."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedlease.cli import build_parser, config_from_args
from fedlease.config import RunConfig
from fedlease.data.builtin import read_jsonl_examples
from fedlease.data.glue import read_glue_tsv
from fedlease.data.tasks import TASKS, Example, TaskSpec, get_spec
from fedlease.errors import FedleaseError
from fedlease.runtime.simulation import prepare_config

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"), max_size=12)
CORRUPTIONS = ["none", "none", "none", "drop_field", "extra_field", "bad_label", "bad_header", "bad_utf8", "empty"]


@st.composite
def glue_file(draw, task: str) -> tuple[bytes, list[Example] | None]:
    """Mostly well-formed GLUE TSV text, with one kind of corruption some of the time, and the examples it holds:
    None where the file must be refused (a row of another width, a label not of the task, a missing column, bytes
    that are not UTF-8, no row)."""
    from fedlease.data.glue import LAYOUTS

    layout, spec = LAYOUTS[task], get_spec(task)
    header = ["id", layout.text_a, *([layout.text_b] if layout.text_b else []), layout.label]
    # a label is written as its name or as its index
    labels = {**{name: i for i, name in enumerate(spec.labels)}, **{str(i): i for i in range(spec.num_labels)}}
    rows = [[draw(cells) for _ in header[:-1]] + [draw(st.sampled_from(sorted(labels)))]
            for _ in range(draw(st.integers(0, 5)))]
    expected = [Example(row[1].strip(), row[2].strip() if layout.text_b else None, labels[row[-1]]) for row in rows]
    corruption = draw(st.sampled_from(CORRUPTIONS))
    if rows and corruption == "drop_field":
        rows[draw(st.integers(0, len(rows) - 1))].pop()
        expected = []
    elif rows and corruption == "extra_field":
        rows[-1].append("x")
        expected = []
    elif rows and corruption == "bad_label":
        rows[0][-1] = draw(st.sampled_from(["", "2", "yes", "-1"]))  # "2" is a label of a three-class task
        expected = [expected[0]._replace(label=labels[rows[0][-1]]), *expected[1:]] if rows[0][-1] in labels else []
    elif corruption in ("bad_header", "bad_utf8", "empty"):
        expected = []
    if corruption == "bad_header":
        header[1] = "text"
    lines = ["\t".join(row) for row in [header, *rows]]
    if corruption == "empty":
        lines = []
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    return payload + b"\xff\xfe" if corruption == "bad_utf8" else payload, expected or None


@PROPERTY
@given(data=st.data(), task=st.sampled_from(["sst2", "qnli", "mrpc", "qqp", "rte", "mnli"]))
def test_glue_reader_gives_the_files_examples_or_a_data_error(data, task):
    payload, expected = data.draw(glue_file(task))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.tsv"
        path.write_bytes(payload)
        try:
            examples = read_glue_tsv(path, get_spec(task))
        except FedleaseError as exc:
            event("error")
            assert expected is None, f"refused a well-formed file: {exc}"
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            event("examples")
            assert examples == expected


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3), max_leaves=4)
good_records = st.fixed_dictionaries({"text_a": cells, "text_b": cells,
                                      "label": st.sampled_from(["neutral", "entailment", "contradiction"])})
bad_records = st.dictionaries(st.sampled_from(["text_a", "text_b", "label", "other"]), json_values, max_size=4)
lines = st.one_of(good_records.map(json.dumps), good_records.map(json.dumps), bad_records.map(json.dumps),
                  st.text(max_size=20))


def jsonl_examples(text: str, spec: TaskSpec) -> list[Example] | None:
    """The examples of JSON lines text by the format's rule (an object with a string text_a, a string text_b for
    a pair task, a label of the task, one a line, blank lines skipped), or None where a line breaks it or no
    line holds one."""
    examples = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        text_a, text_b, label = record.get("text_a"), record.get("text_b"), record.get("label")
        if not isinstance(text_a, str) or not isinstance(text_b, str) or label not in spec.labels:
            return None
        examples.append(Example(text_a, text_b, spec.labels.index(label)))
    return examples or None


@PROPERTY
@given(rows=st.lists(lines, max_size=6))
def test_jsonl_reader_gives_the_lines_examples_or_a_data_error(rows):
    spec = get_spec("snli")
    assert spec.pair  # text_b is required
    text = "\n".join(rows)
    expected = jsonl_examples(text, spec)
    try:
        examples = read_jsonl_examples(text, spec, "data.jsonl")
    except FedleaseError as exc:
        event("error")
        assert expected is None, f"refused well-formed lines: {exc}"
        assert "\n" not in str(exc) and "data.jsonl" in str(exc)
    else:
        event("examples")
        assert examples == expected


garbage = st.sampled_from(["", "x", "nan", "-1", "1e400", "sst3", "fedsgd"])
ints = st.one_of(st.integers(-2, 12).map(str), garbage)
floats = st.one_of(st.floats(-1, 1, allow_nan=False).map(repr), st.sampled_from(["3e-3", "inf", "nan", "0"]),
                   garbage)
task_lists = st.lists(st.one_of(st.sampled_from(sorted(TASKS)), st.sampled_from(["snli:2", "mrpc:0", "nope"])),
                      min_size=0, max_size=4)
INT_FLAGS = ("--global_rounds", "--warmup_rounds", "--local_epochs", "--rank", "--max_clusters", "--train_samples",
             "--test_samples", "--batch_size", "--seed", "--max_length", "--num_experts", "--top_k")
FLOAT_FLAGS = ("--lr", "--alpha", "--lora_dropout", "--max_update_norm")
FLAG_VALUES = {
    "--tasks": task_lists, "--method": st.lists(st.sampled_from(["fedlease", "fedit", "ifca", "fedsgd"]),
                                                min_size=1, max_size=1),
    **{flag: st.lists(ints, min_size=1, max_size=1) for flag in INT_FLAGS},
    **{flag: st.lists(floats, min_size=1, max_size=1) for flag in FLOAT_FLAGS},
    "--device": st.lists(st.sampled_from(["auto", "cpu", "tpu"]), min_size=1, max_size=1),
    "--precision": st.lists(st.sampled_from(["auto", "fp32", "bf16", "fp16", "int8"]), min_size=1, max_size=1),
    "--partition": st.lists(st.sampled_from(["balanced", "dirichlet", "iid"]), min_size=1, max_size=1),
    "--allow_overlap": st.just([]),
    "--bogus": st.lists(cells, max_size=1),
}
argv_strategy = st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), max_size=5).flatmap(
    lambda chosen: st.tuples(*(st.tuples(st.just(flag), FLAG_VALUES[flag]) for flag in chosen)))


@PROPERTY
@given(pairs=argv_strategy)
def test_flag_parser_gives_a_valid_config_or_one_line_error(pairs):
    argv = ["run"] + [item for flag, vals in pairs for item in (flag, *vals)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        event("argparse error")
        assert exc.code == 2
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedlease: error: ")
        return
    try:
        config = prepare_config(config_from_args(args))
    except FedleaseError as exc:
        event("config error")
        assert str(exc) and "\n" not in str(exc)
        return
    event("valid config")
    assert isinstance(config, RunConfig)
    assert config.tasks and all(task in TASKS for task in config.tasks)
    assert 0 <= config.warmup_rounds < config.global_rounds
    assert config.lr > 0 and config.rank >= 1 and config.batch_size >= 1
    for flag, values in pairs:  # each flag given is what the run uses (NaN where a setting not used allows it)
        value, wanted = getattr(config, flag[2:]), flag_value(flag, values)
        assert value == wanted or (isinstance(wanted, float) and math.isnan(wanted) and math.isnan(value)), flag


def flag_value(flag: str, values: list[str]) -> object:
    """The setting that ``flag values`` asks for ("name:N" in --tasks: N clients of the task)."""
    if flag == "--tasks":
        return [name for value in values for name in [value.partition(":")[0]] * int(value.partition(":")[2] or 1)]
    if flag == "--allow_overlap":
        return True
    if flag in INT_FLAGS:
        return int(values[0])
    if flag in FLOAT_FLAGS:
        return float(values[0])
    return values[0]
