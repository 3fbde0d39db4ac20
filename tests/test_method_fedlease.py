"""FedLEASE's server half on hand-made client states: warmup, allocation, cluster-wise aggregation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlease.config import RunConfig
from fedlease.methods.base import ClientInfo, Update
from fedlease.methods.fedlease import PLACE, PLACED_B, PLACED_UPLOAD, PLAIN_LORA, SEND_SIGNATURE, SIGNATURE, FedLease

SITES = ("enc.0.query", "enc.0.value")
D_IN, D_OUT, R = 8, 6, 2
BIN, TRI = ("neg", "pos"), ("a", "b", "c")


def client_state(direction: torch.Tensor, seed: int, router_slots: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for site in SITES:
        state[f"{site}.lora_A"] = torch.randn(R, D_IN, generator=g)
        state[f"{site}.lora_B"] = direction + 0.05 * torch.randn(D_OUT, R, generator=g)
        if router_slots:
            state[f"{site}.router"] = torch.randn(router_slots, D_IN, generator=g)
    state["head.classifier.weight"] = torch.randn(3, D_OUT, generator=g)
    return state


@pytest.fixture
def setup():
    tasks = ["t1", "t1", "t2", "t2", "t3"]
    labels = [BIN, BIN, BIN, TRI, TRI]  # clients 2 and 3 share a cluster but not a label set
    clients = [ClientInfo(i, t, lab) for i, (t, lab) in enumerate(zip(tasks, labels, strict=True))]
    config = RunConfig(tasks=tasks, global_rounds=4, warmup_rounds=2, max_clusters=4, seed=3, allocation="paper")
    g = torch.Generator().manual_seed(0)
    directions = {t: torch.randn(D_OUT, R, generator=g) for t in ("t1", "t2", "t3")}
    return FedLease(config, clients), clients, directions


def run_warmup(method, clients, directions):
    for rnd in range(2):
        ins = method.configure_train(rnd)
        assert set(ins) == {c.client_id for c in clients}
        assert all(i.restore == i.train for i in ins.values())
        assert all(not i.state and i.keep == i.train == i.upload for i in ins.values())
        assert all(i.train == ("lora_A", "lora_B", "head") and i.layout.num_experts == 1 for i in ins.values())
        updates = {c.client_id: Update(client_state(directions[c.task], 10 * rnd + c.client_id), 100)
                   for c in clients}
        report = method.aggregate_train(rnd, updates)
    return updates, report


def test_warmup_keeps_every_client_its_own_lora(setup):
    method, clients, directions = setup
    ins = method.configure_train(0)
    updates = {c.client_id: Update(client_state(directions[c.task], c.client_id), 100) for c in clients}
    report = method.aggregate_train(0, updates)
    assert report.clustering is None and method.clustering is None
    for instruction in method.configure_evaluate(0).values():
        # evaluated on the client's own LoRA, from its own store: nothing downloaded, nothing averaged
        assert not instruction.state and instruction.restore == ("lora_A", "lora_B", "head")
    assert method.client_map() == {i: [i] for i in range(5)}
    assert all(not i.state for i in ins.values())


def test_allocation_clusters_by_b_and_starts_experts_from_member_averages(setup):
    method, clients, directions = setup
    updates, report = run_warmup(method, clients, directions)
    result = report.clustering
    assert result.num_clusters == 3 and result.labels == [0, 0, 1, 1, 2]
    assert method.client_map() == {0: [0, 1], 1: [2, 3], 2: [4]}
    for k, members in method.client_map().items():
        for key in (f"{SITES[0]}.lora_A", f"{SITES[1]}.lora_B"):
            expected = torch.stack([updates[c].state[key] for c in members]).mean(0)
            torch.testing.assert_close(method.experts[k][key], expected)
    # routers: one per cluster, 2K-1 slots, all from the seed
    assert method.routers[0][f"{SITES[0]}.router"].shape == (5, D_IN)
    # heads: averaged in the cluster among clients with the same label set only
    head = "head.classifier.weight"
    torch.testing.assert_close(method.head_of(0)[head], (updates[0].state[head] + updates[1].state[head]) / 2)
    torch.testing.assert_close(method.head_of(2)[head], updates[2].state[head])
    torch.testing.assert_close(method.head_of(3)[head], updates[3].state[head])


def test_adaptive_download_sends_every_expert_once_with_own_router_and_head(setup):
    method, clients, directions = setup
    run_warmup(method, clients, directions)
    ins = method.configure_train(2)
    for cid, own in ((0, 0), (3, 1), (4, 2)):
        i = ins[cid]
        assert i.layout.num_experts == 3 and i.layout.own_expert == own and i.layout.routing == "adaptive"
        assert i.train == ("lora_A", "lora_B", "router", "head")
        key = f"{SITES[1]}.experts_B"
        assert i.state[key].shape == (3, D_OUT, R)
        for k in range(3):
            torch.testing.assert_close(i.state[key][k], method.experts[k][f"{SITES[1]}.lora_B"])
        # the own expert travels only in its bank slot, not a second time as lora_A / lora_B
        assert not any(k.endswith((".lora_A", ".lora_B")) for k in i.state)
        assert set(i.state) == {f"{site}.{part}" for site in SITES for part in ("experts_A", "experts_B", "router")} \
            | {"head.classifier.weight"}


def test_client_trains_its_own_expert_taken_from_the_bank(tiny_clients):
    config, clients, infos = tiny_clients
    method = FedLease(dataclasses.replace(config, num_experts=2), infos)
    stores = {c.client_id: {} for c in clients}
    warmup = method.configure_train(0)
    method.aggregate_train(0, {c.client_id: method.client_train(c, warmup[c.client_id], 0, stores[c.client_id])
                               for c in clients})
    assert method.clustering.num_clusters == 2
    client = clients[2]
    ins = method.configure_train(1)[2]
    own = method.experts[ins.layout.own_expert]
    method.load(client, ins, stores[2])
    for key, value in client.adapted.state(["lora_A", "lora_B"]).items():
        torch.testing.assert_close(value, own[key])
    update = method.client_train(client, ins, 1, stores[2])
    assert set(update.state) >= set(own)
    assert any(not torch.equal(update.state[key], own[key]) for key in own)  # it trained the own expert


def test_adaptive_aggregation_is_cluster_wise(setup):
    method, clients, directions = setup
    run_warmup(method, clients, directions)
    before = [dict(e) for e in method.experts]
    updates = {c.client_id: Update(client_state(directions[c.task], 100 + c.client_id, router_slots=5),
                                   100 + 50 * c.client_id) for c in clients if c.client_id != 4}
    report = method.aggregate_train(2, updates)
    assert report.phase == "adaptive"
    key = f"{SITES[0]}.lora_B"
    for k, members in ((0, [0, 1]), (1, [2, 3])):
        w = torch.tensor([updates[c].num_examples for c in members], dtype=torch.float64)
        share = dict(zip(members, (w / w.sum()).tolist(), strict=True))
        expected = sum(updates[c].state[key].double() * share[c] for c in members)
        torch.testing.assert_close(method.experts[k][key], expected.float())
        router = f"{SITES[0]}.router"
        expected_router = sum(updates[c].state[router].double() * share[c] for c in members)
        torch.testing.assert_close(method.routers[k][router], expected_router.float())
    # client 4 (alone in expert 2) did not reply: its expert is kept
    assert torch.equal(method.experts[2][key], before[2][key])
    assert any("no member replied" in line for line in report.log)


def test_a_member_that_missed_the_round_downloads_its_groups_new_head(setup):
    method, clients, directions = setup
    run_warmup(method, clients, directions)
    head = "head.classifier.weight"
    kept = method.head_of(3)[head].clone()
    update = Update(client_state(directions["t1"], 200, router_slots=5), 100)
    method.aggregate_train(2, {0: update})  # client 1 (cluster 0, the same label set) did not reply
    torch.testing.assert_close(method.configure_train(3)[1].state[head], update.state[head])
    assert torch.equal(method.head_of(3)[head], kept)  # another cluster's head is untouched


def test_one_expert_when_max_clusters_is_one(setup):
    _, clients, directions = setup
    method = FedLease(RunConfig(tasks=[c.task for c in clients], global_rounds=3, warmup_rounds=2,
                                max_clusters=1, allocation="paper"), clients)
    run_warmup(method, clients, directions)
    ins = method.configure_train(2)
    assert all(i.layout.routing == "none" and i.layout.num_experts == 1 for i in ins.values())
    assert all(not any(k.endswith(".router") for k in i.state) for i in ins.values())


def test_embedding_allocation_groups_clients_by_their_data_signatures(setup):
    _, clients, directions = setup
    config = RunConfig(tasks=[c.task for c in clients], global_rounds=4, warmup_rounds=2, max_clusters=4, seed=3)
    method = FedLease(config, clients)
    # B directions say {0,1} {2,3} {4}; the signatures say {0,2,4} {1,3}: the embedding allocation follows them
    g = torch.Generator().manual_seed(1)
    means = {cid: torch.full((16,), 4.0) + torch.randn(16, generator=g) * 0.1 + (3.0 if cid % 2 else -3.0)
             * torch.arange(16.0).sin() for cid in range(5)}
    # class blocks (one per label of the largest label set) that sum to the mean: here all in class 0's block
    blocks = method.signature_blocks()
    signatures = {cid: torch.cat([mean, torch.zeros((blocks - 1) * 16)]) for cid, mean in means.items()}
    for rnd in range(2):
        updates = {}
        for c in clients:
            state = client_state(directions[c.task], 10 * rnd + c.client_id)
            updates[c.client_id] = Update({**state, SIGNATURE: signatures[c.client_id]}, 100)
        report = method.aggregate_train(rnd, updates)
    assert report.clustering.signature == "embedding_mean"  # the mean found structure: the blocks were not asked
    assert method.client_map() == {0: [0, 2, 4], 1: [1, 3]}
    assert any(line.startswith("clustering: K=2") and "embedding allocation" in line for line in report.log)
    # the signature is not part of any expert
    assert all(SIGNATURE not in expert for expert in method.experts)
    assert set(method.server_state()["signatures"]) == set(range(5))


def test_client_sends_the_frozen_encoders_data_signature_with_every_warmup_upload(tiny_clients):
    config, clients, infos = tiny_clients
    config = dataclasses.replace(config, warmup_rounds=2, global_rounds=3)
    method = FedLease(config, infos)
    client, store = clients[0], {}
    client.apply(PLAIN_LORA, client.adapted.initial_state(config.seed))
    embeddings, labels = client.embed(client.train_data), client.train_data.labels
    # block c: the client's share of class c times the mean embedding of its class-c examples
    expected = torch.cat([(labels == c).float().mean() * embeddings[labels == c].mean(0)
                          for c in range(client.spec.num_classes)])
    torch.testing.assert_close(expected.reshape(client.spec.num_classes, -1).sum(0), embeddings.mean(0))
    # one shape for the whole federation: as many blocks as its largest label set (snli's 3 here), zero beyond
    blocks = max(len(info.labels) for info in infos)
    assert method.configure_train(0)[0].extra[SEND_SIGNATURE] == blocks == 3 > client.spec.num_classes
    expected = torch.cat([expected, torch.zeros((blocks - client.spec.num_classes) * embeddings.shape[1])])
    first = method.client_train(client, method.configure_train(0)[0], 0, store)
    torch.testing.assert_close(first.state[SIGNATURE], expected)
    assert torch.equal(store[SIGNATURE], expected)
    # round 2 starts from the client's trained LoRA, but the signature stays the frozen encoder's (kept in the store)
    second = method.client_train(client, method.configure_train(1)[0], 1, store)
    torch.testing.assert_close(second.state[SIGNATURE], expected)
    assert not torch.equal(second.state[f"{next(iter(client.adapted.sites))}.lora_B"],
                           first.state[f"{next(iter(client.adapted.sites))}.lora_B"])
    # the adaptive phase and the paper's allocation send none
    paper = FedLease(dataclasses.replace(config, allocation="paper"), infos)
    assert SIGNATURE not in paper.client_train(client, paper.configure_train(0)[0], 0, {}).state


def test_a_client_that_missed_the_warmup_is_placed_by_its_first_call_b_and_trains_its_expert_at_once(setup):
    method, clients, directions = setup
    for rnd in range(2):  # client 3 (task t2) never answers during the warmup
        updates = {c.client_id: Update(client_state(directions[c.task], 10 * rnd + c.client_id), 100)
                   for c in clients if c.client_id != 3}
        report = method.aggregate_train(rnd, updates)
        if rnd == 0:
            first_b = {cid: {k: v for k, v in u.state.items() if k.endswith(".lora_B")} for cid, u in updates.items()}
    assert report.clustering.client_ids() == [0, 1, 2, 4]
    assert method.client_map() == {0: [0, 1], 1: [2], 2: [4]}
    assert any("allocation over the 4 clients that warmed up; the other 1" in line for line in report.log)
    # placement compares B after one call: the members' first warmup upload, not their last
    assert all(torch.equal(method.first_b[cid][k], first_b[cid][k]) for cid in first_b for k in first_b[cid])
    train = method.configure_train(2)
    ins = train[3]
    assert ins.extra[PLACE] == "lora_b" and ins.upload == PLACED_UPLOAD and ins.train == ("lora_A", "lora_B",
                                                                                           "router", "head")
    assert {f"centroid{k}/{SITES[0]}.lora_B" for k in range(3)} <= set(ins.state)
    assert {f"cluster{k}/{SITES[0]}.router" for k in range(3)} <= set(ins.state)
    assert train[0].layout.num_experts == 3 and PLACE not in train[0].extra
    # the client uploads its first-call B with what it trained; the server places it in cluster 1 (task t2) and,
    # since the client trained expert 1 too, averages its update into expert 1 (the only one of cluster 1 here)
    trained = client_state(directions["t2"], 99, router_slots=5)
    placed_b = {PLACED_B + k.removesuffix(".lora_B"): v + 0.01 for k, v in trained.items() if k.endswith(".lora_B")}
    report = method.aggregate_train(2, {3: Update({**trained, **placed_b}, 100, {"expert": 1})})
    assert method.cluster_of(3) == 1 and method.client_map() == {0: [0, 1], 1: [2, 3], 2: [4]}
    assert any(line.startswith("client 3 placed: expert 1") for line in report.log)
    for key in (f"{SITES[0]}.lora_A", f"{SITES[1]}.lora_B"):
        torch.testing.assert_close(method.experts[1][key], trained[key])
    assert not any(key.startswith(PLACED_B) for key in method.experts[1])
    # from the next round on it holds the bank with its expert as its own
    ins = method.configure_train(3)[3]
    assert ins.layout.own_expert == 1 and PLACE not in ins.extra
    torch.testing.assert_close(ins.state["head.classifier.weight"], method.head_of(3)["head.classifier.weight"])
    # and the assignment survives a checkpoint
    restored = FedLease(method.config, clients)
    restored.load_server_state(method.server_state())
    assert restored.client_map() == method.client_map()


def test_a_placed_update_that_trained_another_expert_than_the_server_computes_is_left_out(setup):
    method, clients, directions = setup
    for rnd in range(2):
        method.aggregate_train(rnd, {c.client_id: Update(client_state(directions[c.task], 10 * rnd + c.client_id),
                                                         100) for c in clients if c.client_id != 3})
    before = {k: dict(e) for k, e in enumerate(method.experts)}
    trained = client_state(directions["t2"], 99, router_slots=5)
    placed_b = {PLACED_B + k.removesuffix(".lora_B"): v for k, v in trained.items() if k.endswith(".lora_B")}
    report = method.aggregate_train(2, {3: Update({**trained, **placed_b}, 100, {"expert": 0})})
    assert method.cluster_of(3) == 1 and any("left out this round" in line for line in report.log)
    assert all(torch.equal(method.experts[k][key], before[k][key]) for k in before for key in before[k])


def test_allocation_waits_while_no_warmup_upload_has_arrived(setup):
    method, clients, directions = setup
    for rnd in range(2):
        report = method.aggregate_train(rnd, {})
    assert method.clustering is None and any("allocation postponed" in line for line in report.log)
    assert all(i.layout == PLAIN_LORA and i.keep for i in method.configure_train(2).values())  # still warmup
    updates = {c.client_id: Update(client_state(directions[c.task], c.client_id), 100) for c in clients}
    report = method.aggregate_train(2, updates)
    assert report.phase == "warmup" and method.clustering.num_clusters == 3
    assert method.configure_train(3)[0].layout.num_experts == 3
