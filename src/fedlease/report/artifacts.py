"""What a run leaves in its output directory, written as the run goes so a stopped run is still readable.

- ``training_log.txt``: the log, round by round, with the clustering decision and every K's scores.
- ``lora_client_map_round_X.json``: adapter id -> client ids after round X (1-based), the released format.
- ``round_summary_X.json``: every client's metrics, per-task means, phase, time and bytes moved in round X.
- ``training_history.json``: everything above for all rounds, the config, the clients, the clustering and the
  final table; ``client_scores``, ``optimal_n_clusters`` and ``lora_client_map`` keep the released format.
- plots: ``dendrogram.png``, ``distance_heatmap.png``, ``cluster_scores.png`` (silhouette and Davies-Bouldin
  vs K), ``embedding_2d.png``, ``accuracy_by_round.png`` (and the task's F1 metric where it has one).
- ``final/client_<id>.safetensors``: each client's final model (experts, router, head) with its layout.
- ``results.md``: the final per-task table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedlease import __version__
from fedlease.clustering import ClusteringResult
from fedlease.config import RunConfig
from fedlease.methods.base import ClientInfo, Instruction, RoundReport, Update
from fedlease.model.experts import ExpertLayout
from fedlease.report import plots
from fedlease.storage import write_json

log = logging.getLogger("fedlease")

SIGNATURE_NAMES = {"lora_b": "LoRA B", "embedding_mean": "mean data embedding",
                   "embedding": "data embedding, class by class"}
METRIC_LABELS = {"accuracy": "accuracy", "f1": "F1", "macro_f1": "macro-F1", "rouge1": "ROUGE-1",
                 "rougeL": "ROUGE-L", "exact_match": "exact match", "exact_match_cased": "exact match (cased)"}
# The headline metric of a run's tasks: accuracy for classification, ROUGE-1 for instruction tasks (the paper's).
HEADLINES = ("accuracy", "rouge1")
# The layout of final/client_<id>.safetensors' metadata; a reader refuses any other.
FINAL_FORMAT = "fedlease-client/1"
PLOT_FILES = ("dendrogram.png", "distance_heatmap.png", "cluster_scores.png", "embedding_2d.png",
              *(f"{metric}_by_round.png" for metric in METRIC_LABELS))


def state_size(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(parameters, bytes) of a state mapping: what one message carries."""
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


# Per-client values that are not metrics to average: which expert or cluster a client chose for itself.
NOT_AVERAGED = ("loss", "expert", "cluster")


def summarize(metrics: Mapping[int, Mapping[str, float]], clients: Sequence[ClientInfo]) -> dict:
    """Per-task means over the task's evaluated clients (``counts``: how many), and the mean over tasks (the
    paper's 'avg' column)."""
    by_task: dict[str, list[Mapping[str, float]]] = {}
    for cid, values in metrics.items():
        by_task.setdefault(clients[cid].task, []).append(values)
    tasks = {task: {name: float(np.mean([v[name] for v in rows])) for name in rows[0] if name not in NOT_AVERAGED}
             for task, rows in by_task.items()}
    key = headline(next(iter(tasks.values()))) if tasks else None
    mean = {key: float(np.mean([t[key] for t in tasks.values()]))} if key else {}
    return {"tasks": tasks, "mean": mean, "counts": {task: len(rows) for task, rows in by_task.items()}}


def headline(values: Mapping[str, float]) -> str:
    """The headline metric among ``values`` (a task's metrics or a round's mean)."""
    return next((name for name in HEADLINES if name in values), HEADLINES[0])


