"""Scale of an open federation in one process: 20, 200 and 1,000 clients, 10 sampled a round.

Each size is one ``fedlease run`` (FedLEASE on the offline encoder and the built-in tasks, a quarter of the
clients on each task, a few examples per client as cross-device clients hold) in a fresh process: its peak RSS
is read from the kernel (``ru_maxrss`` of the finished child) and its seconds per round from the run's history,
over the adaptive rounds after the allocation (the last round, which evaluates every client, is reported
apart, as is the allocation round). The goal (issue 33): 1,000 clients within 1.25x of 20 clients for both.
Those rounds also hold the placements of the clients sampled there for the first time (each computes its data
signature, one inference pass over its data, and chooses its cluster: the allocation, for a late client); their
seconds, which each placed client reports, are summed per round and the round time is also given without them.

Apart from the runs, the allocation itself is timed at 1,000 clients, as if every one had warmed up: data
signatures of the real shape (the encoder's width x the largest label set) drawn at random, clustered by
``cluster_clients_by_embedding`` (the distance matrix, average linkage and silhouette for every K).

Prints one JSON object as the last line of stdout. ``--quick`` (the test suite runs it): a small size pair,
one round after the allocation, few examples; give ``--model_name`` to run on another model (the tests' tiny one).
Arguments after ``--`` go to every run as they are (for instance ``-- --max_batch_tokens 1024``) and are recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = ("import resource, sys\n"
         "from fedlease.cli import main\n"
         "code = main(sys.argv[1:])\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"  # KiB on Linux
         "sys.exit(code)\n")
TASKS = ("rotten_tomatoes", "snli", "newsgroups", "election_tweets")


def run_size(clients: int, per_round: int, rounds: int, warmup: int, samples: int, model: str | None,
             extra: list[str]) -> dict:
    """One run in a fresh process: peak RSS, wall time and the history's round times."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["run", "--tasks", *(f"{task}:{clients // len(TASKS)}" for task in TASKS),
                "--clients_per_round", str(per_round), "--global_rounds", str(rounds), "--warmup_rounds", str(warmup),
                "--local_epochs", "1", "--train_samples", str(samples), "--test_samples", str(max(4, samples // 2)),
                "--batch_size", "16", "--allow_overlap", "--precision", "fp32", "--output_dir", f"{tmp}/run",
                "--no_progress", *(["--model_name", model] if model else []), *extra]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"the run with {clients} clients failed:\n{proc.stderr[-3000:]}")
        history = json.loads((Path(tmp) / "run" / "training_history.json").read_text())
    seconds = [r["seconds"] for r in history["rounds"]]
    adaptive = seconds[warmup:-1]
    # the clients placed for the first time in those rounds: each one's placement (its data signature's inference
    # pass and the choice), timed by the client, within the round's seconds
    placing = [sum((c.get("train") or {}).get("placement_seconds", 0.0) for c in r["clients"].values())
               for r in history["rounds"][warmup:-1]]
    placed = [sum("placement_seconds" in (c.get("train") or {}) for c in r["clients"].values())
              for r in history["rounds"][warmup:-1]]
    return {"clients": clients, "clients_per_round": per_round, "peak_rss_mb": int(proc.stdout.split()[-1]) / 1024,
            "seconds_per_round_after_allocation": sum(adaptive) / len(adaptive),
            "placement_seconds_per_round": sum(placing) / len(placing),
            "clients_placed_per_round": sum(placed) / len(placed),
            "seconds_per_round_placements_apart": (sum(adaptive) - sum(placing)) / len(adaptive),
            "rounds_measured": len(adaptive), "allocation_round_seconds": seconds[warmup - 1],
            "last_round_seconds_every_client_evaluated": seconds[-1], "warmup_round_seconds": seconds[: warmup - 1],
            "experts": history["optimal_n_clusters"], "wall_seconds": wall}


def time_allocation(clients: int, width: int, blocks: int, max_clusters: int) -> dict:
    """The allocation's clustering over ``clients`` random data signatures of the real shape."""
    import torch

    from fedlease.clustering import cluster_clients_by_embedding

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(len(TASKS), width * blocks, generator=g)
    signatures = [centers[i % len(TASKS)] + 0.3 * torch.randn(width * blocks, generator=g) for i in range(clients)]
    start = time.perf_counter()
    result = cluster_clients_by_embedding(signatures, max_clusters, block_size=width)
    return {"clients": clients, "signature_numbers": width * blocks, "seconds": time.perf_counter() - start,
            "experts": result.num_clusters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes, few rounds (the test suite)")
    parser.add_argument("--model_name", default=None, help="model to run (default: the offline MiniLM encoder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="federation sizes to run, smallest first (default: 20 200 1000; quick: 8 40)")
    parser.add_argument("run_args", nargs="*", help="after --: more fedlease run arguments for every run")
    args = parser.parse_args()
    if args.quick:
        sizes, per_round, rounds, warmup, samples, allocation_clients = (8, 40), 4, 3, 1, 8, 200
    else:
        sizes, per_round, rounds, warmup, samples, allocation_clients = (20, 200, 1000), 10, 8, 2, 20, 1000
    sizes = args.sizes or sizes
    result: dict = {"benchmark": "open_federation", "samples_per_client": samples, "local_epochs": 1,
                    "rounds": rounds, "warmup_rounds": warmup, "extra_run_args": args.run_args, "runs": []}
    for clients in sizes:
        row = run_size(clients, per_round, rounds, warmup, samples, args.model_name, args.run_args)
        result["runs"].append(row)
        print(f"{clients} clients, {per_round} a round: peak RSS {row['peak_rss_mb']:.0f} MB, "
              f"{row['seconds_per_round_after_allocation']:.2f} s/round after the allocation "
              f"({row['placement_seconds_per_round']:.2f} of them placing {row['clients_placed_per_round']:.1f} "
              f"new clients)", flush=True)
    small, large = result["runs"][0], result["runs"][-1]
    result["ratio_largest_vs_smallest"] = {
        "peak_rss": large["peak_rss_mb"] / small["peak_rss_mb"],
        "seconds_per_round": large["seconds_per_round_after_allocation"] / small["seconds_per_round_after_allocation"],
        "seconds_per_round_placements_apart":
            large["seconds_per_round_placements_apart"] / small["seconds_per_round_placements_apart"]}
    result["allocation"] = time_allocation(allocation_clients, 384, 20, 4)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
