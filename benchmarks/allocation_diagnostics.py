"""Why FedLEASE's warmup B matrices do (not) find the clients' tasks: signatures compared, setting by setting.

For one setting (tasks, examples per client, batch, seed, warmup variant) this runs FedLEASE's warmup through
the method's own client and server code and, after every warmup round, compares the clients by several
signatures, each with the paper's rule (average linkage, K = best silhouette over 2..max_clusters):

- ``b``: the paper's signature, 1 - cos(vec B_i, vec B_j) per LoRA site, mean over sites;
- ``ba``: the same on the full update vec(B A) (invariant to how A and B split it);
- ``b_centered`` / ``ba_centered``: the same after subtracting the mean over clients (the server can do this;
  it removes what every client's update has in common);
- ``a_delta``: A's change from the shared initialisation;
- ``head``: the head's change from the shared initialisation;
and, once, before any training (round 0):
- ``grad0``: the full-batch gradient of every B at the shared initialisation (B = 0, shared A and head), one
  pass over the client's training split with no optimiser and no dropout: what one full-batch SGD step would
  upload; ``grad0_centered`` the same centred over clients;
- ``embed``: the data signature of ``--allocation embedding`` (``fedlease.methods.fedlease.data_signature``): the
  frozen encoder's embeddings of the client's training examples, class by class (block c: the share of class c
  times the mean embedding of its examples; the blocks sum to the mean embedding, as FedRouter-style methods use),
  padded to the federation's largest label set as the method sends it; ``embed_centered`` the same centred over
  clients.

For each signature and round it reports the mean distance within / between tasks, the chosen K, its silhouette,
the adjusted Rand index (ARI) of the chosen clustering and of the clustering at the true number of tasks against
the tasks (1 = exactly the tasks), and every distance matrix, so other rules for K can be evaluated offline.

Prints one JSON object as the last line of stdout (and writes it to ``--out`` as it goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, silhouette_score

from fedlease import train as T
from fedlease.clustering import agglomerative, canonical_labels
from fedlease.config import RunConfig
from fedlease.methods import create_method
from fedlease.methods.base import select
from fedlease.methods.fedlease import PLAIN_LORA, data_signature
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config
from fedlease.train import LocalClient, batch_indices, make_batch


def cosine_distances(vectors: dict[str, torch.Tensor], centered: bool) -> np.ndarray:
    """Mean over sites of 1 - cosine; ``vectors[site]`` is (N, d)."""
    total = None
    for flat in vectors.values():
        flat = flat.double()
        if centered:
            flat = flat - flat.mean(0, keepdim=True)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = 1.0 - unit @ unit.t()
        total = d if total is None else total + d
    distances = (total / len(vectors)).clamp_min(0.0).numpy()
    np.fill_diagonal(distances, 0.0)
    return (distances + distances.T) / 2


def stack_sites(states: list[dict[str, torch.Tensor]], suffix: str) -> dict[str, torch.Tensor]:
    sites = sorted(k for k in states[0] if k.endswith(suffix))
    return {site: torch.stack([s[site].reshape(-1).float() for s in states]) for site in sites}


def full_update(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    sites = sorted(k.removesuffix(".lora_B") for k in states[0] if k.endswith(".lora_B"))
    return {site: torch.stack([(s[f"{site}.lora_B"].float() @ s[f"{site}.lora_A"].float()).reshape(-1)
                               for s in states]) for site in sites}


def lora_b_gradient(client: LocalClient, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full-batch gradient of the mean training loss w.r.t. every lora_B at ``initial`` (no dropout)."""
    client.apply(PLAIN_LORA, initial)
    params = client.adapted.set_trainable(("lora_B",))
    model = client.adapted.model
    model.eval()
    data, settings = client.train_data, client.settings
    for index in batch_indices(data.lengths, settings.eval_batch_size, None):
        batch = make_batch(data, index, settings.device)
        with settings.autocast():
            loss = F.cross_entropy(client.logits(batch), data.labels[index].to(settings.device), reduction="sum")
        (loss / len(data)).backward()
    names = list(client.adapted.tensors(("lora_B",)))
    grads = {name: p.grad.detach().cpu().clone() for name, p in zip(names, params, strict=True)}
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return grads


