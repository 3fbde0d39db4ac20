"""Utility against privacy: accuracy of each method at each epsilon, client-level (a large federation) or
record-level (DP-SGD on each client, ``--unit record``).

Client-level DP (DP-FedAvg) noises every aggregate at ``sigma x clip`` and divides by the expected number of its
contributors, so it can only work where many clients contribute to each aggregate in a round. Each (epsilon,
method, seed) is one ``fedlease compare`` run under ``--out/runs/eps<E>/<method>/``; epsilon ``inf`` is the run
without DP, with ``--max_update_norm 1e9`` so that each update reports its change's L2 norm (nothing is rejected):
the norms the clip cuts at the other epsilons. A run that was cut resumes (``--resume``). The table (one JSON line
per run and a Markdown table) is re-derived from the histories by ``--table-only``.

For each DP run the table gives what each aggregate receives in a round: the contributors it expects (the sample
rate times its clients: the federation for a shared adapter, a cluster for FedLEASE's experts, one label set for a
head, within a cluster for FedLEASE; the smallest such group) and the standard deviation of the noise per number of
its average, noise x clip / contributors; the contributors per aggregate at which that noise would equal the most
a round's average can move one number, clip / sqrt(d) when every contributor's clipped change points the same way
(d: the numbers of one upload), which is noise x sqrt(d); and how much of the epsilon spent went to what the method
releases before its aggregates (FedLEASE's data signature, released once and unsampled, and its warmup release), by
the same accountant.

``--unit record`` runs each client's local training as DP-SGD instead (``--dp_unit record``: per-example clipping
at ``--clip``, noise every step, epsilon per client and per example, the server adding nothing), FFA-LoRA's paper's
setting (arXiv 2403.12313: epsilon 6, 3, 1, delta 1e-5). Its rows give each client's noise multiplier (they differ
with the clients' sizes) and the largest epsilon a client spent; the aggregate columns, client-level notions, are
left empty. Both units end with a summary over seeds: per method and epsilon the final accuracy's mean and sd and
its change from the same seed's run without DP (a drop that freezing A makes smaller is FFA-LoRA's finding), and
each task's accuracy over seeds beside a uniform guess's (which tasks still learn where the mean falls).

    python benchmarks/dp_utility.py --out benchmarks/results/dp_utility_builtin [--epsilons inf 8 2]
        [--methods fedlease fedit ffa_lora] [--seeds 1] [--clip 0.5] [--delta 1e-5] [--unit client|record]
        -- <fedlease compare settings>
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from fedlease.config import RunConfig
from fedlease.methods import METHODS
from fedlease.privacy.accounting import epsilon
from fedlease.report.comparison import describe_allocation, row_name


def run_dir(out: Path, epsilon: str, method: str) -> Path:
    return out / "runs" / f"eps{epsilon}" / method


def read_history(path: Path) -> dict:
    """A run's history; committed ones are gzipped (a 1,000-client history is megabytes of JSON)."""
    if path.suffix == ".gz":
        return json.loads(gzip.decompress(path.read_bytes()))
    return json.loads(path.read_text())


def histories(out: Path) -> list[Path]:
    found = [p for pattern in ("training_history.json", "training_history.json.gz")
             for p in (out / "runs").glob(f"eps*/*/*/seed_*/{pattern}")]
    return sorted(p for p in found if read_history(p).get("final") is not None)


def finished(out: Path, epsilon: str, method: str, seed: int) -> bool:
    path = run_dir(out, epsilon, method) / method / f"seed_{seed}" / "training_history.json"
    return path.exists() and json.loads(path.read_text()).get("final") is not None


