"""A client's own state: staged until the server accepts the update, versioned, checked, kept where it survives."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedlease.runtime.client_state import INDEX, ClientState, ClientStateError, FolderBackend, MemoryBackend, Owner

OWNER = Owner("run-a", 3)


def store(value: float) -> dict[str, torch.Tensor]:
    return {"x.lora_B": torch.full((2, 3), value), "head.w": torch.tensor([value, -value])}


def assert_store(got, value: float) -> None:
    assert got is not None and got.keys() == store(value).keys()
    for key, tensor in store(value).items():
        assert torch.equal(got[key], tensor)


def train(state: ClientState, rnd: int, accepted: int, value: float) -> None:
    """What a node does for a train message: work from the accepted version, stage what training produced."""
    assert state.current(accepted) is not None
    state.stage(rnd, store(value))


def test_a_staged_store_becomes_current_only_once_its_update_is_accepted():
    state = ClientState(MemoryBackend(), OWNER)
    assert state.current(-1) == {}
    train(state, 0, -1, 1.0)
    assert_store(state.current(0), 1.0)  # accepted: round 0's store is current
    train(state, 1, 0, 2.0)
    assert_store(state.current(0), 1.0)  # round 1's update was rejected or timed out: its store is dropped
    train(state, 2, 0, 3.0)
    assert_store(state.current(2), 3.0)


def test_a_server_resumed_from_the_previous_checkpoint_gets_the_previous_version():
    state = ClientState(MemoryBackend(), OWNER)
    train(state, 0, -1, 1.0)
    train(state, 1, 0, 2.0)
    train(state, 4, 1, 5.0)  # the client missed rounds 2 and 3
    assert_store(state.current(4), 5.0)  # round 4 accepted and committed, then the server stops before its checkpoint
    assert_store(state.current(1), 2.0)  # resumed from round 3's checkpoint, which last accepted round 1
    assert state.current(4) is None  # the dropped later version is gone for good
    assert state.current(-1) == {}  # a fresh start of the same run: the empty store


def test_only_the_accepted_version_and_the_one_before_are_kept():
    backend = MemoryBackend()
    state = ClientState(backend, OWNER)
    for rnd in range(5):
        train(state, rnd, rnd - 1, float(rnd))
    state.current(4)
    assert sorted(n for n in backend.names() if n != INDEX) == ["round-3.safetensors", "round-4.safetensors"]
    assert state.current(2) is None


def test_the_folder_state_survives_the_process_and_is_checked(tmp_path):
    folder = tmp_path / "node"
    train(ClientState(FolderBackend(folder), OWNER), 0, -1, 1.0)
    again = ClientState(FolderBackend(folder), OWNER)  # a restarted node
    assert_store(again.current(0), 1.0)
    (folder / "round-0.safetensors").write_bytes((folder / "round-0.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ClientStateError, match="checksum mismatch"):
        ClientState(FolderBackend(folder), OWNER).current(0)


def test_a_crash_between_a_blob_and_its_index_leaves_the_previous_state(tmp_path):
    folder = tmp_path / "node"
    state = ClientState(FolderBackend(folder), OWNER)
    train(state, 0, -1, 1.0)
    state.current(0)
    (folder / "round-1.safetensors").write_bytes(b"half a blob")  # written, but the index never named it
    again = ClientState(FolderBackend(folder), OWNER)
    assert_store(again.current(0), 1.0)
    assert not (folder / "round-1.safetensors").exists()


def test_another_runs_or_clients_state_is_refused(tmp_path):
    folder = tmp_path / "node"
    train(ClientState(FolderBackend(folder), OWNER), 0, -1, 1.0)
    with pytest.raises(ClientStateError, match="holds the state of client 3 of run run-a, not of client 3 of run b"):
        ClientState(FolderBackend(folder), Owner("b", 3))
    with pytest.raises(ClientStateError, match="not of client 4"):
        ClientState(FolderBackend(folder), Owner("run-a", 4))
    (folder / INDEX).write_text(json.dumps({"format": 1}))
    with pytest.raises(ClientStateError, match="damaged"):
        ClientState(FolderBackend(folder), OWNER)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ClientStateError, match="not writable"):
        FolderBackend(locked / "node")


def test_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ClientStateError, match="not writable"):
        FolderBackend(tmp_path / "file")


def test_what_a_client_spent_is_not_rolled_back_past_a_round_it_will_not_train_again():
    """The privacy.* keys (its noise's secret, its DP-SGD steps) of a version the server never used pass to the
    store of a later round's training: that upload left the client all the same. A round trained again (a server
    resumed from before it) starts as it did the first time: same model, same draws, same release."""
    state = ClientState(MemoryBackend(), OWNER)

    def spent(value: float, steps: int) -> dict[str, torch.Tensor]:
        return {**store(value), "privacy.secret": torch.tensor(77), "privacy.record.steps": torch.tensor(steps)}

    state.current(-1, 0)
    state.stage(0, spent(1.0, 4))
    assert int(state.current(0, 1)["privacy.record.steps"]) == 4
    state.stage(1, spent(2.0, 8))  # round 1's reply missed the round
    got = state.current(0, 2)
    assert torch.equal(got["x.lora_B"], store(1.0)["x.lora_B"])  # the model state is round 0's
    assert int(got["privacy.record.steps"]) == 8 and int(got["privacy.secret"]) == 77  # what it spent is not
    state.stage(2, spent(3.0, 12))
    state.current(2, 3)
    assert int(state.current(0, 1)["privacy.record.steps"]) == 4  # a server resumed to train round 1 again
    state.stage(1, spent(2.0, 8))
    state.current(1, 2)
    state.stage(2, spent(3.0, 12))
    state.current(2, 3)
    assert int(state.current(1, 3)["privacy.record.steps"]) == 12  # resumed to round 3: round 2's release stands
    assert "privacy.secret" not in ClientState(MemoryBackend(), OWNER).current(-1, 0)
    fresh = []
    for _ in range(3):  # round 0's only update dropped, then: round 0 again, round 1, an evaluation
        fresh.append(ClientState(MemoryBackend(), OWNER))
        fresh[-1].current(-1, 0)
        fresh[-1].stage(0, spent(1.0, 4))
    assert fresh[0].current(-1, 0) == {} and fresh[2].current(-1) == {}
    assert {k: int(v) for k, v in fresh[1].current(-1, 1).items()} == {"privacy.secret": 77, "privacy.record.steps": 4}
