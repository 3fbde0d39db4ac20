"""Does the data signature see label skew? The plain mean embedding, the class blocks, and the default's two tiers.

``embed``: the mean of the frozen encoder's embeddings of a client's training examples (the default signature
until 2026-12-01). Under label skew within one task, that mean moves with the label mix only where the label
shows in the text (SST-2: yes; QNLI, whose label is the relation between a question and a sentence: hardly), so
it may see no structure (K = 1) where the clients' label mixes differ widely.

``class_embed``: block c of the signature is p_c times the mean embedding of the client's examples of class c
(p_c: the client's share of class c), the blocks concatenated (zero-padded to the largest label set of the
federation): what a client sends (``data_signature``). The blocks sum to ``embed``; two clients of one task with
opposite label mixes put their weight in different blocks, so their cosine distance is large, while clients of
one task with the same mix stay close. Across several tasks with label skew, though, the blocks may group
clients by label mix rather than by task. It reveals the client's label mix (as a trained head's bias does) and
its per-class centroids.

No training: the signatures need only the frozen encoder. Both are clustered with the default rule (average
linkage, K by silhouette over 2..4, K = 1 below 0.25), and so is the default allocation's two-tier rule
(``default``: the plain mean, the blocks' sum, first; the class blocks only where the mean finds K = 1).
Prints one JSON object per setting:

    python benchmarks/label_skew_signature.py --tasks qnli:8 --partition dirichlet --seed 1
"""

from __future__ import annotations

import argparse
import json

from sklearn.metrics import adjusted_rand_score

from fedlease.clustering import cluster_clients, cluster_clients_by_embedding, cosine_distances
from fedlease.config import RunConfig
from fedlease.methods.fedlease import PLAIN_LORA, data_signature
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--data_dir", default="../shared/glue")
    parser.add_argument("--model_name", default="auto", help="the encoder (default: the offline MiniLM)")
    parser.add_argument("--train_samples", type=int, default=250)
    parser.add_argument("--partition", default="balanced", choices=("balanced", "dirichlet"))
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min_silhouette", type=float, default=0.25)
    args = parser.parse_args()
    config = prepare_config(RunConfig(tasks=args.tasks, data_dir=args.data_dir, model_name=args.model_name,
                                      train_samples=args.train_samples,
                                      test_samples=8, seed=args.seed, partition=args.partition, alpha=args.alpha,
                                      global_rounds=2, warmup_rounds=1))
    _, splits = load_partition(config)
    _, clients, infos = build_clients(config, splits)
    width = max(max(len(info.labels), 1) for info in infos)
    plain, blocks = [], []
    for client in clients:
        client.apply(PLAIN_LORA, client.adapted.initial_state(config.seed))  # B = 0: the frozen encoder
        embeddings = client.embed(client.train_data)
        plain.append(embeddings.mean(0))
        blocks.append(data_signature(client, config.seed, width))  # the method's own (the default since 2026-12-01)
    tasks = [info.task for info in infos]
    mixes = [[round(float((c.train_data.labels == k).float().mean()), 3) for k in range(len(info.labels))]
             for c, info in zip(clients, infos, strict=True)]
    out = {"benchmark": "label_skew_signature", "tasks": tasks, "partition": args.partition, "alpha": args.alpha,
           "train_samples": args.train_samples, "seed": args.seed, "label_mix": mixes, "signatures": {}}
    results = {name: cluster_clients(cosine_distances([{"v": v} for v in vectors]), 4, None, args.min_silhouette,
                                     signature=name) for name, vectors in (("embed", plain), ("class_embed", blocks))}
    # the default allocation's rule: the mean (the blocks' sum) first, the class blocks where it finds K = 1
    results["default"] = cluster_clients_by_embedding(blocks, 4, None, args.min_silhouette,
                                                      block_size=blocks[0].numel() // width)
    for name, result in results.items():
        out["signatures"][name] = {
            "chosen_k": result.num_clusters, "labels": list(map(int, result.labels)), "decided_by": result.signature,
            "silhouette": {k: round(v, 4) for k, v in result.silhouette.items()},
            "ari_vs_tasks": round(float(adjusted_rand_score(tasks, result.labels)), 3)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
