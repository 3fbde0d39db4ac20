"""What length-grouped batches cost in accuracy, and save in time, against uniformly random batches.

``train.batch_indices`` shuffles a client's examples, sorts them by length within chunks of
``LENGTH_GROUP_BATCHES`` (50) batches and shuffles the batches: for a client of up to 50 batches the whole
client is one chunk, so a batch holds examples of nearly the same length and batch membership is largely the
same every epoch. With ``LENGTH_GROUP_BATCHES = 1`` a batch is a uniformly random draw. This runs local
training (every client alone, so nothing but the batching differs) both ways, for each seed, and reports the
per-task accuracy, the mean, the training time and, per client, the share of same-batch example pairs of one
epoch that share a batch again in the next.

Prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fedlease import train as T
from fedlease.config import RunConfig
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config, run


def repeated_pairs(lengths: torch.Tensor, batch_size: int, seed: int) -> float:
    """The share of same-batch example pairs of one epoch that share a batch again in the next epoch."""
    order = torch.Generator().manual_seed(seed)
    epochs = [T.batch_indices(lengths, batch_size, order) for _ in range(2)]
    together = [{(int(a), int(b)) for batch in epoch for a in batch for b in batch if a < b} for epoch in epochs]
    return len(together[0] & together[1]) / max(len(together[0]), 1)


def clients_of(config: RunConfig):
    prepared = prepare_config(config)
    return build_clients(prepared, load_partition(prepared)[1])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2:2", "qnli:2", "mrpc:2", "qqp:2"])
    parser.add_argument("--data_dir", default="../shared/glue")
    parser.add_argument("--model_name", default="auto", help="the encoder (default: the offline MiniLM)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--train_samples", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    grouped = T.LENGTH_GROUP_BATCHES
    for seed in args.seeds:
        for chunk in (grouped, 1):
            T.LENGTH_GROUP_BATCHES = chunk
            with tempfile.TemporaryDirectory() as out:
                config = RunConfig(tasks=args.tasks, data_dir=args.data_dir, model_name=args.model_name,
                                   method="local", seed=seed,
                                   global_rounds=args.rounds, warmup_rounds=1, train_samples=args.train_samples,
                                   test_samples=100, batch_size=16, output_dir=out)
                start = time.perf_counter()
                result = run(config, progress=False)
                seconds = time.perf_counter() - start
            final = result.final
            row = {"seed": seed, "batches": "length-grouped" if chunk > 1 else "random",
                   "tasks": {t: round(v["accuracy"], 4) for t, v in final["tasks"].items()},
                   "mean": round(final["mean"]["accuracy"], 4), "seconds": round(seconds, 1),
                   "repeated_batch_pairs": [round(repeated_pairs(c.train_data.example_lengths, 16, seed), 3)
                                            for c in clients_of(config)]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    T.LENGTH_GROUP_BATCHES = grouped
    print(json.dumps({"benchmark": "batch_grouping", "tasks": args.tasks, "train_samples": args.train_samples,
                      "rounds": args.rounds, "runs": rows,
                      "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                  "threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
