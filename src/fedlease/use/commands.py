"""``fedlease predict``, ``generate`` and ``export``: reading inputs, writing answers, one line per bad input."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fedlease.data.instructions import InstructionExample
from fedlease.data.tasks import Example, TaskSpec
from fedlease.errors import ConfigError, DataError
from fedlease.use.client import TrainedClient, trained_model
from fedlease.use.export import check_destination, export
from fedlease.use.final import FinalClient, read_final, recorded_metrics
from fedlease.use.newcomer import newcomer_spec, place_newcomer


def read_lines(source: str) -> tuple[str, list[str]]:
    """(a name for messages, the lines) of a file, or of stdin for ``-``."""
    if source == "-":
        return "<stdin>", sys.stdin.read().splitlines()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"--input {source}: no such file")
    return source, path.read_text(encoding="utf-8").splitlines()


def json_objects(name: str, numbered: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    """Each line parsed as a JSON object, with its number; anything else is refused, naming file and line."""
    rows = []
    for number, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}:{number}: not a JSON object")
        rows.append((number, row))
    return rows


def json_rows(name: str, numbered: list[tuple[int, str]], pair: bool) -> list[tuple[int, dict]]:
    """Each line as a JSON object with a string ``text`` (and ``text_pair`` for a pair task), with its number."""
    rows = json_objects(name, numbered)
    for number, row in rows:
        if not isinstance(row.get("text"), str):
            raise DataError(f"{name}:{number}: each line must be a JSON object with a string \"text\"")
        if pair and not isinstance(row.get("text_pair"), str):
            raise DataError(f"{name}:{number}: this client's task classifies text pairs; the line has no string "
                            f"\"text_pair\"")
    return rows


def non_blank(source: str) -> tuple[str, list[tuple[int, str]]]:
    name, lines = read_lines(source)
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(f"{name}: no input (the file is empty)")
    return name, numbered


def read_inputs(source: str, pair: bool) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts for a pair task) from JSON lines (objects with ``text`` and, for a pair task,
    ``text_pair``) or plain text (one text a line); a file is JSON lines when its first non-blank line is an
    object. Blank lines are skipped; a malformed line is refused, naming its file and line."""
    name, numbered = non_blank(source)
    if not numbered[0][1].lstrip().startswith("{"):
        if pair:
            raise DataError(f"{name}: this client's task classifies text pairs; give JSON lines with "
                            f"\"text\" and \"text_pair\"")
        return [line for _, line in numbered], None
    rows = [row for _, row in json_rows(name, numbered, pair)]
    return [row["text"] for row in rows], [row["text_pair"] for row in rows] if pair else None


def read_labelled(source: str, spec: TaskSpec) -> list[Example]:
    """Labelled examples from JSON lines: ``text``, ``text_pair`` for a pair task, and ``label`` (a label name of
    the task, or its index)."""
    name, numbered = non_blank(source)
    examples = []
    for number, row in json_rows(name, numbered, spec.pair):
        label = row.get("label")
        if isinstance(label, str) and label in spec.labels:
            label = spec.labels.index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_labels:
            raise DataError(f"{name}:{number}: \"label\" must be one of {', '.join(spec.labels)} (or its index)")
        examples.append(Example(row["text"], row.get("text_pair") if spec.pair else None, label))
    return examples


def read_demonstrations(source: str, spec: TaskSpec) -> list[InstructionExample]:
    """Instructions with their responses from JSON lines: ``instruction``, optional ``input``, ``output`` (for a
    task whose answers are label words, one of them)."""
    name, rows = prompt_rows(source, answered=True)
    examples = []
    for number, row in rows:
        output = row["output"]
        if spec.labels and output not in spec.labels:
            raise DataError(f"{name}:{number}: \"output\" must be one of this task's answers: "
                            f"{', '.join(spec.labels)}")
        label = spec.labels.index(output) if spec.labels else 0
        examples.append(InstructionExample(row["instruction"], row.get("input", ""), output, label))
    return examples


NEWCOMER_DATA = {"classification": read_labelled, "generation": read_demonstrations}  # kind -> reader of --data
COMMAND = {"classification": "predict", "generation": "generate"}  # kind -> the command that answers with it


