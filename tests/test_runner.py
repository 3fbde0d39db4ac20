"""The in-process runner end to end on a tiny random BERT: artifacts, determinism, edge cases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_run_config as tiny_config
from fedlease.runtime.simulation import run


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return run(tiny_config(tiny_model, out), progress=False)


def test_artifacts_of_a_run(finished_run):
    out = finished_run.output_dir
    for name in ("training_log.txt", "training_history.json", "results.md", "dendrogram.png",
                 "distance_heatmap.png", "cluster_scores.png", "embedding_2d.png", "accuracy_by_round.png",
                 "macro_f1_by_round.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for rnd in (1, 2, 3):
        assert json.loads((out / f"lora_client_map_round_{rnd}.json").read_text())
        summary = json.loads((out / f"round_summary_{rnd}.json").read_text())
        assert summary["round"] == rnd and set(summary["clients"]) == {"0", "1", "2", "3"}
        assert set(summary["tasks"]) == {"rotten_tomatoes", "snli"}
    history = json.loads((out / "training_history.json").read_text())
    assert history["config"]["tasks"] == ["rotten_tomatoes", "rotten_tomatoes", "snli", "snli"]
    assert len(history["rounds"]) == 3 and [r["phase"] for r in history["rounds"]] == ["warmup", "adaptive",
                                                                                      "adaptive"]
    assert all(len(scores) == 3 for scores in history["client_scores"].values())
    assert history["optimal_n_clusters"] == history["clustering"]["num_clusters"] >= 2
    snli = history["rounds"][-1]["clients"]["2"]
    assert {"accuracy", "macro_f1", "loss"} <= set(snli["eval"])
    assert snli["upload_bytes"] > 0 and snli["download_bytes"] > snli["upload_bytes"]  # M experts down, 1 up
    # the last round's separate evaluation message: the experts after its aggregation, as large as a download
    assert snli["final_evaluation_download_bytes"] == snli["download_bytes"]
    assert not any("final_evaluation_download_bytes" in client
                   for r in history["rounds"][:-1] for client in r["clients"].values())
    log = (out / "training_log.txt").read_text()
    assert "clustering: K=" in log and "silhouette" in log and "round 3/3" in log
    assert "| mean over tasks |" in (out / "results.md").read_text()


def test_final_weights_are_complete_client_models(finished_run, tiny_model):
    out = finished_run.output_dir
    history = json.loads((out / "training_history.json").read_text())
    k = history["optimal_n_clusters"]
    for cid in range(4):
        with safe_open(str(out / "final" / f"client_{cid}.safetensors"), "pt") as f:
            meta = f.metadata()
            layout = json.loads(meta["layout"])
            assert layout["num_experts"] == k and layout["own_expert"] == history["clustering"]["labels"][cid]
            keys = set(f.keys())
            assert any(key.endswith(".experts_A") for key in keys) and "head.classifier.weight" in keys
            bank = f.get_tensor("bert.encoder.layer.0.attention.self.query.experts_B")
            assert bank.shape[0] == k and torch.count_nonzero(bank) > 0


def test_a_download_carries_each_expert_once(tiny_model, tmp_path):
    out = run(tiny_config(tiny_model, tmp_path / "o", num_experts=2, global_rounds=2), progress=False).output_dir
    history = json.loads((out / "training_history.json").read_text())
    k = history["optimal_n_clusters"]
    assert k == 2
    with safe_open(str(out / "final" / "client_0.safetensors"), "pt") as f:
        lora = sum(f.get_tensor(key).nbytes for key in f.keys() if key.endswith((".lora_A", ".lora_B")))
    for summary in history["rounds"][1:]:
        for client in summary["clients"].values():
            # down: K experts, router, head; up: the own expert, router, head
            assert client["download_bytes"] - client["upload_bytes"] == (k - 1) * lora


def test_the_best_round_is_labelled_an_oracle(finished_run):
    out = finished_run.output_dir
    history = json.loads((out / "training_history.json").read_text())
    final = history["final"]
    assert final["round"] == 3 and not any(key.startswith("best") for key in final)
    # the oracle is the best round's mean, recomputed from the rounds, and the first round that reaches it
    means = [summary["mean"]["accuracy"] for summary in history["rounds"]]
    assert final["oracle_best_mean"]["accuracy"] == pytest.approx(max(means))
    assert final["oracle_best_round"] == history["rounds"][means.index(max(means))]["round"]
    results = (out / "results.md").read_text()
    assert "Round 3 (final)" in results and "Oracle best round (picked on test" in results


def test_same_seed_same_results(finished_run, tiny_model, tmp_path):
    again = run(tiny_config(tiny_model, tmp_path / "again"), progress=False)
    first = json.loads((finished_run.output_dir / "training_history.json").read_text())
    second = json.loads((again.output_dir / "training_history.json").read_text())
    assert first["client_scores"] == second["client_scores"]
    assert first["clustering"]["distances"] == second["clustering"]["distances"]


@pytest.mark.parametrize("tasks,max_clusters,k,fragment", [
    (["snli"], 4, 1, "a single client"),
    (["rotten_tomatoes", "snli"], 2, 2, "silhouette is undefined"),
    (["rotten_tomatoes:2", "snli:2"], 1, 1, "--max_clusters 1"),
])
def test_edge_cases_of_k_are_logged(tiny_model, tmp_path, tasks, max_clusters, k, fragment):
    result = run(tiny_config(tiny_model, tmp_path / "o", tasks=tasks, max_clusters=max_clusters,
                             global_rounds=2), progress=False)
    history = json.loads((result.output_dir / "training_history.json").read_text())
    assert history["optimal_n_clusters"] == k
    assert fragment in (result.output_dir / "training_log.txt").read_text()


def test_failed_run_leaves_no_output(tiny_model, tmp_path, monkeypatch):
    from fedlease.runtime import simulation

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(simulation, "create_method", broken)
    with pytest.raises(RuntimeError):
        run(tiny_config(tiny_model, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()
