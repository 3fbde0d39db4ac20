"""Malformed client updates are rejected, logged and left out; the run goes on."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import tiny_run_config
from fedlease.methods.base import CHANGE_NORM, Instruction, Update
from fedlease.model.experts import ExpertLayout
from fedlease.runtime.validation import UpdateValidator

PARTS = ("lora_A", "lora_B", "head")


def good(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"l0.q.lora_A": torch.randn(4, 8, generator=g), "l0.q.lora_B": torch.randn(8, 4, generator=g),
            "head.classifier.weight": torch.randn(3, 8, generator=g)}


def round_of(bad: dict[str, torch.Tensor] | None, num_examples: int = 10) -> tuple[dict, dict]:
    updates = {cid: Update(good(cid), 10) for cid in range(4)}
    if bad is not None:
        updates[4] = Update(bad, num_examples)
    instructions = {cid: Instruction(ExpertLayout(), upload=PARTS) for cid in updates}
    return instructions, updates


@pytest.mark.parametrize("name,mutate,reason", [
    ("wrong shape", lambda s: {**s, "l0.q.lora_A": torch.zeros(5, 8)}, "has shape (5, 8)"),
    ("wrong dtype", lambda s: {**s, "l0.q.lora_B": s["l0.q.lora_B"].double()}, "dtype torch.float64"),
    ("nan", lambda s: {**s, "l0.q.lora_B": s["l0.q.lora_B"].index_fill(0, torch.tensor([1]), float("nan"))},
     "non-finite"),
    ("inf", lambda s: {**s, "head.classifier.weight": torch.full((3, 8), float("inf"))}, "non-finite"),
    ("extra key", lambda s: {**s, "l0.q.backdoor": torch.zeros(2)}, "unexpected key l0.q.backdoor"),
    ("missing key", lambda s: {k: v for k, v in s.items() if k != "l0.q.lora_B"}, "missing key l0.q.lora_B"),
    ("not a tensor", lambda s: {**s, "l0.q.lora_A": [[0.0]]}, "is not a tensor"),
])
def test_malformed_updates_are_rejected(name, mutate, reason):
    validator = UpdateValidator()
    instructions, updates = round_of(mutate(good(9)))
    accepted, rejected = validator.filter(instructions, updates)
    assert set(accepted) == {0, 1, 2, 3}
    assert list(rejected) == [4] and reason in rejected[4], rejected


def test_schema_persists_across_rounds():
    validator = UpdateValidator()
    validator.filter(*round_of(None))
    # a later round in which the lone update has another shape: the learnt schema still rejects it
    updates = {0: Update({**good(0), "l0.q.lora_A": torch.zeros(2, 8)}, 10)}
    _, rejected = validator.filter({0: Instruction(ExpertLayout(), upload=PARTS)}, updates)
    assert "has shape (2, 8)" in rejected[0]
    restored = UpdateValidator()
    restored.load_state_dict(json.loads(json.dumps(validator.state_dict())))
    assert restored.schema == validator.schema


def test_the_norm_bound_checks_the_change_each_client_reports_not_the_size_of_its_weights():
    instructions, updates = round_of({key: 1e6 * value for key, value in good(9).items()})
    for update in updates.values():
        update.metrics[CHANGE_NORM] = 1.0  # weights of any size: only the change against the start counts
    updates[4].metrics[CHANGE_NORM] = 150.0
    accepted, _ = UpdateValidator().filter(instructions, updates)
    assert 4 in accepted  # no bound by default
    del updates[0].metrics[CHANGE_NORM]
    accepted, rejected = UpdateValidator(max_norm=100.0).filter(instructions, updates)
    assert set(accepted) == {1, 2, 3}
    assert "change norm 150 exceeds --max_update_norm 100" in rejected[4]
    assert "no measured change norm" in rejected[0]


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_a_client_bounds_the_change_against_what_it_started_from(tiny_clients, action):
    """The change is measured against the client's starting point (its download and the seeded initial values),
    not the weights themselves (their Kaiming-initialised A alone is several times larger); clip scales the change
    down to the bound in its own direction, reject leaves the upload as it is for the server to judge."""
    from fedlease.methods import create_method
    from fedlease.privacy.mechanism import change_norm

    config, clients, infos = tiny_clients
    plain = create_method(dataclasses.replace(config, method="fedit"), infos)
    ins = plain.configure_train(0)[0]
    free = plain.client_update(clients[0], ins, 0, {})
    change = change_norm(free.state, plain.reference, free.state)
    weights = math.sqrt(sum(float(v.double().pow(2).sum()) for v in free.state.values()))
    assert weights > 3 * change > 0
    bound = change / 2
    method = create_method(dataclasses.replace(config, method="fedit", max_update_norm=bound,
                                               update_norm_action=action), infos)
    update = method.client_update(clients[0], ins, 0, {})
    assert update.metrics[CHANGE_NORM] == pytest.approx(change)  # measured before any clipping
    sent = change_norm(update.state, plain.reference, update.state)
    if action == "clip":
        assert sent == pytest.approx(bound, rel=1e-4)
        a, b = (torch.cat([(s[k] - plain.reference[k]).flatten() for k in s]) for s in (update.state, free.state))
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999
    else:
        assert all(torch.equal(update.state[k], free.state[k]) for k in free.state)


def test_a_bound_above_every_change_rejects_nothing_though_the_weights_exceed_it(tiny_model, tmp_path):
    """Each round's change of a tiny-model client is about 0.5, its uploaded weights about 2.3 in norm: a bound
    of 1.5 keeps every update (bounding the weights rejected them all), and the round summaries record each
    client's measured change."""
    from fedlease.runtime.simulation import run

    run(tiny_run_config(tiny_model, tmp_path / "o", method="fedit", max_update_norm=1.5), progress=False)
    history = json.loads((tmp_path / "o" / "training_history.json").read_text())
    for summary in history["rounds"]:
        assert summary["rejected_updates"] == {}
        changes = [client["train"][CHANGE_NORM] for client in summary["clients"].values()]
        assert len(changes) == 4 and all(0 < change < 1.5 for change in changes)


