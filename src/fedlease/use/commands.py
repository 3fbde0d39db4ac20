"""``fedlease predict`` and ``fedlease export``: reading inputs, writing predictions, one line per bad input."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fedlease.config import RunConfig
from fedlease.data.tasks import Example, TaskSpec, get_spec
from fedlease.errors import ConfigError, DataError
from fedlease.runtime.clients import register_user_tasks
from fedlease.use.client import ClientModel, load_client, load_newcomer
from fedlease.use.export import export


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


def predict(run: str, client: str, *, input: str | None, split: str | None, output: str | None, device: str,
            batch_size: int | None, progress: bool, data: str | None = None, task: str | None = None) -> str:
    """Classify ``input`` (or the client's own ``split``) with client ``client`` of ``run`` (``new``: a newcomer
    placed by its own labelled ``data``); return a summary."""
    if client == "new":
        if data is None:
            raise ConfigError("--client new needs --data: the newcomer's own labelled examples (JSON lines)")
        if split is not None:
            raise ConfigError("--client new has no split of the run's; classify --input")
        from fedlease.use.final import run_history
        from fedlease.use.newcomer import newcomer_task

        config = RunConfig.from_dict(run_history(Path(run).expanduser())["config"])
        register_user_tasks(config)
        examples = read_labelled(data, get_spec(newcomer_task(config, task)))
        model, placed = load_newcomer(run, examples, task=task, device=device, batch_size=batch_size,
                                      progress=progress)
        chosen = f", expert {int(placed['expert'])}" if "expert" in placed else ""
        who = (f"a newcomer ({model.spec.name}{chosen}; accuracy {placed['accuracy']:.4f} on its own "
               f"{len(examples)} examples, which chose its model)")
    else:
        if data is not None or task is not None:
            raise ConfigError("--data and --task are for --client new")
        model = load_client(run, client_id(client), device=device, batch_size=batch_size, progress=progress)
        if not isinstance(model, ClientModel):
            raise ConfigError(f"{run} trained instruction tasks: use fedlease generate")
        who = f"client {client} ({model.spec.name})"
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


def read_prompts(source: str) -> tuple[list[str], list[str]]:
    """Instructions and their inputs from JSON lines (``instruction``, optional string ``input``)."""
    name, numbered = non_blank(source)
    rows = json_objects(name, numbered)
    for number, row in rows:
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("input", ""), str):
            raise DataError(f"{name}:{number}: each line must be a JSON object with a string \"instruction\" "
                            f"(and optionally a string \"input\")")
    return [row["instruction"] for _, row in rows], [row.get("input", "") for _, row in rows]


def generate(run: str, client: str, *, input: str | None, split: str | None, output: str | None, device: str,
             batch_size: int | None, progress: bool, max_new_tokens: int | None) -> str:
    """Answer the prompts of ``input`` (or the client's own ``split``) with client ``client`` of ``run``."""
    model = load_client(run, client_id(client), device=device, batch_size=batch_size, progress=progress,
                        max_new_tokens=max_new_tokens)
    if isinstance(model, ClientModel):
        raise ConfigError(f"{run} trained classification tasks: use fedlease predict")
    who = f"client {client} ({model.spec.name})"
    return answer(model, who, split, output,
                  lambda: [{"response": r} for r in model.generate(*read_prompts(input))])


def shown(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def client_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--client {text}: give a client id (a number) or new") from None


def export_client(run: str, client: str, *, out: str, fmt: str, merge: bool, overwrite: bool) -> str:
    folder = export(run, client_id(client), out, fmt, merge, overwrite)
    return f"exported client {client} of {run} to {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir()))
