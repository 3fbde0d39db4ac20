"""The Flower runtime: same method code, same results as the in-process runner; real deployments on loopback."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import tomllib
import torch
from flower_grid import InProcessGrid, run_server
from flwr.app import RecordDict
from safetensors.torch import load_file

from conftest import REPO, tiny_instruction_config, tiny_run_config, write_instruction_folder
from fedlease.config import RunConfig
from fedlease.errors import ConfigError, DataError
from fedlease.methods.base import Instruction, Update
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.client_state import ClientState, FolderBackend, Owner
from fedlease.runtime.flower import client_app, server_app
from fedlease.runtime.flower.messages import (
    decode_evaluate_first,
    decode_evaluation,
    decode_instruction,
    decode_update,
    decode_update_evaluation,
    encode_evaluation,
    encode_instruction,
    encode_update,
    get_state,
    put_state,
)
from fedlease.runtime.flower.run_config import from_run_config, to_run_config
from fedlease.runtime.loop import Evaluation, Federation
from fedlease.runtime.participation import Participation
from fedlease.runtime.simulation import run

pytestmark = pytest.mark.flower


def history(out: Path) -> dict:
    return json.loads((out / "training_history.json").read_text())


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((out / "final").glob("*.safetensors"))}


def assert_same_results(a: Path, b: Path) -> None:
    ha, hb = history(a), history(b)
    assert ha["clustering"] == hb["clustering"]
    assert ha["optimal_n_clusters"] == hb["optimal_n_clusters"]
    assert ha["client_scores"].keys() == hb["client_scores"].keys()
    for cid, scores in ha["client_scores"].items():
        assert len(scores) == len(hb["client_scores"][cid])
        for x, y in zip(scores, hb["client_scores"][cid], strict=True):
            assert x.keys() == y.keys()
            for metric in x:
                assert x[metric] == pytest.approx(y[metric], abs=1e-6), (cid, metric)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        for key, value in wa[name].items():
            torch.testing.assert_close(value, wb[name][key], rtol=1e-6, atol=1e-6)


def test_run_config_round_trip():
    config = RunConfig(tasks=["snli", "snli", "sst2"], target_modules=["query", "value"], num_experts=3,
                       data_dir="/data/glue", allow_overlap=True, max_update_norm=5.0)
    values = to_run_config(config)
    assert values["tasks"] == "snli:2 sst2" and values["top-k"] == 0 and values["allow-overlap"] is True
    back, runtime = from_run_config(values)
    assert dataclasses.replace(back, tasks=["snli", "snli", "sst2"]) == config
    assert runtime == {"round-timeout": 3600.0, "wait-nodes-timeout": 120.0, "resume": False,
                       "allow-mixed-precision": False, "rejoin-timeout": 60.0,
                       "secure-aggregation": False}
    assert from_run_config({"resume": "true", "top-k": 0})[1]["resume"] is True


def test_pyproject_app_config_mirrors_the_run_flags():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["config"] == to_run_config(RunConfig())
    assert app["components"] == {"serverapp": "fedlease.runtime.flower.server_app:app",
                                 "clientapp": "fedlease.runtime.flower.client_app:app"}
    assert "federations" not in pyproject["tool"]["flwr"]


def test_messages_round_trip():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    layout = ExpertLayout(num_experts=3, own_expert=2, routing="adaptive")
    state = {"a.lora_A": torch.randn(4, 8), "a.experts_B": torch.randn(3, 8, 4).transpose(1, 2),
             "steps": torch.tensor(5), "head.classifier.bias": torch.zeros(3), "counts": torch.arange(6).view(2, 3)}
    ins = Instruction(layout, state, train=("lora_A", "router"), upload=("lora_A",), restore=(), keep=("lora_B",),
                      extra={"cluster": 2})
    content = encode_instruction(ins, 7, final=True)
    assert sorted(content["state"].keys()) == ["float32", "int64"]  # packed: one array per dtype, whatever the count
    back, rnd, final = decode_instruction(content)
    assert (rnd, final, back.layout, back.train, back.upload, back.restore, back.keep, back.extra) == \
        (7, True, layout, ins.train, ins.upload, (), ins.keep, {"cluster": 2})
    assert list(back.state) == list(state)
    assert all(back.state[k].dtype == v.dtype and torch.equal(back.state[k], v) for k, v in state.items())
    update = Update(state, 123, {"train_loss": 0.5, "cluster": 1})
    pid, got = decode_update(encode_update(update, 4))
    assert pid == 4 and got.num_examples == 123 and got.metrics == update.metrics
    assert all(torch.equal(got.state[k], v) for k, v in state.items())
    pid, evaluation = decode_evaluation(encode_evaluation(Evaluation({"accuracy": 0.75}, (layout, state)), 2))
    assert pid == 2 and evaluation.metrics == {"accuracy": 0.75} and evaluation.final[0] == layout
    assert decode_update(encode_update(Update({}, 5), 0))[1].state == {}
    assert decode_evaluate_first(content, back.state) is None
    assert decode_update_evaluation(encode_update(update, 4)) is None


def test_a_training_message_carries_the_previous_rounds_evaluation_without_sending_a_tensor_twice():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    bank = {"a.experts_A": torch.randn(3, 4, 8), "a.experts_B": torch.randn(3, 8, 4), "a.router": torch.randn(5, 8),
            "n": torch.ones(2)}
    ins = Instruction(ExpertLayout(num_experts=3, own_expert=1, routing="adaptive"), bank, train=("router",),
                      upload=("router",))
    # the evaluation's state: one tensor is the training state's own, one equal to it, one not in it, and two
    # under names the training state has, with other values or another dtype
    before = Instruction(ExpertLayout(), {"head.w": torch.randn(2, 2), "a.experts_A": bank["a.experts_A"],
                                          "a.experts_B": bank["a.experts_B"].clone(), "a.router": bank["a.router"] + 1,
                                          "z": torch.arange(3), "n": torch.ones(2, dtype=torch.float64)},
                         restore=("lora_B",), extra={"cluster": 1})
    content = encode_instruction(ins, 4, evaluate_first=(3, before))
    sent = get_state(content, "evaluate-state")
    assert sorted(sent) == ["a.router", "head.w", "n", "z"]  # the experts travel once, in the training state
    trained, rnd, _ = decode_instruction(content)
    evaluated, back = decode_evaluate_first(content, trained.state)
    assert evaluated == 3 and rnd == 4
    assert (back.layout, back.restore, back.extra, list(back.state)) == \
        (before.layout, ("lora_B",), {"cluster": 1}, list(before.state))
    assert all(back.state[k].dtype == v.dtype and torch.equal(back.state[k], v) for k, v in before.state.items())
    reply = encode_update(Update({}, 5), 0, {"accuracy": 0.5, "loss": 0.25})
    assert decode_update_evaluation(reply) == {"accuracy": 0.5, "loss": 0.25}


def flower_run(config: RunConfig, fail: dict[int, set[int]] | None = None, resume: bool = False,
               round_timeout: float = 120.0, **grid_options) -> Path:
    """Replies are computed synchronously while the server pushes, so ``round_timeout`` must cover a round's
    training on a busy machine; a reply the grid drops (``late``) costs the whole timeout."""
    client_app.session_for.cache_clear()
    run_config = {**to_run_config(config), "round-timeout": round_timeout, "rejoin-timeout": 1.5, "resume": resume}
    grid = InProcessGrid(client_app.app, config.num_clients, run_config, fail, **grid_options)
    run_server(server_app.app, grid)
    return Path(config.output_dir)


def state_dirs(root: Path, num_clients: int) -> dict[int, dict]:
    return {pid: {"state-dir": str(root / f"client-{pid}")} for pid in range(num_clients)}


@pytest.mark.parametrize("method", ["fedlease", "feddpa", "ifca"])
def test_flower_gives_the_in_process_runners_results(tiny_model, tmp_path, monkeypatch, method):
    config = tiny_run_config(tiny_model, tmp_path / "in-process", method=method, tasks=["rotten_tomatoes:2", "snli"],
                             num_clusters=2 if method == "ifca" else 4)
    run(config, progress=False)
    sent = []
    push = InProcessGrid.push_messages

    def counted(grid, messages):
        messages = list(messages)
        sent.extend(messages)
        return push(grid, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", counted)
    flower = flower_run(dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"],
                                            output_dir=str(tmp_path / "flower")))
    assert_same_results(tmp_path / "in-process", flower)
    assert history(flower)["rounds"][-1]["clients"]["2"]["upload_bytes"] > 0
    # one message per client and round: each round's evaluation travels with the next round's training
    types = [m.metadata.message_type for m in sent if m.metadata.message_type != "query.partition"]
    assert types.count("train") == 3 * config.global_rounds and types.count("evaluate") == 3


@pytest.mark.parametrize("method", ["fedsa_lora"])  # FedLEASE: the decoder deployment test below
def test_flower_trains_instruction_tasks_as_the_in_process_runner(tiny_causal_lm, tmp_path, method):
    config = tiny_instruction_config(tiny_causal_lm, tmp_path / "in-process", method=method, train_samples=8,
                                     test_samples=4, tasks=["instruct_sentiment:2", "instruct_struct2text"])
    run(config, progress=False)
    flower = flower_run(dataclasses.replace(config, output_dir=str(tmp_path / "flower"),
                                            tasks=["instruct_sentiment", "instruct_sentiment", "instruct_struct2text"]))
    assert_same_results(tmp_path / "in-process", flower)
    assert "rouge1" in history(flower)["final"]["mean"]


def test_a_failing_node_is_left_out_and_rejoins(tiny_model, tmp_path):
    config = tiny_run_config(tiny_model, tmp_path / "o", tasks=["rotten_tomatoes:2", "snli"], global_rounds=4,
                             warmup_rounds=1)
    out = flower_run(dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"]),
                     fail={1: {2}})
    rounds = history(out)["rounds"]
    # round 3's message, which also carried round 2's evaluation, was lost: client 1 trained in round 2 but was
    # not evaluated, did not train in round 3, and was evaluated after it with round 4's message
    assert rounds[1]["clients"]["1"]["eval"] is None and rounds[1]["clients"]["1"]["upload_bytes"] > 0
    assert rounds[2]["clients"]["1"]["train"] is None and rounds[2]["clients"]["1"]["upload_bytes"] == 0
    # what it downloaded: round 2's message, not round 3's (which never reached it)
    assert rounds[1]["clients"]["1"]["download_bytes"] == rounds[1]["clients"]["0"]["download_bytes"] > 0
    assert rounds[2]["clients"]["1"]["download_bytes"] == 0 < rounds[2]["clients"]["0"]["download_bytes"]
    assert len(history(out)["client_scores"]["1"]) == 3
    assert set(rounds[3]["clients"]) == {"0", "1", "2"}  # round 4: it is back
    assert rounds[3]["clients"]["1"]["upload_bytes"] > 0
    log = (out / "training_log.txt").read_text()
    assert "round 3: client 1 did not reply" in log
    assert history(out)["final"] is not None


def run_with_client_1_failing(tiny_model, out, monkeypatch, name: str, rnd: int, error: str,
                              exception: type[Exception] = RuntimeError) -> list[dict]:
    """A 4-round Flower run whose client 1 raises ``exception(error)`` in its method's ``name`` (client_train or
    client_evaluate) for round index ``rnd``; the history's rounds."""
    from fedlease.methods.base import FederatedMethod

    original = getattr(FederatedMethod, name)

    def failing(self, client, ins, r, store):
        if client.client_id == 1 and r == rnd:
            raise exception(error)
        return original(self, client, ins, r, store)

    monkeypatch.setattr(FederatedMethod, name, failing)
    config = tiny_run_config(tiny_model, out, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"], global_rounds=4,
                             warmup_rounds=1)
    return history(flower_run(config))["rounds"]


