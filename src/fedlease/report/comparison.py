"""The comparison table of ``fedlease compare``: the FedLEASE paper's layout, with spread over seeds.

Per method and task: the final round's mean over the task's clients (accuracy, and F1 / macro-F1 where the
task has one; for instruction tasks ROUGE-1, and ROUGE-L / exact match), the headline; the average over tasks;
the oracle best round's average (the round is picked on the test split, so the figure is optimistic and only
labelled as such); communication per client per round (upload: after FedLEASE's warmup, every round for the other
methods; download: the rounds in which the server sends anything, i.e. after FedLEASE's warmup and after the
other methods' first round, whose starting weights every client builds itself), and in total over the whole run;
wall time. With several seeds every number is the mean and the sample standard deviation.

With ``--unseen_clients``, the headline covers the clients that trained, and the newcomers held out of training
(evaluated after the last round with what each method gives a newcomer) get a table of their own.

Seeds share a partition across methods, so methods are also compared seed by seed: a table of each seed's average
(with the experts FedLEASE chose: K, and the adjusted Rand index of its clusters against the clients' tasks) and
the paired difference between the first row and every other row over the seeds both ran, whose spread is the
spread of the difference, not of the scores.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import adjusted_rand_score

from fedlease.config import RunConfig, compress_tasks
from fedlease.report.artifacts import METRIC_LABELS, headline

MB = 1e6
# Per-seed averages are means of 0/1 scores (or ROUGE) computed in different orders: 0.73875 and
# 0.7387499999999999 are one score, so values are compared and shown after rounding away float noise.
TIE = 1e-9


def denoise(value: float) -> float:
    return round(value / TIE) * TIE


@dataclass
class MethodResult:
    label: str
    metric: str = "accuracy"  # the headline: accuracy, or ROUGE-1 for instruction tasks
    seeds: list[int] = field(default_factory=list)
    tasks: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # task -> metric -> per seed
    average: list[float] = field(default_factory=list)
    oracle_best_average: list[float] = field(default_factory=list)  # best round picked on the test split
    oracle_best_round: list[int] = field(default_factory=list)
    # bytes: the mean over rounds (upload: after warmup; download: those that download) of the mean over a
    # round's clients of what each moved
    upload_bytes_per_client_round_after_warmup: list[float] = field(default_factory=list)
    download_bytes_per_client_downloading_round: list[float] = field(default_factory=list)
    # all clients, all rounds, up + down, and the last round's separate evaluation download
    total_bytes_whole_run: list[float] = field(default_factory=list)
    # per seed: False for a run recorded before the final evaluation's download was counted (its total is short)
    total_counts_final_download: list[bool] = field(default_factory=list)
    precision: list[str] = field(default_factory=list)  # per seed: the resolved autocast precision
    # per seed: the tasks none of whose clients was evaluated in the last round (the average leaves them out)
    missing_tasks: list[list[str]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    allocation: list[str] = field(default_factory=list)  # per seed: the experts chosen ("" for other methods)
    # newcomers held out of training: task -> headline per seed, and the average over tasks per seed
    unseen_tasks: dict[str, list[float]] = field(default_factory=dict)
    unseen_average: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # per seed: rounds run (for bytes per round)

    def add(self, seed: int, history: Mapping, seconds: float) -> None:
        final = history["final"]
        if not self.seeds:  # the row says what it ran: FedLEASE's allocation is not the paper's by default
            self.label = row_name(self.label, history.get("config", {}))
        self.seeds.append(seed)
        for task, metrics in final["tasks"].items():
            for metric, value in metrics.items():
                self.tasks.setdefault(task, {}).setdefault(metric, []).append(value)
        self.metric = headline(final["mean"])
        self.average.append(final["mean"][self.metric])
        prefix = "oracle_best" if "oracle_best_mean" in final else "best"  # histories written before the rename
        self.oracle_best_average.append(final[f"{prefix}_mean"][self.metric])
        self.oracle_best_round.append(final[f"{prefix}_round"])
        after_warmup = [r for r in history["rounds"] if r["phase"] != "warmup" and r["clients"]]
        self.upload_bytes_per_client_round_after_warmup.append(mean_per_client_round(after_warmup, "upload_bytes"))
        downloading = [r for r in history["rounds"]
                       if r["clients"] and any(c["download_bytes"] for c in r["clients"].values())]
        self.download_bytes_per_client_downloading_round.append(
            mean_per_client_round(downloading, "download_bytes") if downloading else 0.0)
        self.total_bytes_whole_run.append(float(sum(c["upload_bytes"] + c["download_bytes"]
                                                    + c.get("final_evaluation_download_bytes", 0)
                                                    for r in history["rounds"] for c in r["clients"].values())))
        last = history["rounds"][-1]["clients"].values() if history["rounds"] else []
        self.total_counts_final_download.append(any("final_evaluation_download_bytes" in c for c in last)
                                                or not downloading)  # local training: nothing left out
        self.precision.append(str(history.get("precision", "unrecorded")))
        tasks = dict.fromkeys(client["task"] for client in history.get("clients", []))
        self.missing_tasks.append([task for task in tasks if task not in final["tasks"]])
        self.seconds.append(seconds)
        self.allocation.append(describe_allocation(history))
        self.rounds.append(len(history["rounds"]))
        if final.get("unseen"):
            for task, metrics in final["unseen"]["tasks"].items():
                self.unseen_tasks.setdefault(task, []).append(metrics[self.metric])
            self.unseen_average.append(final["unseen"]["mean"][self.metric])

    @property
    def bytes_per_round(self) -> list[float]:
        """Per seed: every client's upload and download over the run, per round (the server's traffic)."""
        return [total / max(rounds, 1) for total, rounds in zip(self.total_bytes_whole_run, self.rounds, strict=True)]


ALLOCATION_NAMES = {"embedding": "data signature", "paper": "paper: LoRA-B"}


def row_name(label: str, config: Mapping) -> str:
    """A table row's name: the method spec, and for FedLEASE the allocation it ran, which the spec names only
    when it differs from the default: "fedlease (data signature)", "fedlease:top_k=1 (paper: LoRA-B)"."""
    if config.get("method") != "fedlease":
        return label
    method, _, options = label.partition(":")
    kept = [o.strip() for o in options.split(",") if o.strip() and not o.strip().startswith("allocation=")]
    allocation = config.get("allocation", "embedding")
    return f"{method}{':' + ','.join(kept) if kept else ''} ({ALLOCATION_NAMES.get(allocation, allocation)})"


def describe_allocation(history: Mapping) -> str:
    """The experts a run chose, "K = 4, ARI 1.00" (the clusters against the clients' tasks; only K where every
    client holds one task), or "" for a run that chose none."""
    clustering = history.get("clustering")
    if not clustering:
        return ""
    text = f"K = {clustering['num_clusters']}"
    task_of = {client.get("client_id", i): client["task"] for i, client in enumerate(history.get("clients", []))}
    clustered = clustering.get("clients") or list(range(len(clustering["labels"])))  # who warmed up
    tasks = [task_of.get(cid) for cid in clustered]
    if len(set(tasks)) > 1 and None not in tasks:
        text += f", ARI {adjusted_rand_score(tasks, clustering['labels']):.2f}"
    if len(clustered) < len(task_of):
        text += f", over {len(clustered)} of {len(task_of)} clients"
    return text


def mean_per_client_round(rounds: list[Mapping], key: str) -> float:
    """The mean over ``rounds`` of the mean over each round's clients of ``key`` (the bytes one client moved)."""
    return float(np.mean([np.mean([c[key] for c in r["clients"].values()]) for r in rounds]))


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"  # e.g. a task none of whose clients answered in the last round
    mean, std = (denoise(scale * v) for v in mean_std(values))
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def write_comparison(out: Path, results: list[MethodResult], base: RunConfig) -> str:
    tasks = list(dict.fromkeys(task for r in results for task in r.tasks))
    key = results[0].metric if results else "accuracy"
    extra = [(task, metric) for task in tasks for metric in METRIC_LABELS if metric != key
             if any(metric in r.tasks.get(task, {}) for r in results)]
    seeds = results[0].seeds if results else []
    same_seeds = all(sorted(r.seeds) == sorted(seeds) for r in results)

    def label(r: MethodResult) -> str:  # where methods ran with different seeds, each row names its own
        return r.label if same_seeds else f"{r.label} (seed{'s' if len(r.seeds) > 1 else ''} " \
                                          f"{' '.join(map(str, sorted(r.seeds)))})"

    what = (f"{len(seeds)} seed(s): {' '.join(map(str, seeds))}" if same_seeds
            else "the seeds each row names (mean ± std over them)")
    newcomers = any(r.unseen_average for r in results)
    whose = "clients that trained (newcomers below)" if newcomers else "clients"
    lines = [f"Final-round {METRIC_LABELS[key]} (%), mean over each task's {whose}; {what}.", "",
             "| method | " + " | ".join(tasks) + " | avg |", "|---|" + "---|" * (len(tasks) + 1)]
    for r in results:
        partial = " †" if any(r.missing_tasks) else ""
        lines.append(f"| {label(r)} | " + " | ".join(cell(r.tasks.get(t, {}).get(key, [])) for t in tasks)
                     + f" | {cell(r.average)}{partial} |")
    if any(any(r.missing_tasks) for r in results):
        lines += ["", "† In one or more of this row's runs no client of a task was evaluated in the last round: "
                      "that run's average is over the other tasks, and the task's cell over the other runs ("
                      + "; ".join(f"{r.label} seed {seed}: {' '.join(missing)}" for r in results
                                  for seed, missing in zip(r.seeds, r.missing_tasks, strict=True) if missing) + ")."]
    if newcomers:
        unseen_tasks = list(dict.fromkeys(task for r in results for task in r.unseen_tasks))
        lines += ["", f"Newcomers (clients held out of training, evaluated after the last round with what each "
                      f"method gives a newcomer): final {METRIC_LABELS[key]} (%).", "",
                  "| method | " + " | ".join(unseen_tasks) + " | avg |", "|---|" + "---|" * (len(unseen_tasks) + 1)]
        for r in results:
            lines.append(f"| {label(r)} | " + " | ".join(cell(r.unseen_tasks.get(t, [])) for t in unseen_tasks)
                         + f" | {cell(r.unseen_average)} |")
    lines += ["", "| method | " + " | ".join(f"{t} {METRIC_LABELS[m]}" for t, m in extra)
              + (" | " if extra else "") + "oracle best-round avg (picked on test) | "
              "upload MB / client / round (after warmup) | download MB / client / downloading round | "
              "total MB (whole run) | MB / round | wall min |",
              "|---|" + "---|" * (len(extra) + 6)]
    for r in results:
        cells = [cell(r.tasks.get(t, {}).get(m, [])) for t, m in extra]
        short = "" if all(r.total_counts_final_download) else " *"
        cells += [cell(r.oracle_best_average), cell(r.upload_bytes_per_client_round_after_warmup, 1 / MB, 3),
                  cell(r.download_bytes_per_client_downloading_round, 1 / MB, 3),
                  cell(r.total_bytes_whole_run, 1 / MB, 1) + short, cell(r.bytes_per_round, 1 / MB, 2),
                  cell(r.seconds, 1 / 60, 1)]
        lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
    lines += ["", "Oracle best-round avg: the best round's average, the round picked on the test split (optimistic; "
                  "the headline is the final round). Upload per client per round: the mean over the rounds after "
                  "FedLEASE's warmup (every round for the other methods) of the mean over the round's clients of "
                  "what each sent. Download per client per downloading round: the same over the rounds in which "
                  "the server sends anything (none in FedLEASE's warmup or in the other methods' first round, "
                  "whose starting weights each client builds from the seed). State a client keeps is not counted. "
                  "Total: every client's upload and download over the whole run, warmup and the final "
                  "evaluation's download included; MB / round: that total over the rounds."]
    if not all(all(r.total_counts_final_download) for r in results):
        lines += ["", "\\* The total of one or more of this row's runs leaves out the final evaluation's download "
                      "(one model per client): they were recorded before it was counted (2026-12-02)."]
    precisions = sorted({p for r in results for p in r.precision})
    used = precisions[0] if len(precisions) == 1 else "mixed: " + "; ".join(
        f"{p} ({', '.join(r.label for r in results if p in r.precision)})" for p in precisions)
    lines += ["", f"Setting: {base.num_clients} clients ({compress_tasks(base.tasks)}), {base.global_rounds} rounds "
                  f"({base.warmup_rounds} warmup for fedlease), {base.local_epochs} local epochs, "
                  f"{base.train_samples}/{base.test_samples} train/test examples per client, batch "
                  f"{base.batch_size}, lr {base.lr:g}, rank {base.rank}, model {base.model_name}, "
                  f"precision {used}{participation_text(base)}."]
    if len(results) > 1 or any(len(r.seeds) > 1 or any(r.allocation) for r in results):
        lines += ["", *per_seed_lines(results)]
    table = "\n".join(lines)
    (out / "comparison.md").write_text(table + "\n", encoding="utf-8")
    write_csv(out / "comparison.csv", results, tasks)
    plot_comparison(out / "comparison.png", results, tasks, key)
    return table


