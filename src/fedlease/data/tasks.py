"""The task registry: what a task is, and how to get its examples.

A task is a text classification problem with a fixed label set. Each registered task names its labels (the
order fixes the label ids, and matches the Hugging Face GLUE ids), whether it is a sentence pair, the metrics
reported for it, and where its examples come from: the built-in offline corpora shipped with the package, or
GLUE (a local directory in the official layout, or the Hugging Face hub).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from fedlease.errors import DataError


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]
    pair: bool
    source: str  # "builtin" or "glue"
    description: str
    # Besides accuracy: "f1" (binary, positive = label 1) or "macro_f1" (multi-class).
    extra_metric: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("accuracy",) if self.extra_metric is None else ("accuracy", self.extra_metric)


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    train: list[Example]
    validation: list[Example]


NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
    "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
    "talk.religion.misc",
)

NLI3 = ("entailment", "neutral", "contradiction")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("rotten_tomatoes", ("negative", "positive"), False, "builtin",
                 "movie-review sentiment (SST-2-like), split by movie"),
        TaskSpec("snli", NLI3, True, "builtin", "3-way natural language inference, split by premise", "macro_f1"),
        TaskSpec("newsgroups", NEWSGROUPS, False, "builtin", "20-way topic of 20 Newsgroups posts", "macro_f1"),
        TaskSpec("election_tweets", ("clinton", "trump"), False, "builtin",
                 "authorship of 2016 US election tweets"),
        TaskSpec("sst2", ("negative", "positive"), False, "glue", "GLUE SST-2 sentiment"),
        TaskSpec("qnli", ("entailment", "not_entailment"), True, "glue", "GLUE QNLI question answering NLI"),
        TaskSpec("mrpc", ("not_equivalent", "equivalent"), True, "glue", "GLUE MRPC paraphrase", "f1"),
        TaskSpec("qqp", ("not_duplicate", "duplicate"), True, "glue", "GLUE QQP duplicate questions", "f1"),
        TaskSpec("rte", ("entailment", "not_entailment"), True, "glue", "GLUE RTE entailment"),
        TaskSpec("mnli", NLI3, True, "glue", "GLUE MNLI (validation = matched)", "macro_f1"),
    )
}

BUILTIN = tuple(name for name, spec in TASKS.items() if spec.source == "builtin")


def get_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {' '.join(TASKS)}") from None


def check_tasks(names: list[str]) -> None:
    """Fail fast, before anything is loaded, on a task name that is not registered."""
    for name in names:
        get_spec(name)


@functools.lru_cache(maxsize=16)
def load_task(name: str, data_dir: str | None = None) -> TaskData:
    """All examples of a task: from the package (built-in), from ``data_dir`` or from the hub (GLUE)."""
    spec = get_spec(name)
    if spec.source == "builtin":
        from fedlease.data.builtin import load_builtin

        train, validation = load_builtin(spec)
    elif data_dir is not None:
        from fedlease.data.glue import load_glue_dir

        train, validation = load_glue_dir(spec, Path(data_dir))
    else:
        from fedlease.data.glue import load_glue_hub

        train, validation = load_glue_hub(spec)
    return TaskData(spec, train, validation)