def test_an_evaluation_that_fails_on_a_node_costs_no_training(tiny_model, tmp_path, monkeypatch):
    # round 2's evaluation, sent with round 3's training message
    rounds = run_with_client_1_failing(tiny_model, tmp_path / "o", monkeypatch, "client_evaluate", 1,
                                       "out of memory while generating")
    assert rounds[1]["clients"]["1"]["eval"] is None and rounds[1]["clients"]["0"]["eval"] is not None
    assert rounds[2]["clients"]["1"]["train"] is not None and rounds[2]["clients"]["1"]["upload_bytes"] > 0
    assert rounds[2]["clients"]["1"]["eval"] is not None
    log = (tmp_path / "o" / "training_log.txt").read_text()
    assert ("client 1 could not evaluate round 2 on its node (RuntimeError: out of memory while generating); "
            "its update of round 3 is used") in log


def test_a_training_that_fails_on_a_node_keeps_the_evaluation_that_came_first(tiny_model, tmp_path, monkeypatch):
    # round 3's training, whose message carried round 2's evaluation
    rounds = run_with_client_1_failing(tiny_model, tmp_path / "o", monkeypatch, "client_train", 2,
                                       "CUDA out of memory")
    assert rounds[1]["clients"]["1"]["eval"] is not None  # round 2's score, computed before the failed training
    assert rounds[2]["clients"]["1"]["train"] is None and rounds[2]["clients"]["1"]["upload_bytes"] == 0
    assert rounds[3]["clients"]["1"]["train"] is not None  # round 4: it trains again
    log = (tmp_path / "o" / "training_log.txt").read_text()
    assert ("client 1 could not train round 3 on its node (RuntimeError: CUDA out of memory); its evaluation of "
            "round 2 is kept") in log