def participation_text(base: RunConfig) -> str:
    """The setting's partition, sampling and differential privacy, where they differ from the paper's closed, balanced
    federation without DP."""
    parts = []
    if base.partition == "dirichlet":
        parts.append(f"Dirichlet({base.alpha:g}) label skew")
    if base.clients_per_round:
        parts.append(f"{base.clients_per_round} clients sampled a round")
    if base.sample_rate is not None:
        parts.append(f"each client sampled with probability {base.sample_rate:g} a round")
    if base.unseen_clients:
        parts.append(f"{base.unseen_clients} clients held out as newcomers")
    if base.dp_clip is not None:
        unit = ("record-level DP (DP-SGD on every client, epsilon per client for one example)"
                if base.dp_unit == "record" else "client-level DP (DP-FedAvg)")
        budget = (f"epsilon {base.dp_epsilon:g} at delta {base.dp_delta:g}" if base.dp_epsilon is not None
                  else f"noise multiplier {base.dp_noise:g}")
        parts.append(f"{unit}, clip {base.dp_clip:g}, {budget}")
    return "".join(f", {part}" for part in parts)


def per_seed_lines(results: list[MethodResult]) -> list[str]:
    """Each seed's average per method (and the experts chosen), then the first row minus every other row, paired
    by seed: the mean and std of the difference over the seeds both ran, and in how many the first row is ahead."""
    seeds = sorted({seed for r in results for seed in r.seeds})
    by_seed = [dict(zip(r.seeds, zip(r.average, r.allocation, strict=True), strict=True)) for r in results]
    lines = ["Per seed: the average over tasks (and the experts chosen: K, and the adjusted Rand index of the "
             "clusters against the clients' tasks).", "",
             "| seed | " + " | ".join(r.label for r in results) + " |", "|---|" + "---|" * len(results)]
    for seed in seeds:
        cells = []
        for runs in by_seed:
            average, allocation = runs.get(seed, (None, ""))
            cells.append("-" if average is None else f"{denoise(100 * average):.2f}"
                         + (f" ({allocation})" if allocation else ""))
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if len(results) < 2:
        return lines
    first = results[0]
    lines += ["", f"Paired by seed: {first.label} minus each method (mean ± std of the per-seed difference of the "
                  "averages, over the seeds both ran), and the seeds in which it is ahead (and tied).", "",
              "| method | seeds | difference | ahead in |", "|---|---|---|---|"]
    for r, runs in zip(results[1:], by_seed[1:], strict=True):
        shared = [seed for seed in first.seeds if seed in runs]
        differences = [denoise(by_seed[0][seed][0] - runs[seed][0]) for seed in shared]
        ahead, tied = sum(d > 0 for d in differences), sum(d == 0 for d in differences)
        lines.append(f"| {r.label} | {' '.join(map(str, shared)) or '-'} | {cell(differences)} | "
                     + (f"{ahead} of {len(shared)}" + (f" ({tied} tied)" if tied else "") if shared else "-") + " |")
    return lines


