"""The task registry: what a task is, and how to get its examples.

A task is of one of two kinds. A *classification* task has a fixed label set: each registered one names its
labels (the order fixes the label ids, and matches the Hugging Face GLUE ids), whether it is a sentence pair,
the metrics reported for it, and where its examples come from: the built-in offline corpora shipped with the
package, or GLUE (a local directory in the official layout, or the Hugging Face hub). A *generation* task maps
an instruction (and an optional input) to a response and is scored by ROUGE (``fedlease.data.instructions``);
where its responses are label words, ``labels`` names them, partitions are balanced over them and exact match
is reported too. Loaders of other sources add tasks with :func:`register` (a user's JSON-lines folder).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
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
    # "builtin", "glue", "instructions" (built in), "user" (a user's classification folder, fedlease.data.user),
    # "jsonl" (a user's instruction folder) or "remote" (another node's)
    source: str
    description: str
    # Besides accuracy: "f1" (binary, positive = label 1) or "macro_f1" (multi-class). Besides ROUGE:
    # "exact_match_cased" (the answer to the character, case and punctuation included, spaces collapsed).
    extra_metric: str | None = None
    kind: str = "classification"  # or "generation"
    # A "jsonl" task's folder when registered; a run (or a node) may read the category from its own folder.
    location: str | None = field(default=None, compare=False)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Classes a partition balances over: a free-text generation task is one class."""
        return max(self.num_labels, 1)

    def class_name(self, index: int) -> str:
        return self.labels[index] if self.labels else "(any)"

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.kind == "generation":
            return ("rouge1", "rougeL", *(("exact_match",) if self.labels else ()),
                    *((self.extra_metric,) if self.extra_metric else ()))
        return ("accuracy",) if self.extra_metric is None else ("accuracy", self.extra_metric)


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    train: list  # Example, or InstructionExample for a generation task
    validation: list


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
        TaskSpec("instruct_sentiment", ("negative", "positive"), False, "instructions",
                 "movie-review sentiment as instructions (rotten_tomatoes, FLAN templates)", kind="generation"),
        TaskSpec("instruct_nli", ("yes", "it is not possible to tell", "no"), True, "instructions",
                 "natural language inference as instructions (snli, FLAN templates)", kind="generation"),
        TaskSpec("instruct_edit", (), False, "instructions",
                 "text editing: restore punctuation, spaces or case of a sentence (snli captions, FLAN templates)",
                 "exact_match_cased", kind="generation"),  # ROUGE drops case and punctuation: see generation.py
        TaskSpec("instruct_struct2text", (), False, "instructions",
                 "structure to text: E2E NLG restaurant attributes -> a description (GEM via BIG-bench)",
                 kind="generation"),
        TaskSpec("instruct_commonsense", (), False, "instructions",
                 "commonsense reasoning: Social IQa, answer among three options (via BIG-bench)", kind="generation"),
    )
}

BUILTIN = tuple(name for name, spec in TASKS.items() if spec.source == "builtin")


def register(spec: TaskSpec) -> None:
    """Add a task from another source (a user's instruction folder); a name may not change its meaning."""
    known = TASKS.get(spec.name)
    if known is not None and known != spec and known.source != "remote":
        raise DataError(f"task {spec.name!r} is already defined ({known.description}); rename the category")
    TASKS[spec.name] = spec


def task_kind(names: list[str]) -> str:
    """The one kind of all ``names``: a run trains classification or generation tasks, not both."""
    kinds = {get_spec(name).kind for name in names}
    if len(kinds) > 1:
        by_kind = {k: next(n for n in names if get_spec(n).kind == k) for k in sorted(kinds)}
        raise DataError("--tasks mixes kinds: " + " and ".join(f"{n} is a {k} task" for k, n in by_kind.items())
                        + "; one run trains tasks of one kind")
    return kinds.pop()


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
def load_task(name: str, data_dir: str | None = None, instruction_dir: str | None = None) -> TaskData:
    """All examples of a task: from the package (built-in), from ``data_dir`` or from the hub (GLUE), or a
    category of a user's instruction folder (``instruction_dir``, else the folder it was registered from)."""
    spec = get_spec(name)
    if spec.source in ("instructions", "jsonl", "remote"):
        from fedlease.data.instructions import load_instruction_task

        train, validation = load_instruction_task(spec, instruction_dir)
    elif spec.source == "user":
        from fedlease.data.user import load_user_task

        train, validation = load_user_task(spec, data_dir)
    elif spec.source == "builtin":
        from fedlease.data.builtin import load_builtin

        train, validation = load_builtin(spec)
    elif data_dir is not None:
        from fedlease.data.glue import load_glue_dir

        train, validation = load_glue_dir(spec, Path(data_dir))
    else:
        from fedlease.data.glue import load_glue_hub

        train, validation = load_glue_hub(spec)
    return TaskData(spec, train, validation)
