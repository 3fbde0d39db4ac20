"""``fedlease predict`` and ``fedlease export``: reading inputs, writing predictions, one line per bad input."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fedlease.errors import DataError
from fedlease.use.client import load_client
from fedlease.use.export import export


def read_lines(source: str) -> tuple[str, list[str]]:
    """(a name for messages, the lines) of a file, or of stdin for ``-``."""
    if source == "-":
        return "<stdin>", sys.stdin.read().splitlines()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"--input {source}: no such file")
    return source, path.read_text(encoding="utf-8").splitlines()


def read_inputs(source: str, pair: bool) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts for a pair task) from JSON lines (objects with ``text`` and, for a pair task,
    ``text_pair``) or plain text (one text a line); a file is JSON lines when its first non-blank line is an
    object. Blank lines are skipped; a malformed line is refused, naming its file and line."""
    name, lines = read_lines(source)
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(f"--input {name}: no input (the file is empty)")
    if not numbered[0][1].lstrip().startswith("{"):
        if pair:
            raise DataError(f"--input {name}: this client's task classifies text pairs; give JSON lines with "
                            f"\"text\" and \"text_pair\"")
        return [line for _, line in numbered], None
    texts, pairs = [], []
    for number, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{name}:{number}: each line must be a JSON object with a string \"text\"")
        if pair and not isinstance(row.get("text_pair"), str):
            raise DataError(f"{name}:{number}: this client's task classifies text pairs; the line has no string "
                            f"\"text_pair\"")
        texts.append(row["text"])
        pairs.append(row.get("text_pair"))
    return texts, pairs if pair else None


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


def predict(run: str, client: int, *, input: str | None, split: str | None, output: str | None, device: str,
            batch_size: int | None, progress: bool) -> str:
    """Classify ``input`` (or the client's own ``split``) with client ``client`` of ``run``; return a summary."""
    model = load_client(run, client, device=device, batch_size=batch_size, progress=progress)
    if split is not None:
        metrics, rows = model.evaluate(split)
        write_rows(rows, output)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        return f"client {client} ({model.spec.name}), its {split} split: {len(rows)} examples, {shown}"
    assert input is not None
    texts, pairs = read_inputs(input, model.spec.pair)
    rows = model.predict(texts, pairs)
    write_rows(rows, output)
    return f"client {client} ({model.spec.name}): {len(rows)} predictions"


def export_client(run: str, client: int, *, out: str, fmt: str, merge: bool, overwrite: bool) -> str:
    folder = export(run, client, out, fmt, merge, overwrite)
    return f"exported client {client} of {run} to {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir()))