@pytest.mark.parametrize("rnd", [0, 2])  # alone, and after the evaluation of round 2 in the same message
def test_a_training_that_diverges_on_a_node_stops_the_run_as_in_process(tiny_model, tmp_path, monkeypatch, rnd):
    """As the in-process runner: the run stops with one line naming the round and the client, the rounds before
    are recorded and checkpointed (round 2 with the evaluations that came with round 3's training), and nothing of
    the diverged round is."""
    from fedlease.runtime.checkpoint import read_manifest
    from fedlease.train import TrainingDiverged

    out = tmp_path / "o"
    with pytest.raises(TrainingDiverged) as stopped:
        run_with_client_1_failing(tiny_model, out, monkeypatch, "client_train", rnd,
                                  "client 1 (rotten_tomatoes): the training loss became nan", TrainingDiverged)
    assert str(stopped.value) == f"round {rnd + 1}, client 1 (rotten_tomatoes): the training loss became nan"
    assert f"fedlease: error: round {rnd + 1}, client 1" in (out / "training_log.txt").read_text()
    assert not (out / f"round_summary_{rnd + 1}.json").exists()
    if rnd:
        assert len(history(out)["rounds"]) == rnd and history(out)["final"] is None
        assert history(out)["rounds"][-1]["clients"]["1"]["eval"] is not None  # its evaluation came first
        assert read_manifest(out)["round"] == rnd - 1


