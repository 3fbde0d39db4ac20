"""Open federations: a sampled cohort each round, clients absent for many rounds, newcomers that never train."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from fedlease.cli import main
from fedlease.config import RunConfig
from fedlease.errors import ConfigError
from fedlease.methods import METHODS
from fedlease.methods.base import PLACEMENT_SECONDS
from fedlease.methods.fedlease import PLACE, SIGNATURE, FedLease
from fedlease.methods.ifca import IFCA
from fedlease.runtime.participation import Participation, check_participation, unseen_clients


def participation(**values) -> Participation:
    return Participation(RunConfig(**{"tasks": ["a"] * 25 + ["b"] * 25 + ["c"] * 25 + ["d"] * 25, **values}))


def test_a_closed_federation_trains_every_client_every_round():
    sampler = participation()
    assert not sampler.partial
    assert sampler.cohort(0) == sampler.cohort(7) == list(range(100))


def test_uniform_sampling_draws_n_distinct_clients_seeded_by_round():
    sampler = participation(clients_per_round=10, seed=3)
    cohorts = [sampler.cohort(rnd) for rnd in range(30)]
    assert all(len(c) == len(set(c)) == 10 and c == sorted(c) for c in cohorts)
    assert cohorts == [participation(clients_per_round=10, seed=3).cohort(rnd) for rnd in range(30)]
    assert cohorts != [participation(clients_per_round=10, seed=4).cohort(rnd) for rnd in range(30)]
    assert len({tuple(c) for c in cohorts}) == 30
    assert len({cid for c in cohorts for cid in c}) > 90  # 300 draws reach nearly every client
    assert sampler.cohort(0, available=[5, 6, 7]) == [5, 6, 7]  # fewer reachable than asked: all of them


def test_poisson_sampling_takes_each_client_with_probability_q():
    sampler = participation(sample_rate=0.3, seed=1)
    sizes = [len(sampler.cohort(rnd)) for rnd in range(200)]
    assert len(set(sizes)) > 5  # the cohort size varies
    assert 0.27 < sum(sizes) / (200 * 100) < 0.33
    assert participation(sample_rate=1.0).cohort(5) == list(range(100))


def test_unseen_clients_are_spread_over_the_tasks_and_never_sampled():
    sampler = participation(unseen_clients=10, clients_per_round=90, seed=2)
    per_task = [sum(cid // 25 == t for cid in sampler.unseen) for t in range(4)]
    assert sorted(per_task) == [2, 2, 3, 3]
    assert sampler.unseen == unseen_clients(sampler.config)  # the same held-out clients for every method
    assert all(not set(sampler.cohort(rnd)) & set(sampler.unseen) for rnd in range(5))
    assert sampler.evaluated(0, sampler.cohort(0)) == sampler.cohort(0)
    assert sampler.evaluated(24, [1]) == sampler.trainable()  # after the last round: every client that trains


def test_eval_every_evaluates_every_client_every_e_rounds():
    sampler = participation(clients_per_round=5, eval_every=3)
    assert sampler.evaluated(1, [4, 2]) == [2, 4] and len(sampler.evaluated(2, [4, 2])) == 100


@pytest.mark.parametrize("values,fragment", [
    (dict(clients_per_round=101), "--clients_per_round 101 is more than the 100 clients that can train"),
    (dict(clients_per_round=95, unseen_clients=10), "more than the 90 clients that can train (10 held out"),
    (dict(unseen_clients=50, tasks=["a"] * 25 + ["b"] * 25), "leaving that task no client that trains"),
])
def test_sampling_that_the_clients_cannot_meet_is_refused(values, fragment):
    config = RunConfig(**{"tasks": ["a"] * 25 + ["b"] * 25 + ["c"] * 25 + ["d"] * 25, **values})
    with pytest.raises(ConfigError) as error:
        check_participation(config.validate())
    assert fragment in str(error.value)


@pytest.mark.parametrize("args,fragment", [
    (["--clients_per_round", "5"], "--clients_per_round 5 is more than the 4 clients that can train"),
    (["--sample_rate", "0"], "--sample_rate 0 samples nobody"),
    (["--sample_rate", "1.5"], "--sample_rate must be in (0, 1]"),
    (["--sample_rate", "nan"], "--sample_rate must be in (0, 1]"),
    (["--clients_per_round", "2", "--sample_rate", "0.5"], "pass one"),
    (["--unseen_clients", "3"], "leaving that task no client that trains"),
    (["--clients_per_round", "-1"], "--clients_per_round must be zero or positive"),
])
def test_bad_sampling_flags_end_with_one_line_and_write_nothing(tiny_model, tmp_path, capsys, args, fragment):
    out = tmp_path / "run"
    code = main(["run", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:2", "snli:2", "--output_dir",
                 str(out), "--no_progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fedlease: error: ") and fragment in err[-1], err
    assert not out.exists()


def sampled_config(model: str, out: Path, method: str, **overrides) -> RunConfig:
    values = dict(method=method, tasks=["rotten_tomatoes:3", "snli:3"], global_rounds=4, warmup_rounds=2,
                  clients_per_round=2, unseen_clients=2, train_samples=16, test_samples=8, seed=5)
    values.update(overrides)
    return tiny_run_config(model, out, **values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_a_sampled_federation_and_evaluates_its_newcomers(tiny_model, tmp_path, method):
    from fedlease.runtime.simulation import prepare_config, run

    config = sampled_config(tiny_model, tmp_path / "run", method)
    run(config, progress=False)
    sampler = Participation(prepare_config(config))
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert history["unseen_clients"] == sampler.unseen and len(sampler.unseen) == 2
    last = len(history["rounds"]) - 1
    for rnd, summary in enumerate(history["rounds"]):
        trained = sorted(int(cid) for cid, c in summary["clients"].items() if c["train"] is not None)
        assert trained == sampler.cohort(rnd)  # a train record for exactly the clients that trained
        evaluated = sorted(int(cid) for cid, c in summary["clients"].items() if c["eval"] is not None)
        assert evaluated == (sorted(sampler.trainable() + sampler.unseen) if rnd == last else sampler.cohort(rnd))
    final = history["final"]
    assert sum(final["counts"].values()) == 4 and sum(final["unseen"]["counts"].values()) == 2
    assert set(final["unseen"]["tasks"]) == {"rotten_tomatoes", "snli"}
    assert all(history["rounds"][-1]["clients"][str(cid)].get("unseen") for cid in sampler.unseen)
    results = (tmp_path / "run" / "results.md").read_text()
    assert "Newcomers (held out of training" in results and "| mean over tasks | 2 |" in results
    # each client's own store is on disk, committed at the last round the server accepted of it
    for cid in sampler.trainable():
        sampled = [rnd for rnd in range(4) if cid in sampler.cohort(rnd)]
        index = json.loads((tmp_path / "run" / "clients" / str(cid) / "state.json").read_text())
        if sampled:
            assert max(sampled) in {int(r) for r in index["committed"]} | {index["staged"] and index["staged"][0]}
    assert not any(list((tmp_path / "run" / "clients").glob(f"{cid}/round-*")) for cid in sampler.unseen)


def test_a_poisson_round_that_samples_nobody_is_skipped(tiny_model, tmp_path):
    from fedlease.runtime.simulation import prepare_config, run

    config = sampled_config(tiny_model, tmp_path / "run", "fedit", clients_per_round=0, sample_rate=0.25,
                            unseen_clients=0, global_rounds=5, seed=3)
    sampler = Participation(prepare_config(config))
    empty = [rnd for rnd in range(5) if not sampler.cohort(rnd)]
    assert empty == [2], "seed 3 draws nobody in round 3 only"
    run(config, progress=False)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert [r["round"] - 1 for r in history["rounds"] if r["phase"] == "skipped"] == empty
    assert history["rounds"][2]["clients"] == {} and len(history["rounds"]) == 5
    assert sum(history["final"]["counts"].values()) == 6  # the last round evaluates every client all the same
    assert "sampling drew no client" in (tmp_path / "run" / "training_log.txt").read_text()


def test_fedlease_places_a_late_client_by_its_data_signature_and_trains_that_expert(tiny_clients):
    config, clients, infos = tiny_clients
    method = FedLease(dataclasses.replace(config, num_experts=2, warmup_rounds=1), infos)
    stores = {c.client_id: {} for c in clients}
    warmup = method.configure_train(0, [0, 1, 2])  # client 3 (snli) is not sampled in the warmup
    warmed = {cid: method.client_train(clients[cid], ins, 0, stores[cid]) for cid, ins in warmup.items()}
    method.aggregate_train(0, warmed)
    assert method.clustering.num_clusters == 2 and 3 not in method.assignment
    ins = method.configure_train(1, [3])[3]
    assert PLACE in ins.extra and ins.layout.num_experts == 2
    update = method.client_train(clients[3], ins, 1, stores[3])
    chosen = update.metrics["expert"]
    # placing (its signature's inference pass) is timed apart from training, and only a placed client reports it
    assert update.metrics[PLACEMENT_SECONDS] > 0
    assert not any(PLACEMENT_SECONDS in u.metrics for u in warmed.values())
    assert torch.equal(update.state[SIGNATURE], stores[3][SIGNATURE])
    # the client's choice, made from the centroids alone, is the nearest cluster by mean distance to the members
    evaluated = method.client_evaluate(clients[3], method.configure_evaluate(1, [3])[3], 1, {})
    assert evaluated["expert"] == chosen
    before = dict(method.experts[chosen])
    method.aggregate_train(1, {3: update})
    assert method.cluster_of(3) == chosen
    assert any(not torch.equal(method.experts[chosen][k], before[k]) for k in before)  # its training counted
    assert PLACE not in method.configure_train(2, [3])[3].extra


def test_ifca_newcomer_takes_the_cluster_with_the_lowest_loss_on_its_data(tiny_clients):
    config, clients, infos = tiny_clients
    method = IFCA(dataclasses.replace(config, num_clusters=2), infos)
    update = method.client_train(clients[0], method.configure_train(0, [0])[0], 0, {})
    # cluster 0's head is made to put all its weight on one class: on balanced data its loss is far above chance
    update.state["head.classifier.bias"] = torch.tensor([30.0, -30.0, -30.0])
    update.metrics["cluster"] = 0
    method.aggregate_train(0, {0: update})
    ins = method.configure_newcomers(0, [1])[1]  # client 1 holds the same task as client 0
    losses = []
    for k in range(2):
        method.load(clients[1], method.candidate(clients[1], ins, k), {})
        losses.append(clients[1].train_loss())
    assert losses[0] > 5 * losses[1]
    metrics = method.client_evaluate(clients[1], ins, 0, {})
    assert metrics["cluster"] == 1
    assert method.configure_evaluate(0, [2])[2].extra.get("newcomer")  # never placed: chooses as a newcomer


def test_compare_reports_clients_that_trained_and_newcomers_apart(tiny_model, tmp_path):
    from fedlease.compare import compare

    base = sampled_config(tiny_model, tmp_path / "cmp", "fedlease", global_rounds=3)
    table = compare(base, ["fedlease", "fedit"], [5], progress=False)
    assert "mean over each task's clients that trained (newcomers below)" in table
    assert "Newcomers (clients held out of training" in table
    assert "2 clients sampled a round, 2 clients held out as newcomers" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| fed")}
    histories = {m: json.loads((tmp_path / "cmp" / m / "seed_5" / "training_history.json").read_text())
                 for m in ("fedlease", "fedit")}
    newcomer_table = table.split("Newcomers (clients held out")[1]
    names = {"fedlease": "fedlease (data signature)", "fedit": "fedit"}  # a FedLEASE row names its allocation
    for method, history in histories.items():
        mean = 100 * history["final"]["unseen"]["mean"]["accuracy"]
        row = f"| {names[method]} |"
        assert row in newcomer_table and f"{mean:.2f} |" in newcomer_table.split(row)[1]
    assert rows


def test_fedsa_b_waits_on_the_client_through_the_rounds_it_is_not_sampled(tiny_clients):
    from fedlease.methods.fedsa import FedSALoRA

    config, clients, infos = tiny_clients
    method = FedSALoRA(config, infos)
    stores = {cid: {} for cid in range(4)}

    def train(rnd, cohort):
        ins = method.configure_train(rnd, cohort)
        assert set(ins) == set(cohort)
        method.aggregate_train(rnd, {cid: method.client_train(clients[cid], i, rnd, stores[cid])
                                     for cid, i in ins.items()})

    train(0, [0, 1])
    b_of_1 = {k: v.clone() for k, v in stores[1].items()}
    train(1, [0])  # client 1 is absent: the shared A and the label set's head move on without it
    head = method.configure_evaluate(1, [1])[1].state["head.classifier.weight"]
    torch.testing.assert_close(head, method.configure_evaluate(1, [0])[0].state["head.classifier.weight"])
    ins = method.configure_train(2, [1])[1]
    method.load(clients[1], ins, stores[1])  # sampled again: its own B comes back from its store
    for key, value in clients[1].state(("lora_B",)).items():
        assert torch.equal(value, b_of_1[key])
    assert all(torch.equal(v, method.state[k]) for k, v in clients[1].state(("lora_A",)).items())


def test_paper_allocation_places_late_clients_and_newcomers_by_one_local_warmup_call(tiny_model, tmp_path):
    from fedlease.runtime.simulation import run

    config = sampled_config(tiny_model, tmp_path / "run", "fedlease", allocation="paper", num_experts=2,
                            global_rounds=5, warmup_rounds=1)
    run(config, progress=False)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    log = (tmp_path / "run" / "training_log.txt").read_text()
    assert "placed: expert" in log and "mean lora_b distance" in log
    placed = [c for r in history["rounds"][1:] for c in r["clients"].values() if c["train"] and "expert" in c["train"]]
    assert placed and all(c["train"]["expert"] in (0, 1) for c in placed)
    final = history["rounds"][-1]["clients"]
    assert all(final[str(cid)]["eval"]["expert"] in (0, 1) for cid in history["unseen_clients"])
