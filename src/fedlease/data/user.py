"""A user's own classification data: a folder per task of JSON lines or CSV, registered as tasks.

``--data_dir DIR``, where ``DIR/<task>/`` holds ``train.jsonl`` or ``train.csv`` (and optionally ``test.jsonl`` or
``test.csv``): each such folder is a classification task named after it (lower-cased). A row has ``text``,
``text_pair`` for a task of text pairs (a task is a pair task when its rows have one), and ``label``. The label
names are the distinct labels of the training file, sorted (numerically when every label is a number). Without a
test file, a fixed fifth of the training rows (chosen by a hash of each row, so the same whatever the run) is held
out as the test split. GLUE's folders (``train.tsv``) in the same ``DIR`` are read as GLUE.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import re
from pathlib import Path

from fedlease.data.builtin import json_records
from fedlease.data.tasks import TASKS, Example, TaskSpec, register
from fedlease.errors import DataError

SOURCE = "user"
FORMATS = ("jsonl", "csv")
HELD_OUT_SHARE = 51  # a row whose hash's first byte is below this is a test row: 51/256, about a fifth


def task_folders(data_dir: str) -> dict[str, Path]:
    """The task folders in ``data_dir``: name -> folder, for each sub-folder with a train.jsonl or train.csv."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        return {}
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if any((folder / f"train.{ext}").is_file() for ext in FORMATS):
            name = re.sub(r"[^a-z0-9_]+", "_", folder.name.lower()).strip("_")
            if name in out:
                raise DataError(f"--data_dir {data_dir}: folders {out[name].name} and {folder.name} are both task "
                                f"{name!r}; rename one")
            out[name] = folder.resolve()
    return out


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of a JSON-lines or CSV file (CSV: a header line, then one row a line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if path.suffix == ".jsonl":
        return list(json_records(text, str(path)))
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
        raise DataError(f"{path}: the header must name the columns text and label (and text_pair for pairs); it "
                        f"has {', '.join(reader.fieldnames or ['nothing'])}")
    return [(reader.line_num, row) for row in reader]


def split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}.{ext}" for ext in FORMATS if (folder / f"{split}.{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def checked(path: Path, rows: list[tuple[int, dict]], pair: bool | None) -> list[tuple[int, str, str | None, str]]:
    """(line, text, text_pair, label) of each row; a row without a text or a label names its file and line."""
    out = []
    for line, row in rows:
        text, second, label = row.get("text"), row.get("text_pair"), row.get("label")
        if isinstance(label, int | float) and not isinstance(label, bool):
            label = str(int(label)) if float(label).is_integer() else str(label)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: 'text' must be a non-empty string")
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{path}:{line}: 'label' must be a label name (a string or a number)")
        has_pair = isinstance(second, str) and bool(second.strip())
        if pair is not None and has_pair != pair:
            raise DataError(f"{path}:{line}: {'no' if pair else 'a'} 'text_pair' where the task's first row has "
                            f"{'one' if pair else 'none'}")
        pair = has_pair
        out.append((line, text, second if has_pair else None, label.strip()))
    return out


def label_order(labels: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


@functools.lru_cache(maxsize=16)
def read_task(folder: Path) -> tuple[TaskSpec, list[Example], list[Example]]:
    """The task of one folder: its spec, train and test examples."""
    name = re.sub(r"[^a-z0-9_]+", "_", folder.name.lower()).strip("_")
    train_path = split_file(folder, "train")
    assert train_path is not None
    train_rows = checked(train_path, read_rows(train_path), None)
    if not train_rows:
        raise DataError(f"{train_path}: no rows")
    pair = train_rows[0][2] is not None
    labels = label_order({label for *_, label in train_rows})
    if len(labels) < 2:
        raise DataError(f"{train_path}: every row has label {labels[0]!r}; a classification task needs two labels "
                        f"or more")
    test_path = split_file(folder, "test")
    if test_path is not None:
        test_rows = checked(test_path, read_rows(test_path), pair)
    else:
        test_rows = [row for row in train_rows if held_out(row[1], row[2])]
        train_rows = [row for row in train_rows if not held_out(row[1], row[2])]
    for path, rows in ((test_path or train_path, test_rows),):
        for line, _, _, label in rows:
            if label not in labels:
                raise DataError(f"{path}:{line}: label {label!r} never occurs in {train_path.name} "
                                f"(its labels: {', '.join(labels)})")
    if not test_rows or not train_rows:
        raise DataError(f"{folder}: task {name} needs rows in both its train and its test split")
    spec = TaskSpec(name, labels, pair, SOURCE, f"a user's classification data (folder {folder.name})",
                    "macro_f1" if len(labels) > 2 else None, location=str(folder))
    return spec, *(
        [Example(text, second, labels.index(label)) for _, text, second, label in rows]
        for rows in (train_rows, test_rows))


def held_out(text: str, second: str | None) -> bool:
    return hashlib.sha256(f"{text}\n{second or ''}".encode()).digest()[0] < HELD_OUT_SHARE


def register_classification_folders(data_dir: str) -> list[str]:
    """Register each task folder of ``data_dir`` as a classification task; return their names."""
    names = []
    for name, folder in task_folders(data_dir).items():
        known = TASKS.get(name)
        if known is not None and known.source != SOURCE:
            raise DataError(f"--data_dir {data_dir}: folder {folder.name} would be task {name!r}, which is already "
                            f"{known.description}; rename the folder")
        if known is not None:
            del TASKS[name]  # a user task read again, perhaps from another folder: the folder read now holds it
        register(read_task(folder)[0])
        names.append(name)
    return names


def load_user_task(spec: TaskSpec, data_dir: str | None) -> tuple[list[Example], list[Example]]:
    """The train and test examples of a registered user task, from ``data_dir`` (a node's own folder) or where it
    was registered."""
    folder = task_folders(data_dir).get(spec.name) if data_dir else None
    _, train, test = read_task(folder or Path(spec.location or "."))
    return train, test
