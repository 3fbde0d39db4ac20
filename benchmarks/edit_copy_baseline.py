"""What answering ``instruct_edit`` by copying the altered sentence scores, per kind of edit and overall.

ROUGE (rouge-score, as every paper in this line uses it) lowercases and drops punctuation before it compares, so
an edit that restores case or punctuation is invisible to it: copying scores about 100 on those edits and about
0 on the word-segmentation ones. The cased exact match sees every edit. Prints JSON.

    python benchmarks/edit_copy_baseline.py > benchmarks/results/comparison_generation/edit_copy_baseline.json
"""

from __future__ import annotations

import json

from fedlease.data.instructions import EDITS, load_instruction_task
from fedlease.data.tasks import get_spec
from fedlease.generation import generation_metrics


def main() -> None:
    spec = get_spec("instruct_edit")
    _, test = load_instruction_task(spec)
    report, copies, references = {}, [], []
    for template, alter in EDITS:
        prefix = template.split("{text}")[0]
        rows = [ex for ex in test if ex.instruction.startswith(prefix)
                and ex.instruction[len(prefix):] == alter(ex.output)]
        copied = [ex.instruction[len(prefix):] for ex in rows]
        copies += copied
        references += [ex.output for ex in rows]
        metrics = generation_metrics(spec, copied, [ex.output for ex in rows])
        report[f"{prefix.strip()} ({alter.__name__})"] = {
            "examples": len(rows), **{k: round(100 * v, 2) for k, v in metrics.items()}}
    overall = generation_metrics(spec, copies, references)
    report["all"] = {"examples": len(copies), "of": len(test), **{k: round(100 * v, 2) for k, v in overall.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
