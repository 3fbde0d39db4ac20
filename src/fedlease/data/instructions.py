"""Instruction tasks: an instruction (and an optional input) to a response, as in FLAN-style instruction tuning.

Built-in tasks turn the package's real corpora into instructions with FLAN-style templates (several per task,
after the templates of FLAN v2, Longpre et al. 2023, for the same datasets; an example's template is a function
of its text, so every process makes the same prompts). Where the answer is a label, its words are the task's
``labels`` (the partition balances over them and exact match is reported).

A user's own data is a folder of JSON lines in the shape FLAN-derived federated datasets use: one object per
line with ``instruction``, optional ``input``, ``output`` and optional ``category``. ``train.jsonl`` is required;
``test.jsonl`` is the held-out split, and without it one example in ten of each category (chosen by a hash of
its text) is held out. Each category becomes a task of that name (``--tasks <category>:N``); records without a
category belong to a task named after the folder.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fedlease.data.tasks import TASKS, Example, TaskSpec, load_task, register
from fedlease.errors import DataError


class InstructionExample(NamedTuple):
    instruction: str
    input: str
    output: str
    label: int  # the answer's index in the task's labels; 0 for free text (one class for the partition)


def options(words: tuple[str, ...]) -> str:
    return "OPTIONS:\n" + "\n".join(f"- {w}" for w in words)


SENTIMENT_TEMPLATES = (
    "{text}\nWhat is the sentiment of this review?\n{options}",
    "Review: {text}\nIs this movie review sentence negative or positive?\n{options}",
    "Short movie review: {text}\nDid the critic think positively or negatively of the movie?\n{options}",
    "Sentence from a movie review: {text}\nWas the movie seen positively or negatively based on the preceding "
    "review?\n{options}",
    "How would one describe the sentiment of this review?\n{text}\n{options}",
)
NLI_TEMPLATES = (
    "Premise: {premise}\nHypothesis: {hypothesis}\n\nDoes the premise entail the hypothesis?\n\n{options}",
    "If \"{premise}\", does this mean that \"{hypothesis}\"?\n\n{options}",
    "Here is a premise:\n{premise}\n\nHere is a hypothesis:\n{hypothesis}\n\nIs it possible to conclude that if "
    "the premise is true, then so is the hypothesis?\n\n{options}",
    "Sentence 1: {premise}\n\nSentence 2: {hypothesis}\n\nIs this second sentence entailed by the first "
    "sentence?\n\n{options}",
    "Can we conclude from \"{premise}\" that \"{hypothesis}\"?\n{options}",
)
# snli's label ids (entailment, neutral, contradiction) in FLAN's answer words
NLI_ANSWERS = {0: "yes", 1: "it is not possible to tell", 2: "no"}


def pick(text: str, choices: tuple[str, ...]) -> str:
    """A template chosen by the example's text: the same in every process and every run."""
    return choices[int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % len(choices)]


def sentiment(ex: Example, spec: TaskSpec) -> InstructionExample:
    template = pick(ex.text_a, SENTIMENT_TEMPLATES)
    return InstructionExample(template.format(text=ex.text_a, options=options(spec.labels)), "",
                              spec.labels[ex.label], ex.label)


def nli(ex: Example, spec: TaskSpec) -> InstructionExample:
    template = pick(ex.text_a + "\n" + (ex.text_b or ""), NLI_TEMPLATES)
    answer = NLI_ANSWERS[ex.label]
    return InstructionExample(template.format(premise=ex.text_a, hypothesis=ex.text_b, options=options(spec.labels)),
                              "", answer, spec.labels.index(answer))


# FLAN v2's text-editing tasks (fix punctuation, word segmentation, case): a real sentence, altered; the
# response is the sentence as written.
def without_punctuation(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence.translate(str.maketrans("", "", string.punctuation))).strip()


def without_spaces(sentence: str) -> str:
    return sentence.replace(" ", "")


EDITS = (
    ("Add punctuation to the following sentence: {text}", without_punctuation),
    ("Please add spaces between words: {text}", without_spaces),
    ("Make this proper case: {text}", str.lower),
    ("Add spaces: {text}", without_spaces),
    ("What is the correctly punctuated version of this sentence?\n{text}", without_punctuation),
)


def edit(ex: Example, spec: TaskSpec) -> InstructionExample:
    sentence = ex.text_a.strip()
    template, alter = pick(sentence, EDITS)  # type: ignore[arg-type]
    return InstructionExample(template.format(text=alter(sentence)), "", sentence, 0)


def distinct_premises(examples: list[Example]) -> list[Example]:
    """SNLI repeats each caption for several hypotheses: one editing example per caption that needs editing."""
    seen: dict[str, Example] = {}
    for ex in examples:
        text = ex.text_a.strip()
        if text not in seen and text.lower() != text and any(c in string.punctuation for c in text):
            seen[text] = ex
    return list(seen.values())


