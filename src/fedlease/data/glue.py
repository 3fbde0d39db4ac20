"""GLUE tasks, from a local directory in the official ``glue_data`` layout or from the Hugging Face hub.

Local layout: ``<data_dir>/<FOLDER>/train.tsv`` and ``dev.tsv`` (``dev_matched.tsv`` for MNLI), tab-separated,
one header line, no CSV quoting (a ``"`` is an ordinary character). Columns are found by their header names,
so extra columns (QQP's ids, MNLI's parses) do not matter.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from fedlease.data.tasks import BUILTIN, Example, TaskSpec
from fedlease.errors import DataError


@dataclass(frozen=True)
class GlueLayout:
    folder: str
    dev_file: str
    text_a: str
    text_b: str | None
    label: str


LAYOUTS = {
    "sst2": GlueLayout("SST-2", "dev.tsv", "sentence", None, "label"),
    "qnli": GlueLayout("QNLI", "dev.tsv", "question", "sentence", "label"),
    "mrpc": GlueLayout("MRPC", "dev.tsv", "#1 String", "#2 String", "Quality"),
    "qqp": GlueLayout("QQP", "dev.tsv", "question1", "question2", "is_duplicate"),
    "rte": GlueLayout("RTE", "dev.tsv", "sentence1", "sentence2", "label"),
    "mnli": GlueLayout("MNLI", "dev_matched.tsv", "sentence1", "sentence2", "gold_label"),
}

HUB_DATASET = "nyu-mll/glue"
HUB_VALIDATION = {"mnli": "validation_matched"}


def read_glue_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    """Read one GLUE TSV file; a malformed row is a DataError that names the file and line."""
    layout = LAYOUTS[spec.name]
    # Labels are written as ids ("0", "1") in some tasks and as names in others; accept both.
    label_ids = {name: i for i, name in enumerate(spec.labels)} | {str(i): i for i in range(spec.num_labels)}
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist (expected the official GLUE layout)") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = [name.lstrip("\ufeff") for name in next(rows, [])]
            wanted = [layout.text_a, layout.label] + ([layout.text_b] if layout.text_b else [])
            missing = [name for name in wanted if name not in header]
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {', '.join(map(repr, missing))}")
            col_a, col_label = header.index(layout.text_a), header.index(layout.label)
            col_b = header.index(layout.text_b) if layout.text_b else None
            examples = []
            for row in rows:
                line = rows.line_num
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: expected {len(header)} tab-separated fields, found {len(row)}")
                label = row[col_label].strip()
                if label not in label_ids:
                    raise DataError(f"{path}:{line}: label {label!r} is not one of {', '.join(spec.labels)}")
                examples.append(Example(row[col_a].strip(), None if col_b is None else row[col_b].strip(),
                                        label_ids[label]))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{rows.line_num}: {exc}") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_glue_dir(spec: TaskSpec, data_dir: Path) -> tuple[list[Example], list[Example]]:
    if not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir} is not a directory")
    layout = LAYOUTS[spec.name]
    folder = data_dir / layout.folder
    if not folder.is_dir():
        raise DataError(f"--data_dir {data_dir} has no {layout.folder}/ folder for task {spec.name}")
    return read_glue_tsv(folder / "train.tsv", spec), read_glue_tsv(folder / layout.dev_file, spec)


def load_glue_hub(spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    from fedlease.hub import hub_reachable

    offline = f"built-in offline tasks: {' '.join(BUILTIN)}"
    local = f"pass --data_dir DIR (a local GLUE folder with {LAYOUTS[spec.name].folder}/train.tsv)"
    try:
        import datasets
    except ImportError:
        raise DataError(f"GLUE task {spec.name} needs data: {local}, or install the 'datasets' package "
                        f"(pip install 'fedlease[hub]') to load it from the Hugging Face hub; {offline}") from None
    if not hub_reachable():
        raise DataError(f"GLUE task {spec.name} needs data and the Hugging Face hub cannot be reached: {local}; "
                        f"{offline}")
    loaded = datasets.load_dataset(HUB_DATASET, spec.name)
    layout_names = {"sst2": ("sentence", None), "qnli": ("question", "sentence"), "mrpc": ("sentence1", "sentence2"),
                    "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
                    "mnli": ("premise", "hypothesis")}
    col_a, col_b = layout_names[spec.name]

    def convert(split: str) -> list[Example]:
        return [Example(row[col_a], row[col_b] if col_b else None, int(row["label"]))
                for row in loaded[split] if int(row["label"]) >= 0]

    return convert("train"), convert(HUB_VALIDATION.get(spec.name, "validation"))