def write_rows(rows: Iterable[dict], output: str | None) -> None:
    """One JSON line per row, to ``output`` (written whole, then moved into place) or to stdout."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output is None or output == "-":
        sys.stdout.write(text)
        return
    path = Path(output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(temporary, path)


def chosen_final(run: str, client: str, data: str | None, task: str | None, device: str, kind: str | None = None
                 ) -> tuple[FinalClient, dict[str, float] | None, list | None]:
    """Client ``client``'s final model in ``run``; with ``new``, the model its method gives a newcomer, placed by
    the newcomer's own ``data`` (returned with its metrics on those examples, and the examples). ``kind``: the kind
    of run the command answers for, checked before anything is loaded."""
    if client != "new":
        if data is not None or task is not None:
            raise ConfigError("--data and --task are for --client new")
        final = read_final(run, client_id(client))
        check_kind(run, final.kind, kind)
        return final, None, None
    if data is None:
        raise ConfigError("--client new needs --data: the newcomer's own examples (JSON lines)")
    spec = newcomer_spec(run, task)
    check_kind(run, spec.kind, kind)
    examples = NEWCOMER_DATA[spec.kind](data, spec)
    final, placed = place_newcomer(run, examples, spec.name, device)
    return final, placed, examples


def check_kind(run: str, found: str, wanted: str | None) -> None:
    if wanted is not None and found != wanted:
        what = "instruction" if found == "generation" else found
        raise ConfigError(f"{run} trained {what} tasks: use fedlease {COMMAND[found]}")


def client_model(run: str, client: str, split: str | None, data: str | None, task: str | None, kind: str,
                 device: str, batch_size: int | None, progress: bool, max_new_tokens: int | None = None
                 ) -> tuple[TrainedClient, str]:
    """The model that answers for ``predict`` or ``generate`` (``kind``), and who it is, for the summary."""
    if client == "new" and split is not None:
        raise ConfigError("--client new has no split of the run's; give --input")
    final, placed, own = chosen_final(run, client, data, task, device, kind)
    model = trained_model(final, device, batch_size, progress, max_new_tokens, own)
    if placed is None:
        return model, f"client {client} ({final.task})"
    chosen = "".join(f", {key} {int(placed[key])}" for key in ("expert", "cluster") if key in placed)
    scores = shown({k: v for k, v in placed.items() if k not in ("expert", "cluster")})
    return model, f"a newcomer ({final.task}{chosen}; {scores} on its own {len(own)} examples, which chose its model)"


def predict(run: str, client: str, *, input: str | None, split: str | None, output: str | None, device: str,
            batch_size: int | None, progress: bool, data: str | None = None, task: str | None = None) -> str:
    """Classify ``input`` (or the client's own ``split``) with client ``client`` of ``run`` (``new``: a newcomer
    placed by its own labelled ``data``); return a summary."""
    model, who = client_model(run, client, split, data, task, "classification", device, batch_size, progress)
    return answer(model, who, split, output, lambda: model.predict(*read_inputs(input, model.spec.pair)))


def answer(model, who: str, split: str | None, output: str | None, infer: Callable[[], list[dict]]) -> str:
    """Write the model's rows for its own ``split`` (with its metrics) or for the user's input (``infer``)."""
    if split is not None:
        metrics, rows = model.evaluate(split)
        write_rows(rows, output)
        return f"{who}, its {split} split: {len(rows)} rows, {shown(metrics)}"
    rows = infer()
    write_rows(rows, output)
    return f"{who}: {len(rows)} rows"


def prompt_rows(source: str, answered: bool = False) -> tuple[str, list[tuple[int, dict]]]:
    """JSON lines with a string ``instruction``, optionally a string ``input`` and, ``answered``, a non-empty
    string ``output``; a line without them is refused, naming file and line."""
    name, numbered = non_blank(source)
    rows = json_objects(name, numbered)
    for number, row in rows:
        output = row.get("output") if answered else "-"
        if not (isinstance(row.get("instruction"), str) and isinstance(row.get("input", ""), str)
                and isinstance(output, str) and output):
            raise DataError(f"{name}:{number}: each line must be a JSON object with a string \"instruction\" "
                            f"(and optionally a string \"input\")"
                            + (" and a non-empty string \"output\"" if answered else ""))
    return name, rows


def read_prompts(source: str) -> tuple[list[str], list[str]]:
    """Instructions and their inputs from JSON lines (``instruction``, optional string ``input``)."""
    _, rows = prompt_rows(source)
    return [row["instruction"] for _, row in rows], [row.get("input", "") for _, row in rows]


def generate(run: str, client: str, *, input: str | None, split: str | None, output: str | None, device: str,
             batch_size: int | None, progress: bool, max_new_tokens: int | None, data: str | None = None,
             task: str | None = None) -> str:
    """Answer the prompts of ``input`` (or the client's own ``split``) with client ``client`` of ``run`` (``new``:
    a newcomer placed by its own ``data``, instructions with their responses)."""
    model, who = client_model(run, client, split, data, task, "generation", device, batch_size, progress,
                              max_new_tokens)
    return answer(model, who, split, output,
                  lambda: [{"response": r} for r in model.generate(*read_prompts(input))])


def shown(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def client_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--client {text}: give a client id (a number) or new") from None


def export_client(run: str, client: str, *, out: str, fmt: str, merge: bool, overwrite: bool,
                  data: str | None = None, task: str | None = None, device: str = "auto") -> str:
    """Export client ``client`` of ``run`` (``new``: a newcomer placed by its own ``data``) to ``out``."""
    check_destination(out, fmt, overwrite)
    final, placed, own = chosen_final(run, client, data, task, device)
    if placed is None:
        metrics, measured = recorded_metrics(final.run, final.client), "this client's test split, final round"
    else:
        metrics, measured = placed, f"the newcomer's own {len(own)} examples, which chose its model: optimistic"
    folder = export(final, metrics, measured, out, fmt, merge, overwrite)
    who = "a newcomer to" if final.newcomer else f"client {client} of"
    return f"exported {who} {run} to {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir()))
