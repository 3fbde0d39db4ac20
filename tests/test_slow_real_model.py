"""The offline pretrained encoder and decoder on real built-in data (a few minutes each on a 2-core CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlease.config import RunConfig
from fedlease.runtime.simulation import build_clients, load_partition, prepare_config, run

pytestmark = pytest.mark.slow


def untrained_metrics(config: RunConfig) -> list[dict[str, float]]:
    """Every client's test metrics before any training (the initial adapter, a new head where there is one)."""
    prepared = prepare_config(config)
    _, splits = load_partition(prepared)
    backbone, clients, _ = build_clients(prepared, splits)
    out = []
    for client in clients:
        client.apply(backbone.adapted.layout, backbone.adapted.initial_state(prepared.seed))
        out.append(client.evaluate())
    return out


def test_two_tasks_two_clients_each_cluster_by_task_and_learn(tmp_path):
    # one warmup round and one adaptive round: the default allocation clusters on the data signature, which no
    # warmup round changes, and one round already lifts the accuracy well past the margin asserted below
    config = RunConfig(tasks=["rotten_tomatoes:2", "election_tweets:2"], global_rounds=2, warmup_rounds=1,
                       train_samples=96, test_samples=64, batch_size=16, output_dir=str(tmp_path / "run"))
    result = run(config, progress=False)
    history = json.loads((result.output_dir / "training_history.json").read_text())
    assert history["optimal_n_clusters"] == 2
    assert history["clustering"]["labels"] == [0, 0, 1, 1]
    distances = np.array(history["clustering"]["distances"])
    assert distances[0, 1] < distances[0, 2] and distances[2, 3] < distances[1, 3]

    # the same clients before any training: a random head on the frozen encoder
    untrained = [m["accuracy"] for m in untrained_metrics(config)]
    trained = [history["rounds"][-1]["clients"][str(c)]["eval"]["accuracy"] for c in range(4)]
    assert np.mean(trained) > np.mean(untrained) + 0.15, (trained, untrained)


def test_the_offline_decoder_learns_instruction_tasks_and_its_signatures_find_them(tmp_path):
    # one local epoch a round: the loss already falls from 1.75 to 1.11 (2026-12-02), twice the margin asserted
    config = RunConfig(tasks=["instruct_sentiment:2", "instruct_struct2text:2"], global_rounds=2, warmup_rounds=1,
                       local_epochs=1, train_samples=8, test_samples=4, batch_size=4, max_length=160, max_new_tokens=24,
                       output_dir=str(tmp_path / "run"))
    result = run(config, progress=False)
    history = json.loads((result.output_dir / "training_history.json").read_text())
    assert history["config"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert history["config"]["rank"] == 8
    assert history["clustering"]["labels"] == [0, 0, 1, 1]  # clusters are numbered in order of their first client

    untrained = untrained_metrics(config)  # the instruction-tuned model as it comes
    final = [history["rounds"][-1]["clients"][str(c)]["eval"] for c in range(4)]
    assert np.mean([m["loss"] for m in final]) < np.mean([m["loss"] for m in untrained]) - 0.3, (final, untrained)
    assert np.mean([m["rouge1"] for m in final]) > np.mean([m["rouge1"] for m in untrained]), (final, untrained)
