"""What differential privacy does to FedLEASE's allocation: its ARI against the clients' tasks at each epsilon.

Each (allocation, epsilon) is one ``fedlease run`` that stops right after the allocation (``--global_rounds`` =
warmup + 1): the clients warm up; with the paper's allocation their warmup uploads, with the default allocation
their data signatures, are noised on the client at the noise ``--dp_epsilon`` calibrates for the whole run (the
default allocation's warmup uploads are clipped only, and released as the experts' noised starting means), and the
server clusters what it received. epsilon ``inf`` is the run without DP. ``--unit record`` runs record-level DP instead
(``--dp_unit record``: DP-SGD on every client, epsilon per client for one example, the signature noised at the
client's noise multiplier over its example count; a record run's noise multiplier in the table is the largest over
its clients). Every run writes its history under ``--out``; the table
(one JSON line per run and a Markdown table) is re-derived from those histories by ``--table-only``.

    python benchmarks/private_allocation.py --out benchmarks/results/private_allocation [--epsilons inf 8 4 2 1]
        [--seeds 1] [--allocations embedding paper] [--unit client|record] -- <fedlease run settings>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sklearn.metrics import adjusted_rand_score


def run_dir(out: Path, allocation: str, epsilon: str, seed: int, unit: str = "client") -> Path:
    """A run's folder; record-level runs are named apart (the run without DP is the same for both units)."""
    tag = "record_" if unit == "record" and epsilon != "inf" else ""
    return out / "runs" / f"{allocation}_{tag}eps{epsilon}_s{seed}"


def finished(folder: Path) -> bool:
    path = folder / "training_history.json"
    return path.exists() and json.loads(path.read_text()).get("final") is not None


def row(folder: Path) -> dict:
    history = json.loads((folder / "training_history.json").read_text())
    clustering = history["clustering"]
    task_of = {c["client_id"]: c["task"] for c in history["clients"]}
    clients = clustering.get("clients") or list(range(len(clustering["labels"])))
    privacy = history.get("privacy", {})
    unit = history["config"].get("dp_unit", "client") if history["config"].get("dp_clip") is not None else "-"
    return {"run": folder.name, "allocation": history["config"]["allocation"], "unit": unit,
            "target_epsilon": history["config"].get("dp_epsilon"), "epsilon_spent": privacy.get("epsilon"),
            "noise_multiplier": privacy.get("noise_multiplier") if unit != "record" else
            max(c["noise_multiplier"] for c in privacy["clients"].values()),
            "clip": privacy.get("clip"),
            "delta": privacy.get("delta"), "seed": history["config"]["seed"], "K": clustering["num_clusters"],
            "ari": adjusted_rand_score([task_of[c] for c in clients], clustering["labels"])}


def table(out: Path) -> str:
    rows = [row(folder) for folder in sorted((out / "runs").iterdir()) if finished(folder)]
    (out / "ari.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| allocation | DP unit | target epsilon | noise multiplier | epsilon spent | seed | K | ARI vs tasks |",
             "|---|---|---|---|---|---|---|---|"]
    order = {"-": 0, "client": 1, "record": 2}
    for r in sorted(rows, key=lambda r: (r["allocation"], order[r["unit"]], -(r["target_epsilon"] or float("inf")),
                                         r["seed"])):
        eps = "inf (no DP)" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        noise = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        lines.append(f"| {r['allocation']} | {r['unit']} | {eps} | {noise} | {spent} | {r['seed']} | {r['K']} "
                     f"| {r['ari']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "ari.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", nargs="+", default=["inf", "8", "4", "2", "1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--allocations", nargs="+", default=["embedding", "paper"])
    parser.add_argument("--clip", default="1.0")
    parser.add_argument("--delta", default="1e-5")
    parser.add_argument("--warmup_rounds", type=int, default=2)
    parser.add_argument("--unit", choices=("client", "record"), default="client",
                        help="what DP protects: a client's data (DP-FedAvg) or one example (DP-SGD, --dp_unit record; "
                             "epsilon per client, the signature noised at sigma / n)")
    parser.add_argument("--table-only", action="store_true")
    args, settings = parser.parse_known_args()
    settings = [s for s in settings if s != "--"]
    if not args.table_only:
        for allocation in args.allocations:
            for epsilon in args.epsilons:
                for seed in args.seeds:
                    folder = run_dir(args.out, allocation, epsilon, seed, args.unit)
                    if finished(folder):
                        continue
                    dp = [] if epsilon == "inf" else ["--dp_clip", args.clip, "--dp_epsilon", epsilon,
                                                       "--dp_delta", args.delta, "--dp_unit", args.unit]
                    command = [sys.executable, "-m", "fedlease", "run", *settings, "--allocation", allocation,
                               "--warmup_rounds", str(args.warmup_rounds), "--global_rounds",
                               str(args.warmup_rounds + 1), "--seed", str(seed), "--output_dir", str(folder),
                               "--no_progress", "--overwrite", *dp]
                    print(" ".join(command[1:]), flush=True)
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(table(args.out))


if __name__ == "__main__":
    main()