class RunRecorder:
    """Writes the artifacts of one run into ``out_dir``."""

    def __init__(self, out_dir: Path, config: RunConfig, clients: Sequence[ClientInfo], info: Mapping,
                 unseen: Iterable[int] = ()) -> None:
        self.out_dir = out_dir
        self.config = config
        self.clients = list(clients)
        self.unseen = set(unseen)  # held out of training: summarised apart
        self.history: dict = {
            "fedlease_version": __version__,
            "config": config.to_dict(),
            **info,
            "clients": [],
            "rounds": [],
            "client_scores": {str(c.client_id): [] for c in clients},
            "optimal_n_clusters": None,
            "lora_client_map": None,
            "clustering": None,
            "final": None,
            "unseen_clients": sorted(self.unseen),
        }

    def describe_clients(self, rows: Sequence[Mapping]) -> None:
        self.history["clients"] = list(rows)

    def describe_node(self, cid: int, described: Mapping[str, str]) -> None:
        """Where a client trains (a Flower node's device, precision and library versions), as last reported."""
        self.history.setdefault("nodes", {})[str(cid)] = dict(described)

    def record_round(self, rnd: int, report: RoundReport, instructions: Mapping[int, Instruction],
                     updates: Mapping[int, Update], metrics: Mapping[int, Mapping[str, float]],
                     client_map: Mapping[int, list[int]], seconds: float,
                     rejected: Mapping[int, str] | None = None,
                     evaluated_with: Mapping[int, Instruction] | None = None,
                     delivered: Iterable[int] = ()) -> dict:
        """``instructions``: what each client was sent to train, counted as downloaded by the clients in
        ``delivered`` (those the message reached); ``evaluated_with`` (the last round): what each
        downloaded for its separate final evaluation, recorded as ``final_evaluation_download_*``. Earlier
        rounds' evaluations carry the next round's training download (the same tensors: counted there)."""
        number = rnd + 1
        metrics = {cid: metrics[cid] for cid in sorted(metrics)}  # replies may arrive in any order
        seen = {cid: values for cid, values in metrics.items() if cid not in self.unseen}
        unseen = {cid: values for cid, values in metrics.items() if cid in self.unseen}
        delivered = set(delivered)
        clients = {}
        # a client that trained but whose evaluation was lost is listed too (its upload counts), with eval None;
        # so is one that received the message and answered with an error (its download counts)
        for cid in sorted(set(metrics) | set(updates) | delivered):
            ins, update, values = instructions.get(cid), updates.get(cid), metrics.get(cid)
            down_params, down_bytes = state_size(ins.state) if ins and cid in delivered else (0, 0)
            up_params, up_bytes = state_size(update.state) if update else (0, 0)
            if update and "secure_upload_bytes" in update.metrics:  # SecAgg+: the masked packed vector it sent
                up_params, up_bytes = int(update.metrics["secure_upload_params"]), \
                    int(update.metrics["secure_upload_bytes"])
            clients[str(cid)] = {
                "task": self.clients[cid].task,
                **({"unseen": True} if cid in self.unseen else {}),
                "eval": dict(values) if values is not None else None,
                "train": dict(update.metrics) if update else None,
                "download_params": down_params, "download_bytes": down_bytes,
                "upload_params": up_params, "upload_bytes": up_bytes,
            }
            if evaluated_with is not None and values is not None and cid in evaluated_with:
                params, size = state_size(evaluated_with[cid].state)
                clients[str(cid)].update(final_evaluation_download_params=params,
                                         final_evaluation_download_bytes=size)
            if values is not None:
                self.history["client_scores"][str(cid)].append(dict(values))
        summary = {
            "round": number,
            "phase": report.phase,
            "seconds": round(seconds, 3),
            "num_adapters": len(client_map),
            **summarize(seen, self.clients),
            **({"unseen": summarize(unseen, self.clients)} if unseen else {}),
            "clients": clients,
            "rejected_updates": {str(cid): reason for cid, reason in (rejected or {}).items()},
            "log": report.log,
        }
        self.history["rounds"].append(summary)
        json_map = {str(k): v for k, v in client_map.items()}
        write_json(self.out_dir / f"lora_client_map_round_{number}.json", json_map)
        write_json(self.out_dir / f"round_summary_{number}.json", summary)
        if report.clustering is not None:
            self.record_clustering(report.clustering)
        if report.phase != "warmup" or report.clustering is not None:
            self.history["lora_client_map"] = json_map
        write_json(self.out_dir / "training_history.json", self.history)
        self.plot_metrics()
        return summary

    def record_clustering(self, result: ClusteringResult) -> None:
        self.history["optimal_n_clusters"] = result.num_clusters
        self.history["clustering"] = result.to_dict()
        clustered = [self.clients[cid] for cid in result.client_ids()]  # clients that missed it are not plotted
        names = [f"{c.client_id}:{c.task}" for c in clustered]
        what = SIGNATURE_NAMES.get(result.signature, result.signature)
        if len(clustered) >= 2:
            plots.plot_dendrogram(result.distances, names, self.out_dir / "dendrogram.png", what)
            plots.plot_distance_heatmap(result.distances, names, self.out_dir / "distance_heatmap.png", what)
        if result.silhouette:
            plots.plot_cluster_scores(result.silhouette, result.davies_bouldin, result.num_clusters,
                                      self.out_dir / "cluster_scores.png")
        if result.embedding is not None:
            plots.plot_embedding(result.embedding, result.labels, [c.task for c in clustered],
                                 self.out_dir / "embedding_2d.png", what)

    def plot_metrics(self) -> None:
        rounds = self.history["rounds"]
        tasks = list(dict.fromkeys(task for r in rounds for task in r["tasks"]))  # a round may lack a task
        for metric in METRIC_LABELS:
            series = {task: [r["tasks"].get(task, {}).get(metric, np.nan) for r in rounds] for task in tasks
                      if any(metric in r["tasks"].get(task, {}) for r in rounds)}
            if series:
                plots.plot_metric_by_round([r["round"] for r in rounds], series, METRIC_LABELS[metric],
                                           self.config.warmup_rounds, self.out_dir / f"{metric}_by_round.png")

    def save_final_model(self, cid: int, layout: ExpertLayout, state: Mapping[str, torch.Tensor],
                         pair_encoding: str | None = None) -> None:
        """``final/client_<id>.safetensors``: the state the client was last evaluated with, and in its metadata
        everything needed to rebuild that client on another machine (``fedlease.use`` reads it back): the model
        id, the run's configuration, the layout, the adapted modules, the pair encoding and the label names."""
        folder = self.out_dir / "final"
        folder.mkdir(exist_ok=True)
        info, config = self.clients[cid], self.config
        targets = sorted({key.rpartition(".")[0].rpartition(".")[2] for key in state
                          if key.endswith((".lora_A", ".experts_A"))})
        metadata = {
            "format": FINAL_FORMAT, "fedlease_version": __version__, "client": str(cid),
            "method": config.method, "model": config.model_name, "task": info.task,
            "unseen": json.dumps(cid in self.unseen), "labels": json.dumps(list(info.labels)),
            "head_width": str(max((len(c.labels) for c in self.clients), default=0)),
            "layout": json.dumps(layout.to_config()), "rank": str(config.rank), "lora_alpha": str(config.lora_alpha),
            "target_modules": json.dumps(targets), "pair_encoding": pair_encoding or config.pair_encoding,
            "max_length": str(config.max_length), "config": json.dumps(config.to_dict()),
        }
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
        save_file(tensors, str(folder / f"client_{cid}.safetensors"), metadata=metadata)

    def finish(self) -> dict:
        """Final per-task table (the last round, the headline) and results.md. The best round is picked on the
        test split, so its mean is recorded only as an oracle (optimistic) figure, named so."""
        rounds = self.history["rounds"]
        last = rounds[-1]
        # with sampling, only rounds that evaluated as many clients as the last (every one) are comparable
        full = [r for r in rounds if evaluated(r) >= evaluated(last)]
        best = max(full, key=lambda r: r["mean"].get(headline(r["mean"]), float("-inf")))
        final = {"round": last["round"], "tasks": last["tasks"], "mean": last["mean"],
                 "counts": last.get("counts", {}), "oracle_best_round": best["round"],
                 "oracle_best_mean": best["mean"], **({"unseen": last["unseen"]} if "unseen" in last else {})}
        self.history["final"] = final
        write_json(self.out_dir / "training_history.json", self.history)
        (self.out_dir / "results.md").write_text(format_table(final) + "\n", encoding="utf-8")
        return final