def row(path: Path) -> dict:
    history = read_history(path)
    config, privacy = history["config"], history.get("privacy") or {}
    labels = {c["task"]: len(c["labels"]) for c in history["clients"]}
    trained = [c for r in history["rounds"] for c in r["clients"].values() if c.get("train")]
    norms = [c["train"]["change_norm"] for c in trained if "change_norm" in c["train"]]
    method = config["method"]
    label = row_name(method, config)
    clustering = history.get("clustering") or {}
    experts = clustering.get("num_clusters", 1) if method == "fedlease" else 1
    result = {"run": str(path.parent), "method": label, "seed": config["seed"],
              "target_epsilon": config.get("dp_epsilon"), "epsilon_spent": privacy.get("epsilon"),
              "delta": privacy.get("delta"), "noise_multiplier": privacy.get("noise_multiplier"),
              "clip": privacy.get("clip"), "sample_rate": config.get("sample_rate"),
              "clients": len(history["clients"]), "rounds": len(history["rounds"]), "experts": experts,
              "allocation": describe_allocation(history) or "-",
              "upload_params": statistics.median(c["upload_params"] for c in trained),
              "accuracy": history["final"]["mean"]["accuracy"],
              "task_labels": labels,
              "task_accuracy": {task: scores["accuracy"] for task, scores in history["final"]["tasks"].items()},
              "best_round_accuracy": history["final"]["oracle_best_mean"]["accuracy"],
              "median_change_norm": statistics.median(norms) if norms else None,
              "minutes": sum(r["seconds"] for r in history["rounds"]) / 60}
    result["unit"] = privacy.get("unit", "client") if privacy else "-"
    if result["unit"] == "record":
        # each client's noise multiplier is calibrated for its own rate q = batch / examples; the largest spends most
        noises = [c["noise_multiplier"] for c in privacy["clients"].values()]
        result["noise_multiplier"], result["noise_multiplier_min"] = max(noises), min(noises)
        result["sample_rate"] = max(c["sample_rate"] for c in privacy["clients"].values())
    elif result["noise_multiplier"] is not None:
        # the contributors each aggregate expects in a round, and the noise per number that gives its average
        q, total = result["sample_rate"], result["clients"]
        labels_of = {c["client_id"]: json.dumps(c["labels"]) for c in history["clients"]}
        if experts > 1:  # FedLEASE's clusters split the federation: shares as the allocation found them
            allocated = clustering.get("clients") or list(range(len(clustering["labels"])))
            adapters = Counter(clustering["labels"])
            heads = Counter(zip(clustering["labels"], (labels_of[c] for c in allocated), strict=True))
            scale = total / len(allocated)
        else:
            adapters, heads, scale = Counter({0: total}), Counter(labels_of.values()), 1.0
        noise = result["noise_multiplier"] * result["clip"]
        result["adapter_contributors"] = q * scale * min(adapters.values())
        result["head_contributors"] = q * scale * min(heads.values())
        result["adapter_noise_sd"] = noise / result["adapter_contributors"]
        result["head_noise_sd"] = noise / result["head_contributors"]
        # the contributors at which the noise per number equals the most a round's average can move a number:
        # clip / sqrt(d), every contributor's clipped change pointing the same way (d: the upload's numbers)
        result["cohort_for_noise_at_most_signal"] = math.ceil(result["noise_multiplier"]
                                                              * math.sqrt(result["upload_params"]))
        # what the method releases before its aggregates (FedLEASE: its signature, unsampled, and its warmup
        # release), by the same accountant
        before = [r for r in METHODS[method].privacy_plan(RunConfig.from_dict(config)) if r.kind != "round"]
        result["allocation_epsilon"] = (epsilon(result["noise_multiplier"], before, result["delta"])
                                        if before else None)
    return result


def noise_span(values: list[float | None]) -> str:
    """Noise multipliers as printed: "-" for none, one value, or the lowest-highest where they differ."""
    shown = sorted({f"{v:.3f}" for v in values if v is not None}, key=float)
    return "-" if not shown else shown[0] if len(shown) == 1 else f"{shown[0]}-{shown[-1]}"


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary(rows: list[dict]) -> list[str]:
    """Per method and epsilon: the final accuracy over seeds, and its change from the same seed's run without DP."""
    plain = {(r["method"], r["seed"]): r["accuracy"] for r in rows if r["target_epsilon"] is None}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target_epsilon"] or math.inf), []).append(r)
    lines = ["| method | epsilon | seeds | final accuracy | change from no DP (paired by seed) | noise multiplier "
             "| epsilon spent (record: the largest client's) |", "|---|---|---|---|---|---|---|"]
    for (method, target), group in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        group.sort(key=lambda r: r["seed"])
        changes = [100 * (r["accuracy"] - plain[method, r["seed"]]) for r in group if (method, r["seed"]) in plain]
        noise = noise_span([n for r in group for n in (r["noise_multiplier"], r.get("noise_multiplier_min"))])
        spent = max((r["epsilon_spent"] for r in group if r["epsilon_spent"] is not None), default=None)
        lines.append(f"| {method} | {'inf (no DP)' if target == math.inf else f'{target:g}'} | "
                     f"{' '.join(str(r['seed']) for r in group)} | {mean_sd([100 * r['accuracy'] for r in group])} | "
                     f"{mean_sd(changes) if changes and target != math.inf else '-'} | {noise} | "
                     f"{'-' if spent is None else f'{spent:.2f}'} |")
    return lines