def test_two_live_nodes_of_one_client_do_not_take_turns(tiny_model, tmp_path):
    # a second SuperNode with partition-id 1 (an overlapping restart, a duplicated node config): the client moves
    # to one of them once and stays; alternating would lose its own state (FedSA's B) every round
    config = tiny_run_config(tiny_model, tmp_path / "single", method="fedsa_lora",
                             tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"], global_rounds=4, warmup_rounds=1)
    single = flower_run(config)
    double = flower_run(dataclasses.replace(config, output_dir=str(tmp_path / "double")), extra_nodes=[1])
    assert_same_results(single, double)
    log = (double / "training_log.txt").read_text()
    assert log.count("client 1 is now on node") == 1 and "no longer held its own state" not in log


def test_a_client_that_misses_the_whole_warmup_is_placed_and_trains_its_expert_when_it_comes_back(tiny_model,
                                                                                                    tmp_path):
    config = tiny_run_config(tiny_model, tmp_path / "o", tasks=["rotten_tomatoes", "rotten_tomatoes", "snli", "snli"],
                             global_rounds=4, warmup_rounds=1, num_experts=2)
    out = flower_run(config, fail={3: {0}})  # client 3 is down for the only warmup round
    h = history(out)
    assert h["clustering"]["clients"] == [0, 1, 2]
    log = (out / "training_log.txt").read_text()
    assert "allocation over the 3 clients that warmed up; the other 1" in log and "client 3 placed: expert" in log
    rounds = h["rounds"]
    assert rounds[0]["clients"]["3"]["train"] is None  # evaluated (untrained) with its next message only
    # its first round after the allocation downloads every expert, router, head and centroid, places itself and
    # trains its expert at once; afterwards it downloads what the others do
    assert rounds[1]["clients"]["3"]["download_params"] > rounds[1]["clients"]["2"]["download_params"] > 0
    assert rounds[1]["clients"]["3"]["train"]["expert"] in (0, 1)
    assert rounds[2]["clients"]["3"]["download_params"] == rounds[2]["clients"]["2"]["download_params"] > 0
    joined = next(int(k) for k, members in h["lora_client_map"].items() if 3 in members)
    assert joined == rounds[1]["clients"]["3"]["train"]["expert"]
    layout = json.loads(safe_open_metadata(out / "final" / "client_3.safetensors")["layout"])
    assert layout["own_expert"] == joined
    assert h["final"] is not None


def test_flower_samples_from_the_connected_nodes_and_a_late_node_is_placed(tiny_model, tmp_path):
    """20 nodes, 5 a round; node 19 connects only after the allocation (during round 3, so it can be sampled from
    round 4 on); every node's metrics at the end."""
    config = tiny_run_config(tiny_model, tmp_path / "o", tasks=["rotten_tomatoes"] * 10 + ["snli"] * 10,
                             global_rounds=5, warmup_rounds=2, clients_per_round=5, num_experts=2, train_samples=8,
                             test_samples=4, seed=1)
    sampler = Participation(config)
    cohorts = [sampler.cohort(rnd, [c for c in range(20) if c != 19 or rnd >= 3]) for rnd in range(5)]
    assert 19 in cohorts[3], "the seed must sample node 19 as soon as it is connected"
    out = flower_run(config, appear={19: 2})
    h = history(out)
    for rnd, summary in enumerate(h["rounds"]):
        trained = sorted(int(cid) for cid, c in summary["clients"].items() if c["train"] is not None)
        assert trained == cohorts[rnd]
    assert 19 not in h["clustering"]["clients"]
    assert h["rounds"][3]["clients"]["19"]["train"]["expert"] in (0, 1)  # placed, trained its expert at once
    final = h["rounds"][-1]["clients"]
    assert sorted(int(cid) for cid, c in final.items() if c["eval"] is not None) == list(range(20))
    assert sum(h["final"]["counts"].values()) == 20


def safe_open_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize(("method", "rounds"), [("fedsa_lora", {1, 2}), ("fedlease", {1})])
def test_a_node_restarted_with_a_state_dir_continues_as_if_it_never_stopped(tiny_model, tmp_path, method, rounds):
    """FedSA-LoRA keeps its B on the client; FedLEASE restarted in its second warmup round keeps its own LoRA."""
    config = tiny_run_config(tiny_model, tmp_path / "in-process", method=method, tasks=["rotten_tomatoes:2", "snli"],
                             global_rounds=4, warmup_rounds=2)
    run(config, progress=False)
    flower = dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"])
    kept = flower_run(dataclasses.replace(flower, output_dir=str(tmp_path / "kept")), restart={1: rounds},
                      node_config=state_dirs(tmp_path / "state", 3))
    assert_same_results(tmp_path / "in-process", kept)
    # without a state-dir the restarted node has lost its state: logged on both sides, and the results differ
    lost = flower_run(dataclasses.replace(flower, output_dir=str(tmp_path / "lost")), restart={1: rounds})
    assert "client 1: its node no longer held its own state of round 1" in (lost / "training_log.txt").read_text()
    with pytest.raises(AssertionError):
        assert_same_results(tmp_path / "in-process", lost)


@pytest.mark.parametrize(("method", "rnd"), [("fedlease", 1), ("fedsa_lora", 2)])
def test_a_node_that_crashes_mid_round_and_restarts_gets_the_message_again(tiny_model, tmp_path, method, rnd):
    """Killed while training (FedLEASE: in its second warmup round) and restarted at once: the server sends the
    round's message to the new node, which continues from its state-dir; the run equals an uninterrupted one."""
    config = tiny_run_config(tiny_model, tmp_path / "in-process", method=method, tasks=["rotten_tomatoes:2", "snli"],
                             global_rounds=4, warmup_rounds=2)
    run(config, progress=False)
    flower = dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"],
                                 output_dir=str(tmp_path / "flower"))
    out = flower_run(flower, crash={1: {rnd}}, node_config=state_dirs(tmp_path / "state", 3))
    assert "client 1 is back on node" in (out / "training_log.txt").read_text()
    assert_same_results(tmp_path / "in-process", out)