def write_csv(path: Path, results: list[MethodResult], tasks: list[str]) -> None:
    rows = []
    for r in results:
        row: dict[str, object] = {"method": r.label, "seeds": " ".join(map(str, r.seeds))}
        for task in tasks:
            for metric, values in r.tasks.get(task, {}).items():
                if metric == "loss":
                    continue
                row[f"{task}_{metric}_mean"], row[f"{task}_{metric}_std"] = mean_std(values)
        for name in ("average", "oracle_best_average", "upload_bytes_per_client_round_after_warmup",
                     "download_bytes_per_client_downloading_round", "total_bytes_whole_run", "bytes_per_round",
                     "seconds"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(getattr(r, name))
        if r.unseen_average:
            for task, values in r.unseen_tasks.items():
                row[f"unseen_{task}_mean"], row[f"unseen_{task}_std"] = mean_std(values)
            row["unseen_average_mean"], row["unseen_average_std"] = mean_std(r.unseen_average)
        row["oracle_best_round"] = " ".join(map(str, r.oracle_best_round))
        row["average_per_seed"] = " ".join(f"{value:.4f}" for value in r.average)
        row["allocation_per_seed"] = "; ".join(r.allocation) if any(r.allocation) else ""
        row["total_counts_final_download_per_seed"] = " ".join(map(str, r.total_counts_final_download))
        row["precision_per_seed"] = " ".join(r.precision)
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_comparison(path: Path, results: list[MethodResult], tasks: list[str], key: str = "accuracy") -> None:
    groups = [*tasks, "avg"]
    fig = Figure(figsize=(max(7, 1.3 * len(groups) * max(1, len(results)) / 3), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(results))
    x = np.arange(len(groups))
    for i, r in enumerate(results):
        series = [r.tasks.get(t, {}).get(key, []) for t in tasks] + [r.average]
        means = [100 * mean_std(v)[0] if v else np.nan for v in series]
        stds = [100 * mean_std(v)[1] if v else 0.0 for v in series]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, means, width, yerr=stds, label=r.label, capsize=2)
    ax.set_xticks(x, groups)
    ax.set_ylabel(f"final {METRIC_LABELS[key]} (%)")
    ax.set_title(f"Per-task {METRIC_LABELS[key]} by method")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, max(1, len(results))))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
