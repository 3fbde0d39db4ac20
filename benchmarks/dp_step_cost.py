"""What record-level DP-SGD (``--dp_unit record``) costs in local training time, against the same training without DP.

``fit_private`` gets every example's gradient of a batch in one batched pass (``privacy.per_example``: Opacus'
hooks, with a grad sampler for the expert layer); before, it took a forward and a backward pass per example
(micro-batching, ``privacy.record.per_sample_gradients``, kept as the exact reference). For each task's first client
and each batch size this measures, on one thread and with the process's CPU clock (so the ratios hold when other
work shares the cores):

- ``gradients``: the same batches (``train.batch_indices``, seeded) differentiated three times: one batched
  ``backward`` of the batch's mean loss, the per-example gradients of its rows by micro-batching, and the same in
  one pass; ``ratio`` is micro-batched over batched CPU seconds, ``one_pass_ratio`` one pass over batched.
- ``local_call``: a whole local training call of one epoch, ``fit`` against ``fit_private`` (Poisson batches of
  the same expected size, per-example gradients in one pass, clipping and noise by Opacus' DPOptimizer, noise
  multiplier 1, clip 1), each from the same initial LoRA; the ratio is DP over plain CPU seconds per step.

Each figure is the best of ``--repeats`` runs after an untimed one. Prints one JSON object as the last line of
stdout. ``--quick`` (the test suite runs it): one task, one batch size, few examples; give ``--model_name`` to run
on another model.

    python benchmarks/dp_step_cost.py [--tasks rotten_tomatoes:1 snli:1] [--batch_sizes 16 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from fedlease import train as T
from fedlease.config import RunConfig
from fedlease.methods.base import LORA_PARTS
from fedlease.methods.fedlease import PLAIN_LORA
from fedlease.privacy import per_example
from fedlease.privacy import record as record_dp
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config

PARTS = (*LORA_PARTS, "head")


def cpu_seconds(work: Callable[[], object], repeats: int) -> float:
    """The least process CPU time of ``repeats`` calls of ``work``, after one untimed call (first-call costs)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def gradient_cost(client: T.LocalClient, batch_size: int, repeats: int, seed: int) -> dict:
    """Batched backward against micro-batched per-example gradients over the same batches of one epoch."""
    data = client.train_data
    params = client.adapted.set_trainable(PARTS)
    batches = T.batch_indices(data.example_lengths, batch_size, torch.Generator().manual_seed(seed))
    client.adapted.model.train()

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        return client.batch_loss(data, rows)

    def batched() -> None:
        for index in batches:
            loss_of(index).backward()
        client.adapted.model.zero_grad(set_to_none=True)

    def micro() -> None:
        for index in batches:
            record_dp.per_sample_gradients(loss_of, index, params)
        record_dp.release(params)

    def one_pass() -> None:
        with per_example.hooks(client.adapted.model):
            for index in batches:
                per_example.gradients(lambda rows: client.example_losses(data, rows), [index], params)

    plain, private = cpu_seconds(batched, repeats), cpu_seconds(micro, repeats)
    vectorised = cpu_seconds(one_pass, repeats)
    return {"batches": len(batches), "examples": len(data), "batched_cpu_s": round(plain, 6),
            "micro_batched_cpu_s": round(private, 6), "ratio": round(private / plain, 3),
            "one_pass_cpu_s": round(vectorised, 6), "one_pass_ratio": round(vectorised / plain, 3)}


def call_cost(client: T.LocalClient, batch_size: int, repeats: int, seed: int) -> dict:
    """One epoch's ``fit`` against ``fit_private`` (noise 1, clip 1, q = batch / n), each from the same start."""
    start_state = client.adapted.initial_state(seed)
    rate = record_dp.sample_rate(batch_size, client.num_train)
    steps: dict[str, int] = {}

    def plain() -> None:
        client.apply(PLAIN_LORA, start_state)
        client.record = None
        steps["plain"] = int(client.fit(PARTS, seed=seed, epochs=1)["steps"])

    def private() -> None:
        client.apply(PLAIN_LORA, start_state)
        client.record = record_dp.DPSGD(noise=1.0, clip=1.0, rate=rate, secret=seed)
        try:
            steps["dp"] = int(client.fit(PARTS, seed=seed, epochs=1)["steps"])
        finally:
            client.record = None

    plain_s, private_s = cpu_seconds(plain, repeats), cpu_seconds(private, repeats)
    per_plain, per_private = plain_s / steps["plain"], private_s / steps["dp"]
    return {"steps": steps["plain"], "dp_steps": steps["dp"], "poisson_rate": round(rate, 4),
            "plain_cpu_s_per_step": round(per_plain, 6),
            "dp_cpu_s_per_step": round(per_private, 6), "ratio": round(per_private / per_plain, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes:1", "snli:1"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--train_samples", type=int, default=128)
    parser.add_argument("--model_name", default="auto", help="the encoder (default: the offline MiniLM)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one task, one batch size, 16 examples, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.batch_sizes, args.train_samples, args.repeats = args.tasks[:1], [8], 16, 1
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        config = prepare_config(RunConfig(tasks=args.tasks, model_name=args.model_name, method="fedit",
                                          seed=args.seed, train_samples=args.train_samples, test_samples=4,
                                          precision="fp32", output_dir=out))
        clients = build_clients(config, load_partition(config)[1])[1]
        for task in dict.fromkeys(c.spec.name for c in clients):
            client = next(c for c in clients if c.spec.name == task)
            for batch_size in args.batch_sizes:
                client.settings = replace(client.settings, batch_size=batch_size)
                client.apply(PLAIN_LORA, client.adapted.initial_state(args.seed))
                row = {"task": task, "batch_size": batch_size,
                       "gradients": gradient_cost(client, batch_size, args.repeats, args.seed),
                       "local_call": call_cost(client, batch_size, args.repeats, args.seed)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "dp_step_cost", "quick": args.quick, "model": args.model_name,
                      "train_samples": args.train_samples, "repeats": args.repeats, "precision": "fp32",
                      "rows": rows, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                "torch": torch.__version__, "threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