@pytest.mark.parametrize("method", ["local", "fedsa_lora"])
def test_a_server_stopped_before_its_checkpoint_resumes_to_the_uninterrupted_results(tiny_model, tmp_path,
                                                                                     monkeypatch, method):
    """The server stops after round 2's evaluation (it came with round 3's training: the nodes have committed round 2
    and trained round 3) but before its checkpoint; the resumed run starts again from round 1's checkpoint, and the
    nodes go back to their round-1 state."""
    config = tiny_run_config(tiny_model, tmp_path / "in-process", method=method, tasks=["rotten_tomatoes:2", "snli"],
                             global_rounds=4, warmup_rounds=1)
    run(config, progress=False)
    flower = dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"],
                                 output_dir=str(tmp_path / "flower"))
    nodes = state_dirs(tmp_path / "state", 3)
    checkpoint = Federation.checkpoint

    def stop_at_round_2(self, rnd):
        if rnd == 1:
            raise KeyboardInterrupt("the server stops")
        checkpoint(self, rnd)

    monkeypatch.setattr(Federation, "checkpoint", stop_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        flower_run(flower, node_config=nodes)
    monkeypatch.setattr(Federation, "checkpoint", checkpoint)
    with pytest.raises(ConfigError, match=r"different configuration: --lr 0\.02 \(the run used 0\.01\)"):
        flower_run(dataclasses.replace(flower, lr=2e-2), node_config=nodes, resume=True)  # refused, nothing run
    out = flower_run(flower, node_config=nodes, resume=True)  # new node processes: only the state-dirs remain
    assert_same_results(tmp_path / "in-process", out)
    assert history(out)["resumed"] == [{"after_round": 1, "model_source": tiny_model, "runtime": "flower"}]
    with pytest.raises(ConfigError, match="made on Flower; continue it there"):
        run(flower, progress=False, resume=True)  # its clients' stores are on the nodes


def test_a_reply_that_misses_the_round_does_not_advance_the_clients_state(tiny_model, tmp_path):
    config = tiny_run_config(tiny_model, tmp_path / "o", method="local", tasks=["rotten_tomatoes", "rotten_tomatoes"],
                             global_rounds=3, warmup_rounds=1)
    # client 0 trains in round 2 but its reply arrives too late, or it does not train at all: the same to the server,
    # and now the same to the client, whose round-2 training is dropped instead of kept
    late = flower_run(dataclasses.replace(config, output_dir=str(tmp_path / "late")), late={0: {1}},
                      node_config=state_dirs(tmp_path / "state-late", 2), round_timeout=10.0)
    absent = flower_run(dataclasses.replace(config, output_dir=str(tmp_path / "absent")), fail={0: {1}},
                        node_config=state_dirs(tmp_path / "state-absent", 2))
    h_late, h_absent = history(late), history(absent)
    assert "0" not in h_late["rounds"][1]["clients"] or h_late["rounds"][1]["clients"]["0"]["upload_bytes"] == 0
    assert h_late["client_scores"]["0"][-1] == h_absent["client_scores"]["0"][-1]


def test_nodes_with_bad_input_are_refused_with_one_line_and_the_rest_goes_on(tiny_model, glue_dir, tmp_path, caplog):
    config = tiny_run_config(tiny_model, tmp_path / "o", tasks=["rotten_tomatoes", "rotten_tomatoes", "sst2", "snli"],
                             data_dir=str(glue_dir), global_rounds=2, warmup_rounds=1)
    (tmp_path / "a-file").write_text("not a folder")
    other = tmp_path / "other-run"
    ClientState(FolderBackend(other), Owner("another-run", 3)).stage(0, {"x": torch.zeros(1)})
    node_config = {1: {"state-dir": str(tmp_path / "a-file")}, 2: {"data-dir": str(tmp_path)},
                   3: {"state-dir": str(other)}}
    fedlease_log = logging.getLogger("fedlease")  # the ServerApp stops it propagating to the root logger
    fedlease_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("ERROR", logger="fedlease"):
            out = flower_run(config, node_config=node_config, extra_nodes=[7])
    finally:
        fedlease_log.removeHandler(caplog.handler)
    log = (out / "training_log.txt").read_text()
    assert "partition-id 7 is outside the run's 4 clients" in log
    assert "state folder " + str(tmp_path / "a-file") + " is not writable" in log
    assert "SST-2" in log and "answered with error" in log
    assert "holds the state of client 3 of run another-run" in log
    node_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fedlease: error:")]
    assert any("outside the run" in line for line in node_lines) and len(node_lines) >= 4
    h = history(out)
    assert h["final"] is not None  # the others went on without them: the refused nodes received, nothing more
    last = h["rounds"][-1]["clients"]
    assert {cid for cid, c in last.items() if c["train"] or c["eval"] or c["upload_bytes"]} == {"0"}
    assert set(last) == {"0", "1", "2", "3"}  # listed: their nodes received the round's message
    assert set(h["nodes"]) == {"0", "1", "2", "3"} and h["nodes"]["0"]["device"] == "cpu"
    assert {"precision", "torch", "transformers", "flwr", "fedlease"} <= set(h["nodes"]["0"])


def test_each_nodes_device_precision_and_versions_are_recorded_and_a_mix_of_precisions_refused(caplog):
    from importlib.metadata import version

    transport = server_app.FlowerTransport(None, RunConfig(tasks=["snli"] * 3), 10.0)
    bf16 = {"device": "cpu", "precision": "autocast torch.bfloat16", "torch": version("torch")}
    with caplog.at_level("INFO", logger="fedlease"):
        assert transport.accept_node(0, 100, bf16)
        assert not transport.accept_node(1, 101, {**bf16, "precision": "fp32"})
        assert transport.accept_node(2, 102, bf16)
    assert set(transport.nodes) == {0, 2}
    assert "node 101 of client 1 trains in fp32, but this run trains in autocast torch.bfloat16; ignored" in caplog.text
    mixed = server_app.FlowerTransport(None, RunConfig(tasks=["snli"] * 2), 10.0, allow_mixed_precision=True)
    assert mixed.accept_node(0, 100, bf16) and mixed.accept_node(1, 101, {**bf16, "precision": "fp32"})


# -- real deployments on loopback (SuperLink + SuperNodes as processes) ----------------------------------------

def deployment_config(model: str, out: Path, **overrides) -> RunConfig:
    from fedlease.runtime.simulation import prepare_config

    values = dict(tasks=["rotten_tomatoes:2", "snli"], global_rounds=3, warmup_rounds=1, train_samples=16,
                  test_samples=8, batch_size=8, max_length=16)
    values.update(overrides)
    return prepare_config(tiny_run_config(model, out.resolve(), **values))


def test_tls_deployment_matches_the_in_process_runner(tiny_model, tmp_path):
    from fedlease.runtime.flower.deploy import LoopbackDeployment

    config = deployment_config(tiny_model, tmp_path / "flower")
    run(dataclasses.replace(config, output_dir=str(tmp_path / "in-process")), progress=False)
    with LoopbackDeployment(tmp_path / "work", config.num_clients, tls=True, log=lambda _: None) as deployment:
        result = deployment.submit(config, round_timeout=120, stream_to=subprocess.PIPE)
    log = result.stdout.decode(errors="replace")
    assert "round 3 (adaptive)" in log, log[-3000:]
    assert_same_results(tmp_path / "in-process", tmp_path / "flower")
    assert (tmp_path / "work" / "certs" / "ca.crt").exists()


def test_a_decoder_deployment_whose_nodes_hold_only_their_own_instructions_matches_the_in_process_runner(
        tiny_causal_lm, tmp_path):
    """Real SuperNodes fine-tune a causal LM, each reading its category from a node-local folder that holds no other
    category; the server (and the in-process runner) read the whole folder."""
    from fedlease.runtime.flower.deploy import LoopbackDeployment

    whole = write_instruction_folder(tmp_path / "all")
    config = deployment_config(tiny_causal_lm, tmp_path / "flower", tasks=["reverse_words:2", "upper:2"],
                               instruction_dir=str(whole), train_samples=4, test_samples=2, max_length=64,
                               max_new_tokens=6)
    run(dataclasses.replace(config, output_dir=str(tmp_path / "in-process")), progress=False)
    own = {pid: {"instruction-dir": str(write_instruction_folder(tmp_path / f"node-{pid}", only=task))}
           for pid, task in enumerate(config.tasks)}
    with LoopbackDeployment(tmp_path / "work", config.num_clients, log=lambda _: None, node_config=own) as deployment:
        result = deployment.submit(config, round_timeout=120, stream_to=subprocess.PIPE)
    log = result.stdout.decode(errors="replace")
    assert "round 3 (adaptive)" in log, log[-3000:]
    assert_same_results(tmp_path / "in-process", tmp_path / "flower")
    assert "rouge1" in history(tmp_path / "flower")["final"]["mean"]


def test_a_node_whose_instruction_folder_lacks_its_category_is_refused(tmp_path):
    whole = write_instruction_folder(tmp_path / "all")
    config = RunConfig(tasks=["reverse_words", "upper"], instruction_dir=str(whole))
    folder = write_instruction_folder(tmp_path / "node", only="upper")
    assert client_app.with_node_instructions(config, str(folder), 1).instruction_dir == str(folder)
    with pytest.raises(DataError, match=r"instruction-dir .*node has no category 'reverse_words' \(it has: upper\)"):
        client_app.with_node_instructions(config, str(folder), 0)


@pytest.mark.parametrize("method", ["fedlease", "fedsa_lora"])
def test_a_killed_supernode_restarted_mid_run_ends_as_an_uninterrupted_run(tiny_model, tmp_path, method):
    """SIGKILL a SuperNode (and its executor) in round 2 (FedLEASE: the second warmup round) and start it again: the
    server sends the round's messages to the new node, which continues from its state-dir."""
    from fedlease.runtime.flower.deploy import LoopbackDeployment

    out = tmp_path / "flower"
    config = deployment_config(tiny_model, out, global_rounds=4, warmup_rounds=2, method=method)
    run(dataclasses.replace(config, output_dir=str(tmp_path / "in-process")), progress=False)
    with LoopbackDeployment(tmp_path / "work", config.num_clients, log=lambda _: None) as deployment:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(
            proc=deployment.submit(config, round_timeout=240, stream_to=subprocess.PIPE)))
        runner.start()

        def wait_for(path: Path, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not path.exists() and time.monotonic() < deadline and runner.is_alive():
                time.sleep(0.1)
            assert path.exists(), f"{path.name} did not appear"

        wait_for(out / "round_summary_1.json", 240)
        deployment.kill_node(2, signal.SIGKILL)  # round 2 has started: its messages are out
        deployment.start_node(2)  # a new node id and a new process, the same state-dir
        runner.join(timeout=600)
        assert not runner.is_alive(), "the run did not finish"
    streamed = result["proc"].stdout.decode(errors="replace")
    assert history(out)["final"] is not None, streamed[-4000:]
    assert re.search(r"client 2 (is now on|rejoined on) node", (out / "training_log.txt").read_text())
    assert_same_results(tmp_path / "in-process", out)


def test_twenty_real_supernodes_five_a_round_and_a_node_that_joins_after_the_allocation(tiny_model, tmp_path):
    """20 SuperNode processes on loopback, 5 sampled a round; node 19 starts only once the allocation is written, so
    it is placed by its signature, never clustered; the run ends with every node's metrics."""
    from fedlease.runtime.flower.deploy import LoopbackDeployment

    out = tmp_path / "flower"
    config = deployment_config(tiny_model, out, tasks=["rotten_tomatoes:10", "snli:10"], global_rounds=5,
                               warmup_rounds=2, clients_per_round=5, num_experts=2, train_samples=8, test_samples=4,
                               seed=1)
    with LoopbackDeployment(tmp_path / "work", 20, log=lambda _: None, late=[19]) as deployment:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(
            proc=deployment.submit(config, round_timeout=240, stream_to=subprocess.PIPE)))
        runner.start()
        deadline = time.monotonic() + 600
        while not (out / "round_summary_2.json").exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / "round_summary_2.json").exists(), "the warmup did not end"
        deployment.start_node(19)
        runner.join(timeout=600)
        assert not runner.is_alive(), "the run did not finish"
    streamed = result["proc"].stdout.decode(errors="replace")
    h = history(out)
    assert h["final"] is not None, streamed[-4000:]
    assert 19 not in h["clustering"]["clients"]
    sampler = Participation(config)
    for rnd, summary in enumerate(h["rounds"]):
        trained = sorted(int(cid) for cid, c in summary["clients"].items() if c["train"] is not None)
        # node 19 is reachable from round 3 or 4 on (when it connected is the machine's timing, not the seed's)
        allowed = [sampler.cohort(rnd, [c for c in range(20) if c != 19 or rnd >= first]) for first in (2, 3)]
        assert trained in allowed if rnd >= 2 else trained == allowed[0], (rnd, trained, allowed)
        if 19 in trained:
            assert summary["clients"]["19"]["train"]["expert"] in (0, 1)  # placed on its first round
    final = h["rounds"][-1]["clients"]
    assert sorted(int(cid) for cid, c in final.items() if c["eval"] is not None) == list(range(20))
    assert sum(h["final"]["counts"].values()) == 20


