"""Secure aggregation (``fedlease deploy --secure_aggregation``): Flower's SecAgg+ sums slot-packed uploads; the
server's aggregation gets one summed vector and the per-group averages derived from it, never a client's upload,
and its aggregate equals the plain example-weighted average within the quantisation error."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_grid import InProcessGrid, run_server
from safetensors.torch import load_file

from conftest import tiny_run_config
from fedlease.cli import main
from fedlease.methods.base import FederatedMethod, Update
from fedlease.runtime.flower import client_app, secure, server_app
from fedlease.runtime.flower.run_config import to_run_config
from fedlease.runtime.simulation import prepare_config, run

pytestmark = pytest.mark.flower

TASKS = ["rotten_tomatoes", "rotten_tomatoes", "snli", "snli"]  # groups: clients {0, 1} and {2, 3}
TOLERANCE = 1e-6  # the stated bound on |secure aggregate - plain weighted average| (measured: about 3e-8)


def config_for(model: str, out: Path, method: str, **overrides):
    values = dict(tasks=TASKS, global_rounds=2, warmup_rounds=1, train_samples=16, test_samples=8, batch_size=8,
                  max_length=16, num_experts=2 if method == "fedlease" else None)
    values.update(overrides)
    return prepare_config(tiny_run_config(model, Path(out).resolve(), method=method, **values))


def record_uploads(monkeypatch) -> dict[tuple[int, int], Update]:
    """Every upload a client computes in this process (round, client) -> its Update: the ground truth."""
    uploads: dict[tuple[int, int], Update] = {}
    original = FederatedMethod.client_update

    def recording(self, client, ins, rnd, store):
        update = original(self, client, ins, rnd, store)
        uploads[(rnd, client.client_id)] = Update({k: v.clone() for k, v in update.state.items()},
                                                  update.num_examples)
        return update

    monkeypatch.setattr(FederatedMethod, "client_update", recording)
    return uploads


def shared_lora(key: str) -> bool:
    """FedIT: the LoRA is averaged over every client of the round (heads by label set, that is by task here)."""
    return key.endswith((".lora_A", ".lora_B"))


def by_task(key: str) -> bool:
    """FedLEASE (clusters {0, 1} and {2, 3}, as the tasks): everything is averaged within a cluster."""
    return False


def check_only_averages_reached_the_server(audit: Path, uploads: dict[tuple[int, int], Update], rnd: int,
                                           members: list[int], everyone=shared_lora) -> float:
    """What the server's aggregation received in round ``rnd`` (0-based): one summed vector, and per client the
    averages of its groups (equal for every member; groups: keys ``everyone`` accepts over ``members``, the rest by
    task);
    each is the weighted average of the true uploads within TOLERANCE and no client's own upload. Returns the
    largest error."""
    with np.load(audit / f"round{rnd + 1}-sum.npz") as summed:
        assert list(summed) == ["sum"] and summed["sum"].ndim == 1
    with np.load(audit / f"round{rnd + 1}-updates.npz") as received:
        received = {key: received[key] for key in received}
    assert sorted({int(key.split("/")[0]) for key in received}) == members
    worst = 0.0
    for name, value in received.items():
        cid, key = int(name.split("/")[0]), name.split("/", 1)[1]
        group = members if everyone(key) else [c for c in members if TASKS[c] == TASKS[cid]]
        weights = [uploads[(rnd, c)].num_examples for c in group]
        expected = sum(uploads[(rnd, c)].state[key].double() * w for c, w in zip(group, weights, strict=True)) \
            / sum(weights)
        worst = max(worst, float((torch.from_numpy(value).double() - expected).abs().max()))
        for other in group:  # the server cannot tell the members of a group apart
            np.testing.assert_array_equal(received[f"{other}/{key}"], value)
        if len(group) > 1:
            own = uploads[(rnd, cid)].state[key].numpy()
            assert not np.allclose(value, own, rtol=0, atol=1e-5), f"client {cid}'s own {key} reached the server"
    assert worst <= TOLERANCE, worst
    return worst


def test_quantisation_keeps_the_sum_below_the_modulus_and_packing_round_trips():
    for n in (3, 4, 7, 8, 100, 1000):
        levels = secure.quantization_range(n)
        assert levels & (levels - 1) == 0 and n * levels < secure.MODULUS <= 2 * n * levels or levels == 2 ** 30
        assert secure.threshold(n) > n / 2
    slots = secure.build_layout({"shared": {"a.lora_A": ((2, 3), "float32")}, "head x": {"head.w": ((2,), "float32")}})
    from flwr.app import ConfigRecord

    record = secure.secure_message({}, slots, {"shared": ("lora_A",), "head x": ("head",)}, 16)[secure.RECORD]
    assert isinstance(record, ConfigRecord)
    update = Update({"a.lora_A": torch.arange(6.0).reshape(2, 3) / 10, "head.w": torch.tensor([0.5, -0.5])}, 8)
    vector = secure.pack(update, record)
    assert vector.size == 6 + 1 + 2 + 1 and vector[slots[1].offset + 6] == 0.5  # weight 8/16 after the LoRA
    averages = secure.unpack(vector, slots)
    torch.testing.assert_close(averages["shared"][0]["a.lora_A"], update.state["a.lora_A"])
    with pytest.raises(Exception, match="outside"):
        secure.pack(Update({**update.state, "head.w": torch.tensor([20.0, 0.0])}, 16), record)


@pytest.mark.parametrize("method", ["fedit", "fedlease"])
def test_the_server_gets_only_sums_and_the_aggregate_is_the_plain_average(tiny_model, tmp_path, monkeypatch,
                                                                         method):
    """In-process grid, the real ClientApp with Flower's secaggplus_mod and Flower's SecAggPlusWorkflow: every
    reply of a secure round carries no array at all (only masked integers), FedLEASE's warmup round is trained in
    the clear, the adaptive round per cluster, and the run ends within TOLERANCE of the in-process runner's."""
    config = config_for(tiny_model, tmp_path / "in-process", method)
    uploads = record_uploads(monkeypatch)
    run(config, progress=False)
    audit = tmp_path / method
    monkeypatch.setenv(secure.AUDIT, str(audit))
    replies = []
    pull = InProcessGrid.pull_messages

    def watched(grid, ids):
        got = list(pull(grid, ids))
        replies.extend(got)
        return got

    monkeypatch.setattr(InProcessGrid, "pull_messages", watched)
    client_app.session_for.cache_clear()
    flower = dataclasses.replace(config, output_dir=str(tmp_path / "secure"))
    grid = InProcessGrid(client_app.app, 4, {**to_run_config(flower), "round-timeout": 120.0,
                                             "secure-aggregation": True})
    run_server(server_app.app, grid)
    secure_rounds = [1] if method == "fedlease" else [0, 1]
    for reply in replies:
        if reply.metadata.group_id in {str(r) for r in secure_rounds} and reply.metadata.message_type == "train" \
                and not reply.has_error():
            assert all(len(record) == 0 for record in reply.content.array_records.values())
    everyone = by_task if method == "fedlease" else shared_lora
    worst = max(check_only_averages_reached_the_server(audit, uploads, rnd, [0, 1, 2, 3], everyone)
                for rnd in secure_rounds)
    print(f"{method}: max abs error of the secure aggregate against the plain average: {worst:.3g}")
    log = (tmp_path / "secure" / "training_log.txt").read_text()
    if method == "fedlease":
        assert "round 1 is trained without secure aggregation: FedLEASE's warmup" in log
        assert json.loads((tmp_path / "secure" / "training_history.json").read_text())["clustering"]["labels"] \
            == [0, 0, 1, 1]
    assert "secure sum of head" in log
    history = json.loads((tmp_path / "secure" / "training_history.json").read_text())
    sent = history["rounds"][-1]["clients"]["0"]["upload_bytes"]
    plain = json.loads((tmp_path / "in-process" / "training_history.json").read_text())
    print(f"{method}: upload per client in the last round: {sent} bytes with SecAgg+, "
          f"{plain['rounds'][-1]['clients']['0']['upload_bytes']} plain")
    # FedIT: round 1's quantisation error (at most TOLERANCE) is carried through round 2's training
    carried = TOLERANCE if len(secure_rounds) == 1 else 100 * TOLERANCE
    for path in sorted((tmp_path / "in-process" / "final").glob("*.safetensors")):
        theirs = load_file(str(tmp_path / "secure" / "final" / path.name))
        for key, value in load_file(str(path)).items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=carried)


