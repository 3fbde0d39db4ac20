"""Each baseline's rule: what it averages, what it keeps local, what it never moves."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, tiny_run_config
from fedlease.methods import METHODS, create_method
from fedlease.methods.base import ClientInfo, Update, select
from fedlease.methods.fedit import FedIT
from fedlease.methods.fedsa import FedSALoRA
from fedlease.methods.ffa import FFALoRA
from fedlease.methods.ifca import IFCA, cluster_key
from fedlease.methods.local import Local

SITE = "enc.query"
BIN, OTHER = ("neg", "pos"), ("clinton", "trump")


def state(value: float, parts=("lora_A", "lora_B", "head")) -> dict[str, torch.Tensor]:
    out = {}
    if "lora_A" in parts:
        out[f"{SITE}.lora_A"] = torch.full((2, 4), value)
    if "lora_B" in parts:
        out[f"{SITE}.lora_B"] = torch.full((3, 2), -value)
    if "head" in parts:
        out["head.classifier.weight"] = torch.full((2, 3), 10 * value)
    return out


def make(cls, tiny_clients=None, **overrides):
    from fedlease.config import RunConfig

    infos = [ClientInfo(0, "a", BIN), ClientInfo(1, "a", BIN), ClientInfo(2, "b", OTHER)]
    return cls(RunConfig(tasks=["a", "a", "b"], **overrides), infos)


def test_fedit_averages_a_and_b_over_all_and_heads_per_label_set():
    method = make(FedIT)
    assert all(not i.state and i.upload == ("lora_A", "lora_B", "head") for i in method.configure_train(0).values())
    method.aggregate_train(0, {0: Update(state(1.0), 100), 1: Update(state(2.0), 300), 2: Update(state(5.0), 100)})
    down = method.configure_train(1)
    expected = (1 * 100 + 2 * 300 + 5 * 100) / 500
    for cid in range(3):
        torch.testing.assert_close(down[cid].state[f"{SITE}.lora_A"], torch.full((2, 4), expected))
        torch.testing.assert_close(down[cid].state[f"{SITE}.lora_B"], torch.full((3, 2), -expected))
    torch.testing.assert_close(down[0].state["head.classifier.weight"], torch.full((2, 3), 17.5))
    torch.testing.assert_close(down[2].state["head.classifier.weight"], torch.full((2, 3), 50.0))


def test_a_client_that_missed_the_round_downloads_its_label_sets_new_head():
    method = make(FedIT)
    method.aggregate_train(0, {0: Update(state(1.0), 100), 1: Update(state(2.0), 100), 2: Update(state(5.0), 100)})
    method.aggregate_train(1, {0: Update(state(4.0), 100), 2: Update(state(6.0), 100)})  # client 1 missed it
    down = method.configure_train(2)
    torch.testing.assert_close(down[1].state["head.classifier.weight"], torch.full((2, 3), 40.0))
    torch.testing.assert_close(down[2].state["head.classifier.weight"], torch.full((2, 3), 60.0))


def test_ffa_never_moves_or_trains_a():
    method = make(FFALoRA)
    for rnd in range(2):
        for ins in method.configure_train(rnd).values():
            assert "lora_A" not in ins.train and "lora_A" not in ins.upload
            assert not any(k.endswith(".lora_A") for k in ins.state)
        method.aggregate_train(rnd, {c: Update(state(c + 1.0, ("lora_B", "head")), 10) for c in range(3)})
    assert set(method.state) == {f"{SITE}.lora_B"}
    torch.testing.assert_close(method.state[f"{SITE}.lora_B"], torch.full((3, 2), -2.0))


def test_ffa_client_keeps_the_seeded_a(tiny_clients):
    config, clients, infos = tiny_clients
    method = FFALoRA(dataclasses.replace(config, method="ffa_lora"), infos)
    client = clients[0]
    update = method.client_train(client, method.configure_train(0)[0], 0, {})
    initial = client.adapted.initial_state(config.seed)
    live = client.adapted.state(["lora_A", "lora_B"])
    for key in select(initial, ("lora_A",)):
        torch.testing.assert_close(live[key], initial[key])  # A did not move
    assert any(torch.count_nonzero(v) for k, v in update.state.items() if k.endswith(".lora_B"))


def test_fedsa_averages_a_and_keeps_b_on_the_client(tiny_clients):
    config, clients, infos = tiny_clients
    method = FedSALoRA(dataclasses.replace(config, method="fedsa_lora"), infos)
    stores = [{}, {}]
    updates = {}
    for cid in (0, 1):
        ins = method.configure_train(0)[cid]
        assert ins.keep == ("lora_B",) and "lora_B" not in ins.upload
        updates[cid] = method.client_train(clients[cid], ins, 0, stores[cid])
        assert not any(k.endswith(".lora_B") for k in updates[cid].state)
        assert stores[cid] and all(k.endswith(".lora_B") for k in stores[cid])
    method.aggregate_train(0, updates)
    key = next(iter(stores[0]))
    assert not torch.equal(stores[0][key], stores[1][key])  # personal B differ
    ins = method.configure_train(1)[0]
    assert ins.restore == ("lora_B",) and not any(k.endswith(".lora_B") for k in ins.state)
    a_key = key.replace(".lora_B", ".lora_A")
    torch.testing.assert_close(ins.state[a_key], (updates[0].state[a_key] + updates[1].state[a_key]) / 2)
    method.load(clients[0], ins, stores[0])
    torch.testing.assert_close(clients[0].adapted.state(["lora_B"])[key], stores[0][key])


def test_local_communicates_nothing(tiny_clients):
    config, clients, infos = tiny_clients
    method = Local(dataclasses.replace(config, method="local"), infos)
    stores = {0: {}, 1: {}}
    for rnd in range(2):
        for cid in (0, 1):
            ins = method.configure_train(rnd)[cid]
            assert not ins.state and not ins.upload
            update = method.client_train(clients[cid], ins, rnd, stores[cid])
            assert not update.state
    key = next(k for k in stores[0] if k.endswith(".lora_B"))
    assert not torch.equal(stores[0][key], stores[1][key])


def test_ifca_server_averages_each_cluster_over_its_choosers():
    method = make(IFCA, num_clusters=3)
    updates = {0: Update(state(1.0), 10, {"cluster": 2}), 1: Update(state(3.0), 10, {"cluster": 2}),
               2: Update(state(7.0), 10, {"cluster": 0})}
    report = method.aggregate_train(0, updates)
    assert method.client_map() == {0: [2], 2: [0, 1]}
    torch.testing.assert_close(method.clusters[2][f"{SITE}.lora_A"], torch.full((2, 4), 2.0))
    assert 1 not in method.clusters and "cluster 1: clients [] (kept)" in report.log
    ins = method.configure_train(1)[0]
    assert cluster_key(2, f"{SITE}.lora_A") in ins.state and cluster_key(0, f"{SITE}.lora_B") in ins.state
    # each cluster's head for the client's label set: cluster 2 has one for client 0's, cluster 0 only another
    torch.testing.assert_close(ins.state[cluster_key(2, "head.classifier.weight")], torch.full((2, 3), 20.0))
    assert cluster_key(0, "head.classifier.weight") not in ins.state
    torch.testing.assert_close(method.configure_train(1)[2].state[cluster_key(0, "head.classifier.weight")],
                               torch.full((2, 3), 70.0))
    evaluate = method.configure_evaluate(1)[2]
    assert evaluate.extra["cluster"] == 0 and set(evaluate.state) == {
        cluster_key(0, k) for k in (f"{SITE}.lora_A", f"{SITE}.lora_B", "head.classifier.weight")}


def test_ifca_client_joins_the_cluster_whose_model_has_the_lowest_loss(tiny_clients):
    config, clients, infos = tiny_clients
    method = IFCA(dataclasses.replace(config, method="ifca", num_clusters=3, local_epochs=3), infos)
    client = clients[2]
    method.load(client, method.configure_train(0)[2], {})
    client.fit(("lora_A", "lora_B", "head"), seed=1, epochs=8)
    trained = client.state(("lora_A", "lora_B", "head"))
    # the three clusters share the fitted LoRA and differ in their heads: cluster 1's is the fitted one, clusters
    # 0 and 2 push their logits towards one class; each cluster is scored with its own head

    def biased(label: int) -> dict[str, torch.Tensor]:
        out = dict(trained)
        bias = next(k for k in trained if k.startswith("head.") and k.endswith("bias"))
        out[bias] = trained[bias] + 8.0 * torch.nn.functional.one_hot(torch.tensor(label), len(trained[bias]))
        return out

    ins = method.configure_train(0)[2]
    ins.state = {cluster_key(k, key): v for k, model in enumerate((biased(0), trained, biased(1)))
                 for key, v in model.items()}
    update = method.client_train(client, ins, 1, {})
    losses = [update.metrics[f"loss_cluster_{k}"] for k in range(3)]
    assert update.metrics["cluster"] == 1 and losses[1] < min(losses[0], losses[2])


def test_ifca_resumes_a_checkpoint_that_kept_one_head_per_client():
    method = make(IFCA, num_clusters=2)
    method.load_server_state({"clusters": {1: state(1.0, ("lora_A", "lora_B"))}, "assignment": {0: 1, 2: 1},
                              "heads": {0: state(2.0, ("head",)), 2: state(3.0, ("head",))}})
    down = method.configure_train(1)
    torch.testing.assert_close(down[1].state[cluster_key(1, "head.classifier.weight")], torch.full((2, 3), 20.0))
    torch.testing.assert_close(down[2].state[cluster_key(1, "head.classifier.weight")], torch.full((2, 3), 30.0))


def test_ifca_ties_are_broken_at_random_per_client(tiny_clients):
    config, clients, infos = tiny_clients
    method = IFCA(dataclasses.replace(config, method="ifca", num_clusters=4, local_epochs=1), infos)
    choices = set()
    for rnd in range(3):
        for cid in range(4):
            update = method.client_train(clients[cid], method.configure_train(rnd)[cid], rnd, {})
            losses = {update.metrics[f"loss_cluster_{k}"] for k in range(4)}
            assert len(losses) == 1  # B = 0: every untrained cluster computes the same function
            choices.add(update.metrics["cluster"])
    assert len(choices) > 1


def test_every_method_is_registered_and_documented():
    from fedlease.config import METHOD_NAMES

    assert tuple(METHODS) == METHOD_NAMES
    for name, cls in METHODS.items():
        module = __import__(cls.__module__, fromlist=["_"])
        assert module.__doc__ and ("arXiv" in module.__doc__ or name == "local"), name


# Two toy tasks whose label is in every token: a text of "a"/"b" characters or of "y"/"z" ones, of "0"/"1" digits
# or of "8"/"9" ones. Each label set is named by its characters, so the two tasks have heads of their own.
TOY_ALPHABETS = {"toy_letters": ("ab", "yz"), "toy_digits": ("01", "89")}


def write_toy_tasks(root: Path) -> Path:
    """A --data_dir of the toy tasks: 80 train and 40 test rows each, classes alternating, seeded."""
    draw = random.Random(0)
    for task, alphabets in TOY_ALPHABETS.items():
        for split, rows in (("train", 80), ("test", 40)):
            lines = []
            for i in range(rows):
                chars = alphabets[i % 2]
                text = " ".join("".join(draw.choice(chars) for _ in range(3)) for _ in range(3))
                lines.append(json.dumps({"text": text, "label": chars}) + "\n")
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.jsonl").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def toy_federation(tmp_path_factory):
    """(config, clients, infos, untrained mean accuracy) of four clients, two of each toy task, on a tiny BERT
    whose random weights are drawn wide enough (std 0.2, about 1/sqrt(width)) for its frozen [CLS] features to
    differ between inputs: with BERT's 0.02 they differ by a thousandth, which no head learns in a few steps."""
    from fedlease.runtime.simulation import build_clients, load_partition, prepare_config

    root = tmp_path_factory.mktemp("toy")
    model = build_tiny_model(root / "model", initializer_range=0.2)
    config = prepare_config(tiny_run_config(str(model), root / "unused", tasks=[f"{t}:2" for t in TOY_ALPHABETS],
                                            data_dir=str(write_toy_tasks(root / "data")), global_rounds=4,
                                            warmup_rounds=1, train_samples=24, test_samples=20, max_length=16))
    _, splits = load_partition(config)
    backbone, clients, infos = build_clients(config, splits)
    untrained = []
    for client in clients:
        client.apply(backbone.adapted.layout, backbone.adapted.initial_state(config.seed))
        untrained.append(client.evaluate()["accuracy"])
    return config, clients, infos, float(np.mean(untrained))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_learns_a_separable_toy_task_well_above_chance(name, toy_federation):
    """Four rounds (FedLEASE: one of warmup) through the method's own client and server halves, every client
    evaluated after each round: the final mean accuracy is near perfect on two classes (chance 0.5), far above
    the untrained model's, and every client is in exactly one adapter group."""
    config, clients, infos, untrained = toy_federation
    method = create_method(dataclasses.replace(config, method=name, num_clusters=2 if name == "ifca" else 4), infos)
    stores = {c.client_id: {} for c in clients}
    for rnd in range(config.global_rounds):
        updates = {cid: method.client_update(clients[cid], ins, rnd, stores[cid])
                   for cid, ins in method.configure_train(rnd).items()}
        method.aggregate_train(rnd, updates)
        accuracy = {cid: method.client_evaluate(clients[cid], ins, rnd, stores[cid])["accuracy"]
                    for cid, ins in method.configure_evaluate(rnd).items()}
        assert sorted(accuracy) == [0, 1, 2, 3]
    final = float(np.mean(list(accuracy.values())))
    assert untrained <= 0.6, untrained  # the untrained head does not already separate the classes
    assert final >= 0.9 and final >= untrained + 0.3, (accuracy, untrained)
    assert sorted(c for members in method.client_map().values() for c in members) == [0, 1, 2, 3]


