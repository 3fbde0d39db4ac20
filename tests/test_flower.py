"""The Flower runtime: same method code, same results as the in-process runner; real deployments on loopback."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import tomllib
import torch
from flower_grid import InProcessGrid, run_server
from safetensors.torch import load_file

from conftest import REPO, tiny_run_config
from fedlease.config import RunConfig
from fedlease.methods.base import Instruction, Update
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.flower import client_app, server_app
from fedlease.runtime.flower.messages import (
    decode_evaluation,
    decode_instruction,
    decode_update,
    encode_evaluation,
    encode_instruction,
    encode_update,
)
from fedlease.runtime.flower.run_config import from_run_config, to_run_config
from fedlease.runtime.loop import Evaluation
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
    assert runtime == {"round-timeout": 3600.0, "wait-nodes-timeout": 120.0, "resume": False}
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
    state = {"a.lora_A": torch.randn(4, 8), "a.experts_B": torch.randn(3, 8, 4), "head.classifier.bias": torch.zeros(3)}
    ins = Instruction(layout, state, train=("lora_A", "router"), upload=("lora_A",), restore=(), keep=("lora_B",),
                      extra={"cluster": 2})
    back, rnd, final = decode_instruction(encode_instruction(ins, 7, final=True))
    assert (rnd, final, back.layout, back.train, back.upload, back.restore, back.keep, back.extra) == \
        (7, True, layout, ins.train, ins.upload, (), ins.keep, {"cluster": 2})
    assert all(torch.equal(back.state[k], v) for k, v in state.items())
    update = Update(state, 123, {"train_loss": 0.5, "cluster": 1})
    pid, got = decode_update(encode_update(update, 4))
    assert pid == 4 and got.num_examples == 123 and got.metrics == update.metrics
    assert all(torch.equal(got.state[k], v) for k, v in state.items())
    pid, evaluation = decode_evaluation(encode_evaluation(Evaluation({"accuracy": 0.75}, (layout, state)), 2))
    assert pid == 2 and evaluation.metrics == {"accuracy": 0.75} and evaluation.final[0] == layout
    assert decode_update(encode_update(Update({}, 5), 0))[1].state == {}


def flower_run(config: RunConfig, fail: dict[int, set[int]] | None = None) -> Path:
    client_app.session_for.cache_clear()
    grid = InProcessGrid(client_app.app, config.num_clients, to_run_config(config), fail)
    run_server(server_app.app, grid)
    return Path(config.output_dir)


@pytest.mark.parametrize("method", ["fedlease", "feddpa", "ifca"])
def test_flower_gives_the_in_process_runners_results(tiny_model, tmp_path, method):
    config = tiny_run_config(tiny_model, tmp_path / "in-process", method=method, tasks=["rotten_tomatoes:2", "snli"],
                             num_clusters=2)
    run(config, progress=False)
    flower = flower_run(dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"],
                                            output_dir=str(tmp_path / "flower")))
    assert_same_results(tmp_path / "in-process", flower)
    assert history(flower)["rounds"][-1]["clients"]["2"]["upload_bytes"] > 0


def test_a_failing_node_is_left_out_and_rejoins(tiny_model, tmp_path):
    config = tiny_run_config(tiny_model, tmp_path / "o", tasks=["rotten_tomatoes:2", "snli"], global_rounds=4,
                             warmup_rounds=1)
    out = flower_run(dataclasses.replace(config, tasks=["rotten_tomatoes", "rotten_tomatoes", "snli"]),
                     fail={1: {2}})
    rounds = history(out)["rounds"]
    assert "1" not in rounds[2]["clients"]  # round 3: client 1 neither trained nor evaluated
    assert set(rounds[3]["clients"]) == {"0", "1", "2"}  # round 4: it is back
    assert rounds[3]["clients"]["1"]["upload_bytes"] > 0
    log = (out / "training_log.txt").read_text()
    assert "round 3: client 1 did not reply" in log
    assert history(out)["final"] is not None


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


def test_a_killed_supernode_is_left_out_and_rejoins(tiny_model, tmp_path):
    from fedlease.runtime.flower.deploy import LoopbackDeployment

    out = tmp_path / "flower"
    config = deployment_config(tiny_model, out, global_rounds=4, method="fedit")
    with LoopbackDeployment(tmp_path / "work", config.num_clients, log=lambda _: None) as deployment:
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(
            proc=deployment.submit(config, round_timeout=40, stream_to=subprocess.PIPE)))
        runner.start()

        def wait_for(path: Path, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not path.exists() and time.monotonic() < deadline and runner.is_alive():
                time.sleep(0.2)
            assert path.exists(), f"{path.name} did not appear"

        wait_for(out / "round_summary_1.json", 240)
        deployment.kill_node(2, signal.SIGKILL)  # during round 2
        wait_for(out / "round_summary_2.json", 300)
        deployment.start_node(2)  # a restarted node: new node id, empty state, same client
        runner.join(timeout=400)
        assert not runner.is_alive(), "the run did not finish"
    rounds = history(out)["rounds"]
    streamed = result["proc"].stdout.decode(errors="replace")
    assert len(rounds) == 4 and history(out)["final"] is not None, streamed[-4000:]
    assert "2" not in rounds[1]["clients"] or rounds[1]["clients"]["2"]["upload_bytes"] == 0
    assert rounds[-1]["clients"]["2"]["upload_bytes"] > 0  # rejoined
    assert "round 2: client 2 did not reply" in (out / "training_log.txt").read_text()