def test_bad_example_count_is_rejected():
    _, rejected = UpdateValidator().filter(*round_of(good(9), num_examples=0))
    assert "example count 0" in rejected[4]


def test_a_run_with_a_poisoned_client_goes_on(tiny_model, tmp_path, monkeypatch):
    """Client 1 sends NaN every round: it is left out of every aggregate, logged, and the run finishes."""
    from fedlease.methods.base import FederatedMethod
    from fedlease.runtime.simulation import run

    original = FederatedMethod.client_train

    def poisoned(self, client, ins, rnd, store):
        update = original(self, client, ins, rnd, store)
        if client.client_id == 1:
            update.state = {k: torch.full_like(v, float("nan")) for k, v in update.state.items()}
        return update

    monkeypatch.setattr(FederatedMethod, "client_train", poisoned)
    result = run(tiny_run_config(tiny_model, tmp_path / "o", method="fedit"), progress=False)
    history = json.loads((result.output_dir / "training_history.json").read_text())
    for summary in history["rounds"]:
        assert "non-finite" in summary["rejected_updates"]["1"]
        assert summary["clients"]["1"]["upload_bytes"] == 0
    assert "rejected the update of client 1" in (result.output_dir / "training_log.txt").read_text()
    weights = torch.cat([v.flatten() for v in json_free_final(result.output_dir)])
    assert torch.isfinite(weights).all()


def json_free_final(out):
    from safetensors.torch import load_file

    return [t for path in (out / "final").glob("*.safetensors") for t in load_file(str(path)).values()]


def test_diverging_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_model, tmp_path, capsys,
                                                                        monkeypatch):
    from fedlease.cli import main
    from fedlease.runtime.checkpoint import read_manifest
    from fedlease.train import LocalClient

    original = LocalClient.fit
    calls = {"n": 0}

    def fit(self, parts, seed, epochs=None):
        calls["n"] += 1
        if calls["n"] == 3:  # round 2, first client: its weights blow up
            with torch.no_grad():
                next(iter(self.adapted.sites.values())).lora_B.fill_(float("inf"))
        return original(self, parts, seed, epochs)

    monkeypatch.setattr(LocalClient, "fit", fit)
    out = tmp_path / "o"
    code = main(["run", "--model_name", tiny_model, "--tasks", "snli:2", "--global_rounds", "4", "--warmup_rounds",
                 "1", "--train_samples", "16", "--test_samples", "8", "--batch_size", "8", "--max_length", "16",
                 "--output_dir", str(out), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("fedlease: error: round 2, client 0 (snli): the training loss became nan"), err
    assert read_manifest(out)["round"] == 0  # round 1's checkpoint: the last good one
    assert (out / "round_summary_1.json").exists() and not (out / "round_summary_2.json").exists()
