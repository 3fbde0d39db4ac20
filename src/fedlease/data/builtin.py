"""The built-in offline tasks: real corpora shipped inside the package (see corpora/DATA.md).

Each task is stored as ``corpora/<task>.<split>.jsonl.xz``, one JSON object per line with ``text_a``,
optional ``text_b`` and ``label`` (the label's name). ``tools/build_builtin_data.py`` builds them.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from importlib import resources

from fedlease.data.tasks import Example, TaskSpec
from fedlease.errors import DataError


def json_records(text: str, source: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-empty JSON line; a line that is not a JSON object is a DataError
    naming ``source`` and the line."""
    # split on "\n" only: str.splitlines() would also split at U+2028 inside a JSON string
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{source}:{line_no}: expected a JSON object")
        yield line_no, record


def read_jsonl_examples(text: str, spec: TaskSpec, source: str) -> list[Example]:
    """Parse JSON lines of ``{"text_a", "text_b"?, "label"}``; a bad line is a DataError naming it."""
    label_ids = {name: i for i, name in enumerate(spec.labels)}
    examples = []
    for line_no, record in json_records(text, source):
        text_a, text_b, label = record.get("text_a"), record.get("text_b"), record.get("label")
        if not isinstance(text_a, str) or (text_b is not None and not isinstance(text_b, str)):
            raise DataError(f"{source}:{line_no}: text_a must be a string and text_b a string or absent")
        if spec.pair and text_b is None:
            raise DataError(f"{source}:{line_no}: task {spec.name} is a sentence-pair task but text_b is missing")
        if not isinstance(label, str) or label not in label_ids:
            raise DataError(f"{source}:{line_no}: label {label!r} is not one of {', '.join(spec.labels)}")
        examples.append(Example(text_a, text_b, label_ids[label]))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


def read_corpus(name: str) -> str:
    """The text of a shipped ``corpora/<name>`` file (xz-compressed JSON lines)."""
    try:
        return lzma.decompress((resources.files("fedlease.data") / "corpora" / name).read_bytes()).decode("utf-8")
    except (FileNotFoundError, lzma.LZMAError) as exc:
        raise DataError(f"built-in data file {name} is missing or damaged ({exc}); reinstall fedlease") from None


def load_builtin(spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    train, validation = (f"{spec.name}.{split}.jsonl.xz" for split in ("train", "validation"))
    return read_jsonl_examples(read_corpus(train), spec, train), read_jsonl_examples(read_corpus(validation), spec,
                                                                                     validation)