def test_feddpa_keeps_the_local_adapter_and_mixes_per_instance(tiny_clients, monkeypatch):
    from fedlease.methods.feddpa import FedDPA

    config, clients, infos = tiny_clients
    method = FedDPA(dataclasses.replace(config, method="feddpa"), infos)
    client, store = clients[0], {}
    first = method.client_train(client, method.configure_train(0)[0], 0, store)
    assert not store  # no global adapter yet: nothing to personalise
    method.aggregate_train(0, {0: first})
    update = method.client_train(client, method.configure_train(1)[0], 1, store)
    assert store and all(key.startswith("local/") for key in store)
    assert set(update.state) == set(first.state)  # only the global adapter and the head travel
    # the local adapter's training is reported and counted: two fits of the client's data, the first round's one
    assert 0 < update.metrics["local_train_loss"] < float("inf")
    assert (update.metrics["steps"], update.metrics["examples"]) == (2 * first.metrics["steps"],
                                                                      2 * first.metrics["examples"])
    local_b = next(v for k, v in store.items() if k.endswith(".lora_B"))
    assert not torch.equal(local_b, method.state[next(k for k in method.state if k.endswith(".lora_B"))])
    method.aggregate_train(1, {0: update})
    captured = {}
    evaluate = client.evaluate
    monkeypatch.setattr(client, "evaluate", lambda mixture=None: captured.setdefault("m", mixture) is None
                        or evaluate(mixture))
    method.client_evaluate(client, method.configure_evaluate(1)[0], 1, store)
    mixture = captured["m"]
    assert mixture.shape == (len(client.test_data), 2)
    torch.testing.assert_close(mixture.sum(1), torch.ones(len(mixture)))
    assert (mixture[:, 1] > 0).all() and (mixture[:, 1] <= 0.5).all()
    assert mixture[:, 1].std() > 0  # instance-wise, not one weight for all


def test_ifca_ignores_an_update_with_an_invalid_cluster():
    method = make(IFCA, num_clusters=2)
    report = method.aggregate_train(0, {0: Update(state(1.0), 10, {"cluster": 7}),
                                        1: Update(state(3.0), 10, {"cluster": 1})})
    assert method.assignment == {1: 1} and "client 0 named no valid cluster (7)" in report.log[0]
