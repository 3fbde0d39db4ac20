"""Build the built-in instruction corpora that do not derive from the classification corpora.

Two real data sets with human-written responses, read straight out of the BIG-bench 1.0.0 source archive
(``pip download --no-deps --no-binary :all: bigbench==1.0.0``; never installed or imported):

- ``instruct_struct2text``: E2E NLG (Novikova et al. 2017, via GEM; CC BY-SA 4.0), a restaurant's meaning
  representation -> a one-sentence description. BIG-bench carries GEM's test split: 1000 references of 213
  meaning representations. Split by meaning representation (20 % held out), so no test input is seen in training.
- ``instruct_commonsense``: Social IQa (Sap et al. 2019; CC BY 4.0), a social situation and a question -> the
  answer, among three options. 1954 questions, 20 % held out by a hash of the context.

Writes ``corpora/<task>.<split>.jsonl.xz`` (``{"instruction", "output"}`` per line, FLAN-style templates chosen
by a hash of the input) and ``corpora/instructions_manifest.json`` (rows, SHA-256 of the uncompressed text).
Deterministic: running it again gives byte-identical files.

Usage: python tools/build_instruction_data.py [--download-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "fedlease" / "data" / "corpora"
ARCHIVE = "bigbench-1.0.0.tar.gz"
TASKS_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks"
HELD_OUT = 0.2

E2E_TEMPLATES = (
    "Attributes: {mr}. Produce a detailed sentence about this restaurant.",
    "Data: {mr}\n\nWhat would a sentence about this data be like?",
    "Generate a descriptive sentence about a restaurant using the following words:\n\n{mr}",
    "Here is some data about a restaurant: {mr}. Write a sentence that includes the above data about a restaurant",
    "Write a sentence that is about a restaurant with all the following properties: {mr}",
)
SOCIAL_IQA_TEMPLATES = (
    "{context}\n\nGiven the context: {question}\n\n{options}",
    "{context}\n\nGiven that the answer to a question is one of the options below, what is the answer to "
    "\"{question}\"?\n\n{options}",
    "Context: {context}\nQuestion: {question}\nWhich one of these answers best answers the question according to "
    "the context?\n{options}",
    "{context} {question}\n\nWhich of the following answers is right?\n{options}",
)


def stable_fraction(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(templates: tuple[str, ...], key: str) -> str:
    return templates[int(stable_fraction("template", key) * len(templates))]


def read_task(archive: Path, name: str) -> list[dict]:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile(f"{TASKS_DIR}/{name}/task.json")
        assert handle is not None
        return json.load(handle)["examples"]


def build_e2e(archive: Path) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    seen = set()
    for ex in read_task(archive, "gem/e2e_nlg"):
        mr, target = ex["input"].strip(), ex["target"]
        target = (target[0] if isinstance(target, list) else target).strip()
        if (mr, target) in seen:
            continue
        seen.add((mr, target))
        record = {"instruction": pick(E2E_TEMPLATES, mr).format(mr=mr), "output": target}
        splits["validation" if stable_fraction("e2e-split", mr) < HELD_OUT else "train"].append(record)
    return splits


def build_social_iqa(archive: Path) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for ex in read_task(archive, "social_iqa"):
        text = ex["input"].strip()
        answers = [choice for choice, score in ex["target_scores"].items() if score == 1]
        if len(answers) != 1:
            continue
        # the input is "<context> <question>": the question is the last sentence
        context, _, question = text.rpartition(". ")
        context, question = (context + ".", question) if context else ("", text)
        options = "OPTIONS:\n" + "\n".join(f"- {c}" for c in ex["target_scores"])
        instruction = pick(SOCIAL_IQA_TEMPLATES, text).format(context=context, question=question, options=options)
        record = {"instruction": instruction.strip(), "output": answers[0].strip()}
        splits["validation" if stable_fraction("siqa-split", context) < HELD_OUT else "train"].append(record)
    return splits


BUILDERS = {"instruct_struct2text": build_e2e, "instruct_commonsense": build_social_iqa}


def write_split(path: Path, records: list[dict]) -> str:
    records = sorted(records, key=lambda r: stable_fraction("order", r["instruction"], r["output"]))
    payload = ("\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records) + "\n").encode()
    path.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    return hashlib.sha256(payload).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download-dir", type=Path, default=None, help="where the archive is (or goes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        download_dir = args.download_dir or Path(tmp)
        archive = download_dir / ARCHIVE
        if not archive.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", str(download_dir), "bigbench==1.0.0"], check=True)
        manifest = {}
        for task, build in BUILDERS.items():
            manifest[task] = {}
            for split, records in build(archive).items():
                digest = write_split(args.out / f"{task}.{split}.jsonl.xz", records)
                manifest[task][split] = {"rows": len(records), "sha256_uncompressed": digest}
    (args.out / "instructions_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