def test_a_client_that_drops_after_sharing_its_keys_is_unmasked_out_of_the_sum(tiny_model, tmp_path, monkeypatch):
    """Client 3 fails in round 2 after the key exchange (its masked vector never comes): SecAgg+ rebuilds its
    pairwise masks from the others' shares and the sum is the other three's; snli's head then has one contributor,
    which the log says."""
    config = config_for(tiny_model, tmp_path / "o", "fedit")
    audit = tmp_path / "fedit"
    monkeypatch.setenv(secure.AUDIT, str(audit))
    uploads = record_uploads(monkeypatch)

    def dropping(msg, context):
        if context.node_config["partition-id"] == 3 and msg.metadata.group_id == "1" and secure.RECORD in msg.content:
            raise RuntimeError("the node went away")
        return client_app.app(msg, context)

    client_app.session_for.cache_clear()
    grid = InProcessGrid(dropping, 4, {**to_run_config(config), "round-timeout": 120.0, "secure-aggregation": True})
    run_server(server_app.app, grid)
    check_only_averages_reached_the_server(audit, uploads, 1, [0, 1, 2])
    log = (tmp_path / "o" / "training_log.txt").read_text()
    assert "a node left secure aggregation" in log and "round 2: client 3 did not reply" in log
    assert "over 1 client(s): the server learns that client's own upload" in log


