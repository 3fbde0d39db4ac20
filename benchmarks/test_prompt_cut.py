"""How many test prompts ``--max_length`` cuts, per task: with the room the client's training answers leave (the
rule since 2026-12-02) and with half of the room whatever the task (the rule before). A cut prompt loses the end
of its instruction, which for the built-in label tasks holds the question and the answer options. Tokenizer
only, no model. Prints JSON.

    python benchmarks/test_prompt_cut.py --max_length 192 --train_samples 32 --test_samples 16 --seed 1
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoTokenizer

from fedlease.config import RunConfig
from fedlease.data.instructions import prompt_text
from fedlease.generation import PromptFormat
from fedlease.model.causal_lm import resolve_decoder_source
from fedlease.runtime.simulation import load_partition, prepare_config

TASKS = ["instruct_edit:2", "instruct_struct2text:2", "instruct_sentiment:2", "instruct_commonsense:2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--train_samples", type=int, default=100)
    parser.add_argument("--test_samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model_name", default="auto")
    args = parser.parse_args()
    config = prepare_config(RunConfig(tasks=args.tasks, train_samples=args.train_samples, seed=args.seed,
                                      test_samples=args.test_samples, max_length=args.max_length,
                                      model_name=args.model_name))
    source, local_only = resolve_decoder_source(config.model_name)
    fmt = PromptFormat(AutoTokenizer.from_pretrained(source, local_files_only=local_only), config.max_length)
    half = (config.max_length - fmt.scaffold) // 2
    report: dict[str, dict[str, int]] = {}
    for split in load_partition(config)[1]:
        room = min(max(len(fmt.response_ids(ex)) for ex in split.train), half)
        lengths = [len(fmt.ids(fmt.render(prompt_text(ex)))) for ex in split.test]
        counts = report.setdefault(split.task, {"test_prompts": 0, "cut_now": 0, "cut_at_half_the_room": 0})
        counts["test_prompts"] += len(lengths)
        counts["cut_now"] += sum(n > config.max_length - room for n in lengths)
        counts["cut_at_half_the_room"] += sum(n > config.max_length - half for n in lengths)
    print(json.dumps({"max_length": config.max_length, "train_samples": config.train_samples,
                      "test_samples": config.test_samples, "seed": config.seed, "tasks": report}, indent=2))


if __name__ == "__main__":
    main()