def per_task(rows: list[dict]) -> list[str]:
    """Per method and epsilon: each task's final accuracy over seeds (which tasks still learn where the mean
    falls), and the accuracy a uniform guess would get (1 / its labels, from each run's clients)."""
    tasks = sorted({task for r in rows for task in r["task_accuracy"]})
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target_epsilon"] or math.inf), []).append(r)
    lines = ["| method | epsilon | seeds | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for (method, target), group in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        cells = [mean_sd([100 * r["task_accuracy"][task] for r in group if task in r["task_accuracy"]])
                 if any(task in r["task_accuracy"] for r in group) else "-" for task in tasks]
        lines.append(f"| {method} | {'inf (no DP)' if target == math.inf else f'{target:g}'} | "
                     f"{' '.join(str(r['seed']) for r in sorted(group, key=lambda r: r['seed']))} | "
                     + " | ".join(cells) + " |")
    guess = {task: 100 / labels for r in rows for task, labels in r["task_labels"].items()}
    lines.append("| uniform guess | | | " + " | ".join(f"{guess[task]:.2f}" for task in tasks) + " |")
    return lines


def table(out: Path) -> str:
    rows = [row(path) for path in histories(out)]
    (out / "utility.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| method | unit | target epsilon | noise multiplier | epsilon spent | of it, before the aggregates "
             "| allocation | contributors per adapter / head aggregate | noise sd per number, adapter / head "
             "| contributors for noise <= largest signal | final accuracy (every client) "
             "| median change norm (no DP) | seed | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in sorted(rows, key=lambda r: (r["method"], -(r["target_epsilon"] or math.inf), r["seed"])):
        eps = "inf (no DP)" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        aggregates = "adapter_contributors" in r  # client-level DP only
        groups = f"{r['adapter_contributors']:.1f} / {r['head_contributors']:.1f}" if aggregates else "-"
        noise = f"{r['adapter_noise_sd']:.4f} / {r['head_noise_sd']:.4f}" if aggregates else "-"
        multiplier = noise_span([r.get("noise_multiplier_min"), r["noise_multiplier"]])
        lines.append(f"| {r['method']} | {r['unit']} | {eps} | {multiplier} | "
                     f"{fmt(r['epsilon_spent'], '.2f')} | {fmt(r.get('allocation_epsilon'), '.2f')} | "
                     f"{r['allocation']} | {groups} | {noise} | {fmt(r.get('cohort_for_noise_at_most_signal'), 'd')} | "
                     f"{100 * r['accuracy']:.2f} | {fmt(r['median_change_norm'], '.3f')} | {r['seed']} | "
                     f"{r['minutes']:.0f} |")
    text = ("\n".join(lines) + "\n\nOver seeds:\n\n" + "\n".join(summary(rows)) + "\n\nPer task, over seeds:\n\n"
            + "\n".join(per_task(rows)) + "\n")
    (out / "utility.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilons", nargs="+", default=["inf", "8", "2"])
    parser.add_argument("--methods", nargs="+", default=["fedlease", "fedit", "ffa_lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--clip", default="0.5")
    parser.add_argument("--delta", default="1e-5")
    parser.add_argument("--unit", choices=["client", "record"], default="client",
                        help="client: DP-FedAvg (noise on the server); record: DP-SGD on each client")
    parser.add_argument("--table-only", action="store_true")
    args, settings = parser.parse_known_args()
    settings = [s for s in settings if s != "--"]
    if not args.table_only:
        for epsilon in args.epsilons:
            for method in args.methods:
                folder = run_dir(args.out, epsilon, method)
                if all(finished(args.out, epsilon, method, seed) for seed in args.seeds):
                    continue
                dp = (["--max_update_norm", "1e9"] if epsilon == "inf" else
                      ["--dp_clip", args.clip, "--dp_epsilon", epsilon, "--dp_delta", args.delta,
                       "--dp_unit", args.unit])
                command = [sys.executable, "-m", "fedlease", "compare", "--methods", method, "--seeds",
                           *map(str, args.seeds), *settings, *dp, "--output_dir", str(folder), "--no_progress",
                           *(["--resume"] if folder.exists() else [])]
                print(" ".join(command[1:]), flush=True)
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(table(args.out))


if __name__ == "__main__":
    main()