@pytest.mark.parametrize(("method", "unit"), [("fedlease", "client"), ("ifca", "client"), ("fedit", "record")])
def test_flower_gives_the_in_process_runners_results_under_differential_privacy(tiny_model, tmp_path, monkeypatch,
                                                                               method, unit):
    """Client-level DP: the server, which loads no model, asks a node for the seeded initial state that the first
    aggregates are noised changes against (IFCA: one per cluster seed); record-level DP: each node's DP-SGD and its
    accounting. The secrets (the server's noise, each client's) are fixed so that both runs draw the same noise."""
    import secrets

    monkeypatch.setattr(secrets, "randbits", lambda bits: 123456789)
    config = tiny_run_config(tiny_model, tmp_path / "in-process", method=method, tasks=["rotten_tomatoes:2", "snli"],
                             num_clusters=2 if method == "ifca" else 4, dp_clip=0.5, dp_noise=0.3, dp_unit=unit,
                             global_rounds=2)
    run(config, progress=False)
    queries = []
    push = InProcessGrid.push_messages

    def counted(grid, messages):
        messages = list(messages)
        queries.extend(int(m.content["config"]["seed"]) for m in messages
                       if m.metadata.message_type == "query.initial")
        return push(grid, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", counted)
    if method == "fedlease" and unit == "client":  # the first node's answer is not finite: the next node is asked
        pull = InProcessGrid.pull_messages

        def spoiled(grid, message_ids):
            replies = list(pull(grid, message_ids))
            for reply in replies:
                if queries == [config.seed] and reply.metadata.message_type == "query.initial":
                    state = get_state(reply.content, "state")
                    reply.content = put_state(RecordDict(), "state", {k: v * math.nan for k, v in state.items()})
            return replies

        monkeypatch.setattr(InProcessGrid, "pull_messages", spoiled)
    flower = flower_run(dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"],
                                            output_dir=str(tmp_path / "flower")))
    assert_same_results(tmp_path / "in-process", flower)
    privacy, expected = history(flower)["privacy"], history(tmp_path / "in-process")["privacy"]
    assert privacy == expected and privacy["epsilon"] > 0
    if method == "fedlease" and unit == "client":  # asked again after the spoiled answer, and then never
        assert queries == [config.seed, config.seed]
    elif unit == "client":  # each seed asked once: the run's, and IFCA's clusters' own
        assert sorted(set(queries)) == sorted(queries) and config.seed in queries
        assert len(queries) == 1 + config.num_clusters
    else:
        assert not queries and set(privacy["clients"]) == {"0", "1", "2"}


def test_a_record_level_reply_that_misses_the_round_is_still_charged(tiny_model, tmp_path):
    """Client 0 trains in round 2 with DP-SGD but its reply misses the round: the upload left the client all the
    same, so its steps count (they are not rolled back with its state) and the ledger charges them."""
    from fedlease.privacy.record import steps_per_call

    config = tiny_run_config(tiny_model, tmp_path / "o", method="fedit", tasks=["rotten_tomatoes", "rotten_tomatoes"],
                             global_rounds=3, warmup_rounds=1, dp_clip=0.5, dp_noise=1.0, dp_unit="record")
    out = flower_run(config, late={0: {1}}, node_config=state_dirs(tmp_path / "state", 2), round_timeout=10.0)
    clients = history(out)["privacy"]["clients"]
    per_round = steps_per_call(config.local_epochs, config.batch_size, config.train_samples)
    assert clients["0"]["steps"] == clients["1"]["steps"] == 3 * per_round
    assert history(out)["rounds"][1]["clients"].get("0", {}).get("upload_bytes", 0) == 0  # it did miss round 2