def evaluate_signature(distances: np.ndarray, tasks: list[str], max_clusters: int) -> dict:
    n, true_k = len(tasks), len(set(tasks))
    within = [distances[i, j] for i in range(n) for j in range(i + 1, n) if tasks[i] == tasks[j]]
    between = [distances[i, j] for i in range(n) for j in range(i + 1, n) if tasks[i] != tasks[j]]
    silhouettes, labelings = {}, {}
    for k in range(2, min(max_clusters, n - 1) + 1):
        labelings[k] = agglomerative(distances, k)
        silhouettes[k] = float(silhouette_score(distances, labelings[k], metric="precomputed"))
    chosen = max(silhouettes, key=lambda k: (silhouettes[k], -k))
    row = {
        "within": round(statistics.fmean(within), 4) if within else None,
        "between": round(statistics.fmean(between), 4) if between else None,
        "chosen_k": chosen, "silhouette": {str(k): round(v, 4) for k, v in silhouettes.items()},
        "labels": labelings[chosen], "ari_chosen": round(adjusted_rand_score(tasks, labelings[chosen]), 3),
        "distances": distances.round(5).tolist(),
    }
    if 1 < true_k < n:
        at_true = labelings.get(true_k) or agglomerative(distances, true_k)
        row["ari_true_k"] = round(adjusted_rand_score(tasks, at_true), 3)
        row["silhouette_of_tasks"] = round(float(silhouette_score(
            distances, canonical_labels([sorted(set(tasks)).index(t) for t in tasks]), metric="precomputed")), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2:2", "qnli:2", "mrpc:2", "qqp:2"])
    parser.add_argument("--data_dir", default="../shared/glue")
    parser.add_argument("--model_name", default="auto", help="the encoder (default: the offline MiniLM)")
    parser.add_argument("--rounds", type=int, default=2, help="warmup rounds (0: only the round-0 signatures)")
    parser.add_argument("--train_samples", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--local_epochs", type=int, default=2)
    parser.add_argument("--max_clusters", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--random_batches", action="store_true",
                        help="uniformly random batches instead of length-grouped ones")
    parser.add_argument("--identical_data", action="store_true",
                        help="every client of a task gets the first one's slice: what remains is training noise")
    parser.add_argument("--partition", default="balanced", choices=("balanced", "dirichlet"))
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--no_gradient", action="store_true", help="skip the round-0 gradient signature (slow)")
    parser.add_argument("--label", default="", help="a name for this setting in the output")
    parser.add_argument("--out", help="also write the JSON here after every round")
    args = parser.parse_args()
    if args.random_batches:
        T.LENGTH_GROUP_BATCHES = 1  # chunks of one batch: batch membership is uniformly random
    config = prepare_config(RunConfig(
        tasks=args.tasks, data_dir=args.data_dir, model_name=args.model_name, global_rounds=args.rounds + 2,
        warmup_rounds=max(args.rounds, 1),
        train_samples=args.train_samples, test_samples=8, batch_size=args.batch_size, lr=args.lr,
        local_epochs=args.local_epochs, max_clusters=args.max_clusters, seed=args.seed, partition=args.partition,
        alpha=args.alpha))
    _, splits = load_partition(config)
    if args.identical_data:
        first = {}
        splits = [dataclasses.replace(s, train=first.setdefault(s.task, s.train)) for s in splits]
    _, clients, infos = build_clients(config, splits)
    method = create_method(config, infos)
    tasks = [info.task for info in infos]
    result = {"benchmark": "allocation_diagnostics", "label": args.label, "tasks": tasks,
              "train_samples": args.train_samples, "batch_size": args.batch_size, "lr": args.lr,
              "local_epochs": args.local_epochs, "seed": args.seed, "random_batches": args.random_batches,
              "identical_data": args.identical_data, "partition": args.partition, "alpha": args.alpha,
              "rounds": [], "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                        "threads": torch.get_num_threads()}}

    def emit(row: dict) -> None:
        result["rounds"].append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(result) + "\n")
        summary = ", ".join(f"{name} K={s['chosen_k']} ARI {s['ari_chosen']:.2f}/{s.get('ari_true_k', 0):.2f} "
                            f"d {s['within']}/{s['between']}" for name, s in row["signatures"].items())
        print(f"round {row['round']}: {summary}", flush=True)

    start = time.perf_counter()
    initial = clients[0].adapted.initial_state(config.seed)
    blocks = method.signature_blocks()  # every client's signature has the federation's largest label set
    signatures = {"embed": ({"mean": torch.stack([data_signature(client, config.seed, blocks) for client in clients])},
                            False)}
    signatures["embed_centered"] = (signatures["embed"][0], True)
    if not args.no_gradient:
        grad_sites = stack_sites([lora_b_gradient(client, initial) for client in clients], ".lora_B")
        signatures.update(grad0=(grad_sites, False), grad0_centered=(grad_sites, True))
    emit({"round": 0, "seconds": round(time.perf_counter() - start, 1), "signatures": {
        name: evaluate_signature(cosine_distances(vectors, centered), tasks, config.max_clusters)
        for name, (vectors, centered) in signatures.items()}})

    head_init = select(initial, ("head",))
    stores: dict[int, dict[str, torch.Tensor]] = {c.client_id: {} for c in clients}
    for rnd in range(args.rounds):
        start = time.perf_counter()
        updates = {cid: method.client_train(clients[cid], ins, rnd, stores[cid])
                   for cid, ins in method.configure_train(rnd).items()}
        states = [updates[cid].state for cid in sorted(updates)]
        b, ba = stack_sites(states, ".lora_B"), full_update(states)
        a_delta = {site: flat - initial[site].reshape(1, -1)
                   for site, flat in stack_sites(states, ".lora_A").items()}
        heads = {"head": torch.stack([torch.cat([(s[k] - head_init[k]).reshape(-1) for k in sorted(head_init)])
                                      for s in states])}
        emit({"round": rnd + 1, "seconds": round(time.perf_counter() - start, 1),
              "train_loss": {str(cid): round(u.metrics["train_loss"], 4) for cid, u in updates.items()},
              "signatures": {name: evaluate_signature(cosine_distances(vectors, centered), tasks,
                                                      config.max_clusters)
                             for name, vectors, centered in (("b", b, False), ("b_centered", b, True),
                                                             ("ba", ba, False), ("ba_centered", ba, True),
                                                             ("a_delta", a_delta, False),
                                                             ("head", heads, False))}})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