def test_a_training_that_diverges_in_a_secure_round_stops_the_run_with_one_line(tiny_model, tmp_path, monkeypatch):
    """As without secure aggregation: round 1 is recorded (with the evaluations that came with round 2's messages),
    and the run stops naming the round and the client; nothing of round 2 is recorded."""
    from fedlease.train import TrainingDiverged

    original = FederatedMethod.client_train

    def diverging(self, client, ins, rnd, store):
        if client.client_id == 1 and rnd == 1:
            raise TrainingDiverged("client 1 (rotten_tomatoes): the training loss became nan")
        return original(self, client, ins, rnd, store)

    monkeypatch.setattr(FederatedMethod, "client_train", diverging)
    config = config_for(tiny_model, tmp_path / "o", "fedit", global_rounds=3)
    client_app.session_for.cache_clear()
    grid = InProcessGrid(client_app.app, 4, {**to_run_config(config), "round-timeout": 120.0,
                                             "secure-aggregation": True})
    with pytest.raises(TrainingDiverged, match="round 2, client 1 \\(rotten_tomatoes\\): the training loss"):
        run_server(server_app.app, grid)
    out = tmp_path / "o"
    assert "fedlease: error: round 2, client 1" in (out / "training_log.txt").read_text()
    assert (out / "round_summary_1.json").exists() and not (out / "round_summary_2.json").exists()


def test_a_loopback_deployment_with_secure_aggregation_sees_only_sums(tiny_model, tmp_path, monkeypatch):
    """A real SuperLink and four SuperNodes on 127.0.0.1 (each with its fedlease executor), FedLEASE with two
    experts: the warmup in the clear, the adaptive round through SecAgg+ per cluster; what the ServerApp's
    aggregation received (written by the ServerApp process itself) is sums only, and the run ends within
    TOLERANCE of the in-process runner's."""
    from fedlease.runtime.flower.deploy import LoopbackDeployment

    config = config_for(tiny_model, tmp_path / "flower", "fedlease")
    uploads = record_uploads(monkeypatch)
    run(dataclasses.replace(config, output_dir=str(tmp_path / "in-process")), progress=False)
    audit = tmp_path / "fedlease"
    monkeypatch.setenv(secure.AUDIT, str(audit))  # inherited by the SuperLink, hence by its ServerApp process
    with LoopbackDeployment(tmp_path / "work", config.num_clients, log=lambda _: None) as deployment:
        result = deployment.submit(config, round_timeout=240, stream_to=subprocess.PIPE, secure_aggregation=True)
    streamed = result.stdout.decode(errors="replace")
    history = json.loads((tmp_path / "flower" / "training_history.json").read_text())
    assert history["final"] is not None, streamed[-4000:]
    assert history["clustering"]["labels"] == [0, 0, 1, 1]
    worst = check_only_averages_reached_the_server(audit, uploads, 1, [0, 1, 2, 3], by_task)
    print(f"loopback fedlease: max abs error {worst:.3g}; upload per client in the secure round "
          f"{history['rounds'][1]['clients']['0']['upload_bytes']} bytes")
    assert not (audit / "round1-sum.npz").exists()  # the warmup is not a sum: trained in the clear
    for path in sorted((tmp_path / "in-process" / "final").glob("*.safetensors")):
        theirs = load_file(str(tmp_path / "flower" / "final" / path.name))
        for key, value in load_file(str(path)).items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("flags, says", [
    (["--tasks", "rotten_tomatoes:2"], "at least 3 clients a round"),
    (["--tasks", "rotten_tomatoes:4", "--clients_per_round", "2"], "at least 3 clients a round"),
    (["--tasks", "rotten_tomatoes:4", "--sample_rate", "0.5"], "--sample_rate"),
    (["--tasks", "rotten_tomatoes:4", "--method", "ifca"], "cannot run --method ifca"),
    (["--tasks", "rotten_tomatoes:4", "--method", "local"], "cannot run --method local"),
    (["--tasks", "rotten_tomatoes:4", "--dp_clip", "1.0", "--dp_noise", "1.0"], "the server's noise"),
    (["--tasks", "rotten_tomatoes:4", "--dp_clip", "1.0", "--dp_noise", "1.0", "--dp_unit", "record"],
     "--dp_unit record is not supported yet"),
    (["--tasks", "rotten_tomatoes:4", "--max_update_norm", "1.0"], "--update_norm_action clip"),
])
def test_combinations_secure_aggregation_cannot_run_are_one_line(tiny_model, tmp_path, capsys, flags, says):
    code = main(["deploy", "--secure_aggregation", "--model_name", tiny_model, "--output_dir", str(tmp_path / "o"),
                 *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fedlease: error:") and says in err[0], err
    assert not (tmp_path / "o" / "flower").exists()  # nothing was started