# built-in instruction task -> (the classification corpus it reads, a filter, the conversion)
DERIVED: dict[str, tuple[str, Callable[[list[Example]], list[Example]],
                         Callable[[Example, TaskSpec], InstructionExample]]] = {
    "instruct_sentiment": ("rotten_tomatoes", list, sentiment),
    "instruct_nli": ("snli", list, nli),
    "instruct_edit": ("snli", distinct_premises, edit),
}


def load_instruction_task(spec: TaskSpec, folder: str | None = None
                          ) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """A built-in instruction task, or a category of a user's folder (``folder``, else where it was registered)."""
    if spec.source == "jsonl":
        path = Path(folder or spec.location or ".").expanduser().resolve()
        categories = read_instruction_folder(path)
        if spec.name not in categories:
            raise DataError(f"--instruction_dir {path} has no category {spec.name!r} (it has: {' '.join(categories)})")
        return categories[spec.name]
    if spec.source == "remote":
        raise DataError(f"task {spec.name!r}: its data is on another node ({spec.description})")
    if spec.name in DERIVED:
        corpus, keep, convert = DERIVED[spec.name]
        data = load_task(corpus)
        return [convert(ex, spec) for ex in keep(data.train)], [convert(ex, spec) for ex in keep(data.validation)]
    return load_bundled(spec)


def load_bundled(spec: TaskSpec) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """A corpus shipped as ``corpora/<task>.<split>.jsonl.xz`` (tools/build_instruction_data.py)."""
    from fedlease.data.builtin import read_corpus

    train, validation = (f"{spec.name}.{split}.jsonl.xz" for split in ("train", "validation"))
    return (parse_instructions(read_corpus(train), train, spec.name)[spec.name],
            parse_instructions(read_corpus(validation), validation, spec.name)[spec.name])


def task_name(category: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", category.strip().lower()).strip("_")


def read_instruction_file(path: Path, default_category: str) -> dict[str, list[InstructionExample]]:
    """Examples of a JSON-lines file by category; a bad line is a DataError naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return parse_instructions(text, str(path), default_category)


def parse_instructions(text: str, path: str, default_category: str) -> dict[str, list[InstructionExample]]:
    from fedlease.data.builtin import json_records

    out: dict[str, list[InstructionExample]] = {}
    for line_no, record in json_records(text, path):
        instruction, input_, output = record.get("instruction"), record.get("input", ""), record.get("output")
        category = record.get("category", default_category)
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{path}:{line_no}: 'instruction' must be a non-empty string")
        if not isinstance(output, str) or not output.strip():
            raise DataError(f"{path}:{line_no}: 'output' must be a non-empty string")
        if not isinstance(input_, str | None) or not isinstance(category, str) or not task_name(category):
            raise DataError(f"{path}:{line_no}: 'input' and 'category' must be strings (category with a letter "
                            f"or digit)")
        out.setdefault(task_name(category), []).append(InstructionExample(instruction, input_ or "", output, 0))
    return out


def held_out(ex: InstructionExample) -> bool:
    return hashlib.sha256(f"{ex.instruction}\n{ex.input}".encode()).digest()[0] < 26  # about one in ten


@functools.lru_cache(maxsize=4)
def read_instruction_folder(folder: Path) -> dict[str, tuple[list[InstructionExample], list[InstructionExample]]]:
    """(train, test) examples of every category in ``folder``, read once per process (registering the
    categories and loading each of them all need them)."""
    train_file, test_file = folder / "train.jsonl", folder / "test.jsonl"
    if not train_file.is_file():
        raise DataError(f"--instruction_dir {folder}: no train.jsonl there (JSON lines with instruction, input, "
                        f"output, category)")
    default = task_name(folder.resolve().name) or "instructions"
    train = read_instruction_file(train_file, default)
    if test_file.is_file():
        test = read_instruction_file(test_file, default)
    else:
        test = {c: [ex for ex in examples if held_out(ex)] for c, examples in train.items()}
        train = {c: [ex for ex in examples if not held_out(ex)] for c, examples in train.items()}
    out = {}
    for category, examples in train.items():
        if not examples or not test.get(category):
            raise DataError(f"--instruction_dir {folder}: category {category!r} needs examples in both the train "
                            f"and the test split")
        out[category] = (examples, test[category])
    return out


def register_instruction_folder(folder: str) -> list[str]:
    """Register each category of a user's folder as a generation task; return their names."""
    path = Path(folder).expanduser().resolve()  # the key under which loading the tasks finds the folder read
    if not path.is_dir():
        raise DataError(f"--instruction_dir {folder}: no such folder")
    names = sorted(read_instruction_folder(path))
    for name in names:
        register(TaskSpec(name, (), False, "jsonl", "instructions from a user's folder (--instruction_dir)",
                          kind="generation", location=str(path)))
    return names


def register_remote_tasks(names: list[str], where: str) -> None:
    """Register tasks of a user's data that other nodes hold (a node with its own ``instruction-dir`` knows only
    its own categories); unknown names only, and their data is never loaded here."""
    for name in names:
        if name not in TASKS:
            register(TaskSpec(name, (), False, "remote", f"instructions held by another node than {where}",
                              kind="generation"))


def prompt_text(ex: InstructionExample) -> str:
    """The user turn: the instruction, then the input when there is one."""
    return f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