def evaluated(summary: Mapping) -> int:
    """How many (seen) clients a round summary's means cover."""
    counts = summary.get("counts")
    return sum(counts.values()) if counts is not None else len(summary.get("clients", {}))


def format_table(final: Mapping) -> str:
    """A Markdown table of the final round: one row per task with the number of clients its mean covers (those
    whose evaluation arrived), then the mean over tasks (percent); the clients held out of training (newcomers)
    in a table of their own."""
    lines = task_rows(final, final.get("unseen") and "clients that trained")
    if final["mean"]:
        key = headline(final["mean"])
        lines.append("")
        lines.append(f"Round {final['round']} (final): the result. Oracle best round (picked on test, so optimistic): "
                     f"mean {METRIC_LABELS[key]} {100 * final['oracle_best_mean'][key]:.2f} in round "
                     f"{final['oracle_best_round']}.")
    if final.get("unseen"):
        lines += ["", *task_rows(final["unseen"], "newcomers (held out of training, --unseen_clients)")]
    return "\n".join(lines)


def task_rows(summary: Mapping, title: str | None) -> list[str]:
    counts = summary["counts"]
    if not summary["mean"]:
        return [f"No client's evaluation arrived{f' ({title})' if title else ''}: no result."]
    key = headline(summary["mean"])
    extra = [m for m in METRIC_LABELS if m != key and any(m in v for v in summary["tasks"].values())]
    header = ["task", "clients", METRIC_LABELS[key], *[METRIC_LABELS[m] for m in extra]]
    lines = [f"{title[0].upper()}{title[1:]}:", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, values in summary["tasks"].items():
        cells = [task, str(counts[task]), f"{100 * values[key]:.2f}"]
        cells += [f"{100 * values[m]:.2f}" if m in values else "-" for m in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| mean over tasks | {sum(counts.values())} | {100 * summary['mean'][key]:.2f} |"
                 + " |" * len(extra))
    return lines
