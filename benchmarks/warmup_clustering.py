"""How many warmup rounds FedLEASE needs before clustering LoRA B matrices finds the clients' tasks.

Runs FedLEASE's warmup phase (every client trains its own LoRA and head from the shared initialisation),
through the method's own client and server code, for ``--rounds`` rounds. After each round it clusters the
current warmup LoRAs exactly as FedLEASE's allocation would (B-matrix cosine distance, average linkage,
K by silhouette) and reports the chosen K, every K's silhouette, the adjusted Rand index of the chosen
clustering and of the clustering at the true number of tasks against the clients' tasks (1 = the clusters
are exactly the tasks, about 0 = no better than chance), and the mean B distance within and between tasks.

Prints one JSON object as the last line of stdout; ``--quick`` is a smaller run (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from sklearn.metrics import adjusted_rand_score

from fedlease.clustering import agglomerative, cluster_clients_by_lora_b
from fedlease.config import RunConfig
from fedlease.methods import create_method
from fedlease.methods.base import select
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config


def within_between(distances, tasks: list[str]) -> tuple[float, float]:
    n = len(tasks)
    within = [distances[i][j] for i in range(n) for j in range(i + 1, n) if tasks[i] == tasks[j]]
    between = [distances[i][j] for i in range(n) for j in range(i + 1, n) if tasks[i] != tasks[j]]
    return statistics.fmean(within), statistics.fmean(between)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2:2", "qnli:2", "mrpc:2", "qqp:2"])
    parser.add_argument("--data_dir", default="../shared/glue")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train_samples", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 64 examples per client")
    args = parser.parse_args()
    rounds, samples = (2, 64) if args.quick else (args.rounds, args.train_samples)
    config = prepare_config(RunConfig(
        tasks=args.tasks, data_dir=args.data_dir, global_rounds=rounds + 1, warmup_rounds=rounds,
        train_samples=samples, test_samples=8, batch_size=args.batch_size, lr=args.lr, seed=args.seed))
    _, splits = load_partition(config)
    _, clients, infos = build_clients(config, splits)
    method = create_method(config, infos)
    tasks = [info.task for info in infos]
    stores: dict[int, dict[str, torch.Tensor]] = {c.client_id: {} for c in clients}
    per_round = []
    for rnd in range(rounds):
        start = time.perf_counter()
        updates = {cid: method.client_train(clients[cid], ins, rnd, stores[cid])
                   for cid, ins in method.configure_train(rnd).items()}
        method.aggregate_train(rnd, updates)
        b = [select(updates[cid].state, ("lora_B",)) for cid in sorted(updates)]
        result = cluster_clients_by_lora_b(b, config.max_clusters)
        at_true_k = agglomerative(result.distances, len(set(tasks)))
        within, between = within_between(result.distances.tolist(), tasks)
        row = {"round": rnd + 1, "chosen_k": result.num_clusters, "labels": result.labels,
               "silhouette": {str(k): round(v, 4) for k, v in result.silhouette.items()},
               "ari_chosen": round(adjusted_rand_score(tasks, result.labels), 3),
               "ari_true_k": round(adjusted_rand_score(tasks, at_true_k), 3),
               "b_distance_within_task": round(within, 4), "b_distance_between_tasks": round(between, 4),
               "seconds": round(time.perf_counter() - start, 1)}
        per_round.append(row)
        print(f"warmup round {row['round']}: K={row['chosen_k']} labels {row['labels']} "
              f"ARI {row['ari_chosen']:.2f} (true K: {row['ari_true_k']:.2f}), B distance within task "
              f"{within:.3f} / between {between:.3f}, {row['seconds']}s", flush=True)
    print(json.dumps({"benchmark": "warmup_clustering", "tasks": tasks, "train_samples": samples,
                      "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "rounds": per_round,
                      "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                  "threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
