"""A Flower deployment on loopback against the in-process runner, on the same clients: message overhead, round time.

Runs one configuration (default: the quick start's, 8 clients of the built-in tasks, 128 / 64 examples, batch 16,
5 rounds with 3 of warmup, the offline MiniLM) three ways, one after another in this process:

1. the in-process runner (``fedlease run``);
2. ``fedlease deploy`` with the fedlease executor: one long-lived process per SuperNode, the model loaded once;
3. with ``--flower_executor``, also Flower's own executor: a new process, and a model load, per message.

Per deployment it reports, from the run's history:

- round wall time (the server's clock, train + evaluate + aggregate + artifacts), each round and its ratio to
  the in-process round (a deployment evaluates each round with the next round's training message, so its
  rounds' times are shifted by an evaluation: compare the later rounds together);
- the overhead of a training message, for each node's first message (it loads the model and tokenises the
  data) and for its later ones: ``total`` = the server's send-to-reply time (``round_trip_seconds``) minus the
  time the client spent training (``seconds``) and evaluating the previous round (``evaluation_seconds``);
  split into ``flower`` = send-to-reply minus the time the message spent in the ClientApp (``node_seconds``:
  SuperLink, SuperNode, its idle poll, the executor) and ``fedlease`` = ``node_seconds`` minus that work
  (loading the state into the model, the client's state files, extracting the upload).

All SuperNodes share this machine's cores: with N nodes each runs its torch with cores / N threads, the
in-process runner with all of them. Prints one JSON object as the last line of stdout and writes it to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedlease.config import RunConfig
from fedlease.runtime.flower.deploy import LoopbackDeployment
from fedlease.runtime.simulation import prepare_config, run


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3), "n": len(values)} if values else {}


def message_overheads(history: dict) -> dict:
    parts = {"first_message": {"total": [], "flower": [], "fedlease": []},
             "later_messages": {"total": [], "flower": [], "fedlease": []}}
    seen: set[str] = set()
    for rnd in history["rounds"]:
        for cid, client in sorted(rnd["clients"].items()):
            train = client.get("train") or {}
            if "round_trip_seconds" not in train:
                continue
            which = parts["later_messages" if cid in seen else "first_message"]
            work = train["seconds"] + train.get("evaluation_seconds", 0.0)  # training, and an evaluation it carried
            which["total"].append(train["round_trip_seconds"] - work)
            which["flower"].append(train["round_trip_seconds"] - train["node_seconds"])
            which["fedlease"].append(train["node_seconds"] - work)
            seen.add(cid)
    return {when: {part: summary(values) for part, values in split.items()} for when, split in parts.items()}


def deployment(config: RunConfig, workdir: Path, executor: str, threads: int) -> tuple[dict, float]:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the nodes' processes inherit it
    start = time.perf_counter()
    with LoopbackDeployment(workdir, config.num_clients, log=lambda _: None, executor=executor) as nodes:
        up = time.perf_counter() - start
        result = nodes.submit(config, round_timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"the {executor} deployment failed; see {workdir / 'logs'}")
    history = json.loads((Path(config.output_dir) / "training_history.json").read_text())
    return history, up


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the deployment's processes on the way out
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes:2", "snli:2", "newsgroups:2",
                                                       "election_tweets:2"])
    parser.add_argument("--global_rounds", type=int, default=5)
    parser.add_argument("--warmup_rounds", type=int, default=3)
    parser.add_argument("--train_samples", type=int, default=128)
    parser.add_argument("--test_samples", type=int, default=64)
    parser.add_argument("--method", default="fedlease")
    parser.add_argument("--flower_executor", action="store_true", help="also time Flower's per-message executor")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="fedlease-deploy-bench-") as tmp:
        root = Path(tmp)
        config = prepare_config(RunConfig(method=args.method, tasks=args.tasks, global_rounds=args.global_rounds,
                                          warmup_rounds=args.warmup_rounds, train_samples=args.train_samples,
                                          test_samples=args.test_samples, batch_size=16,
                                          output_dir=str(root / "in-process")))
        start = time.perf_counter()
        run(config, progress=False)
        in_process_wall = time.perf_counter() - start
        base = json.loads((root / "in-process" / "training_history.json").read_text())
        base_rounds = [r["seconds"] for r in base["rounds"]]
        report: dict = {
            "setting": {"clients": config.num_clients, "tasks": args.tasks, "rounds": config.global_rounds,
                        "warmup_rounds": config.warmup_rounds, "train_samples": config.train_samples,
                        "test_samples": config.test_samples, "method": config.method, "model": config.model_name,
                        "cores": cores, "machine": platform.processor() or platform.machine(),
                        # the in-process run's precision (auto: bf16 autocast only where the CPU has AVX512-BF16
                        # or AMX): round times of runs in different precisions are not comparable
                        "precision": base["precision"], "cpu_capability": torch.backends.cpu.get_cpu_capability()},
            "in_process": {"round_seconds": base_rounds, "wall_seconds": round(in_process_wall, 1),
                           "final_mean_accuracy": base["final"]["mean"]["accuracy"]},
        }
        executors = ["fedlease", "flower"] if args.flower_executor else ["fedlease"]
        for executor in executors:
            threads = max(1, cores // config.num_clients)
            out = root / f"deploy-{executor}"
            history, startup = deployment(dataclasses.replace(config, output_dir=str(out)), root / f"work-{executor}",
                                          executor, threads)
            rounds = [r["seconds"] for r in history["rounds"]]
            report[f"deploy_{executor}_executor"] = {
                "round_seconds": rounds,
                "round_ratio_to_in_process": [round(d / b, 2) for d, b in zip(rounds, base_rounds, strict=True)],
                "later_rounds_ratio": round(sum(rounds[1:]) / sum(base_rounds[1:]), 2),
                "message_overhead_seconds": message_overheads(history),
                "nodes_startup_seconds": round(startup, 1), "threads_per_node": threads,
                "final_mean_accuracy": history["final"]["mean"]["accuracy"],
            }
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
