"""Client-level differential privacy: clipping, noise, accounting, the methods under DP, bad input."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_run_config
from fedlease.cli import main
from fedlease.errors import FedleaseError
from fedlease.methods import METHODS
from fedlease.privacy import expected_contributors
from fedlease.privacy.accounting import Release, calibrate, epsilon
from fedlease.privacy.mechanism import NoisyMean, change_norm, clip_change
from fedlease.runtime.simulation import run

HARNESS = Path(__file__).parent / "kill_harness.py"


# -- the mechanism --------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-3, 1e3), clip=st.floats(1e-3, 10.0), seed=st.integers(0, 2**31))
def test_clipping_bounds_the_change_of_every_upload_and_leaves_a_small_one_alone(scale, clip, seed):
    gen = torch.Generator().manual_seed(seed)
    reference = {"a.lora_A": torch.randn(4, 6, generator=gen), "head.w": torch.randn(3, generator=gen)}
    state = {key: value + scale * torch.randn(value.shape, generator=gen) for key, value in reference.items()}
    state["signature.embedding"] = torch.randn(5, generator=gen)  # no reference: not part of the clipped change
    clipped, norm = clip_change(state, reference, clip)
    assert norm == pytest.approx(change_norm(state, reference, reference))
    # up to the float32 rounding of reference + change (half an ulp per number of the weights' size)
    rounding = 2**-23 * math.sqrt(sum(float(v.double().pow(2).sum()) for v in reference.values()))
    assert change_norm(clipped, reference, reference) <= clip * (1 + 1e-9) + rounding
    assert torch.equal(clipped["signature.embedding"], state["signature.embedding"])
    if norm <= clip:
        assert all(torch.equal(clipped[k], state[k]) for k in state)
    else:  # the direction of the change is kept
        a, b = (torch.cat([(s[k] - reference[k]).flatten() for k in reference]) for s in (clipped, state))
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999


def test_the_noise_of_an_aggregate_has_the_configured_standard_deviation():
    """With no change at all, an aggregate is its reference plus N(0, (sigma x clip / expected)^2) noise: over 200k
    draws the sample standard deviation is within 1.5% of it (its own standard error is 0.16%)."""
    reference = {"x.lora_A": torch.zeros(400, 500)}
    noisy = NoisyMean(clip=0.5, noise=2.0, secret=1234)
    out = noisy.mean([reference] * 3, reference, expected=4.0, name="expert 0")["x.lora_A"].double()
    assert out.std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.015)
    assert abs(out.mean().item()) < 3 * 0.25 / math.sqrt(out.numel())
    again = noisy.mean([reference] * 3, reference, expected=4.0, name="expert 0")["x.lora_A"]
    assert torch.equal(again, out.float())  # the same round and aggregate: the same draw (a resume repeats it)
    noisy.round = 1
    assert not torch.equal(noisy.mean([reference], reference, 4.0, "expert 0")["x.lora_A"], out.float())
    assert not torch.equal(NoisyMean(0.5, 2.0, 99).mean([reference], reference, 4.0, "expert 0")["x.lora_A"],
                           out.float())


def test_an_aggregate_is_the_reference_plus_the_sum_of_changes_over_the_expected_contributors():
    reference = {"w": torch.tensor([1.0, 2.0])}
    states = [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}]
    out = NoisyMean(clip=1.0, noise=0.0, secret=1).mean(states, reference, expected=4.0, name="g")
    assert torch.allclose(out["w"], torch.tensor([1.25, 2.5]))  # (1, 2) / 4 added, not / 2 replied


@pytest.mark.parametrize("state,fragment", [
    ({"w": torch.zeros(2)}, "the upload lacks v"),
    ({"w": torch.zeros(2), "v": torch.zeros(1), "u": torch.zeros(1)}, "the reference lacks u"),
    ({"w": torch.zeros(3), "v": torch.zeros(1)}, r"w has shape \(3,\), the reference \(2,\)"),
])
def test_an_upload_that_does_not_match_its_reference_stops_the_aggregate_instead_of_losing_arrays(state, fragment):
    """The noised mean is formed over the reference's arrays: an array it lacks would silently drop from the
    aggregate, so a mismatch (a node that returned another initial state) is an error that names it."""
    reference = {"w": torch.ones(2), "v": torch.ones(1)}
    ok = {"w": torch.zeros(2), "v": torch.zeros(1)}
    with pytest.raises(FedleaseError, match=fragment):
        NoisyMean(clip=1.0, noise=0.0, secret=1).mean([ok, state], reference, expected=2.0, name="g")


# -- accounting -----------------------------------------------------------------------------------------------

def test_epsilon_is_the_librarys_for_the_same_events_and_grows_with_rounds():
    releases = [Release("round", r, 0.1) for r in range(100)]
    assert epsilon(1.0, releases, 1e-5) == pytest.approx(7.904, abs=1e-3)  # dp-accounting's RDP, the value
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert epsilon(1.0, releases, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    spent = [epsilon(1.0, releases[:n], 1e-5) for n in (1, 10, 50, 100)]
    assert spent == sorted(spent) and spent[0] < spent[-1]
    assert epsilon(1.0, [], 1e-5) == 0.0


def test_calibration_finds_the_noise_that_spends_the_budget():
    plan = [Release("round", r, 0.1) for r in range(100)]
    noise = calibrate(7.904, 1e-5, plan)
    assert noise == pytest.approx(1.0, abs=2e-3)
    assert epsilon(noise, plan, 1e-5) <= 7.904 + 1e-6


def test_expected_contributors_follow_the_sampling_not_the_replies(tiny_model, tmp_path):
    base = tiny_run_config(tiny_model, tmp_path, tasks=["snli"] * 10, dp_clip=1.0, dp_noise=1.0)
    assert expected_contributors(base, range(10)) == 10
    assert expected_contributors(tiny_run_config(tiny_model, tmp_path, tasks=["snli"] * 10, sample_rate=0.3),
                                 [0, 1, 2, 3]) == pytest.approx(1.2)
    held = tiny_run_config(tiny_model, tmp_path, tasks=["snli"] * 10, clients_per_round=4, unseen_clients=2)
    assert expected_contributors(held, range(10)) == pytest.approx(4.0)  # 4 of the 8 that train


# -- the methods under DP -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fedlease", "fedlease:paper", "fedit", "ffa_lora", "fedsa_lora", "feddpa",
                                    "ifca"])
def test_every_method_aggregates_clipped_changes_against_what_its_clients_started_from(tiny_model, tmp_path,
                                                                                      monkeypatch, method):
    """Every aggregate the server forms under DP sees, from every contributor, a change of norm at most the clip
    against the reference the server uses: if the server's reference were not what the client started from, the
    changes would be the size of the weights. The run records its privacy as the accountant computes it."""
    name, _, allocation = method.partition(":")
    seen: list[float] = []
    original = NoisyMean.mean

    def checked(self, states, reference, expected, label):
        assert expected > 0
        seen.extend(change_norm(s, reference, reference) for s in states)
        return original(self, states, reference, expected, label)

    monkeypatch.setattr(NoisyMean, "mean", checked)
    config = tiny_run_config(tiny_model, tmp_path / "run", method=name, global_rounds=4, warmup_rounds=2,
                             dp_clip=0.05, dp_noise=0.3, sample_rate=0.8, num_experts=2 if name == "fedlease" else None,
                             allocation=allocation or "embedding", num_clusters=2 if name == "ifca" else 4)
    run(config, progress=False)
    assert seen and max(seen) <= 0.05 * (1 + 1e-4), max(seen)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    privacy = history["privacy"]
    plan = METHODS[name].privacy_plan(config)
    assert privacy["epsilon"] == pytest.approx(epsilon(0.3, plan, privacy["delta"]))
    assert privacy["noise_multiplier"] == 0.3 and privacy["clip"] == 0.05 and privacy["sample_rate"] == 0.8
    assert privacy["rounds"] == sum(r.kind == "round" for r in plan)
    log = (tmp_path / "run" / "training_log.txt").read_text()
    assert log.count("privacy spent epsilon") == 4


def record_noisy_means(monkeypatch) -> list[tuple[int, str, int, float]]:
    """Record every DP aggregate the server forms: (round, name, contributors, expected contributors)."""
    calls: list[tuple[int, str, int, float]] = []
    original = NoisyMean.mean

    def spy(self, states, reference, expected, label):
        calls.append((self.round, label, len(states), expected))
        return original(self, states, reference, expected, label)

    monkeypatch.setattr(NoisyMean, "mean", spy)
    return calls


def test_a_fedlease_expert_counts_the_clients_still_to_join_it_by_their_chance(tiny_model, tmp_path, monkeypatch):
    """In an open federation most clients are placed after the allocation, when first sampled. An expert's
    divisor is fixed before the round: its members, plus each client not placed yet by the share of the placed
    clients of its label set that hold the expert; so the divisors of a round add up to the sample rate times the
    trainable clients, as FedIT's one divisor does. Counting only the members (this round's newcomers included)
    divided a sum that holds every sampled newcomer's change by far fewer than contributed."""
    from fedlease.methods.fedlease import FedLease

    calls = record_noisy_means(monkeypatch)
    sizes: list[tuple[dict, dict]] = []
    original_sizes = FedLease.group_sizes

    def sizes_spy(self, placed):
        out = original_sizes(self, placed)
        sizes.append((dict(placed), dict(out)))
        return out

    monkeypatch.setattr(FedLease, "group_sizes", sizes_spy)
    config = tiny_run_config(tiny_model, tmp_path / "run", tasks=["rotten_tomatoes:5", "snli:5"], global_rounds=5,
                             warmup_rounds=1, num_experts=2, dp_clip=0.05, dp_noise=0.3, sample_rate=0.4,
                             train_samples=16, local_epochs=1)
    run(config, progress=False)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert len(history["clustering"]["clients"]) < 10  # some clients were placed after the allocation
    assert any(len(placed) < 10 for placed, _ in sizes)
    for placed, size in sizes:
        experts = {k: v for k, v in size.items() if isinstance(k, int)}
        assert sum(experts.values()) == pytest.approx(10)  # every trainable client once, by its chances
        for k, members in experts.items():
            assert members >= sum(1 for c in placed.values() if c == k)
        heads = {k: v for k, v in size.items() if isinstance(k, str)}
        for k in experts:  # an expert's head groups (one per label set) split its clients
            assert sum(v for key, v in heads.items() if key.startswith(f"{k}/")) == pytest.approx(experts[k])
    divisors: dict[int, dict[str, float]] = {}
    for rnd, label, _, expected in calls:
        divisors.setdefault(rnd, {})[label] = expected
    adaptive = [labels for rnd, labels in divisors.items() if rnd >= 1]
    assert adaptive
    for labels in adaptive:
        experts = [v for label, v in labels.items() if label.startswith("expert")]
        if len(experts) == 2:  # both experts had a member sampled
            assert sum(experts) == pytest.approx(0.4 * 10)


def test_a_fedlease_client_noises_its_signature_and_with_the_paper_allocation_its_warmup_upload(tiny_model,
                                                                                              tiny_clients):
    """Under DP the data signature is a release of one client: noised once on the client and kept. With the
    paper's allocation each warmup upload is one too (the allocation compares each client's own B): clipped and
    noised on the client. With the embedding allocation a warmup upload is clipped only: the server releases it
    only inside the experts' noised starting means (the next test)."""
    from fedlease.methods.fedlease import SIGNATURE, FedLease

    config, clients, infos = tiny_clients
    dp = {**config.to_dict(), "dp_clip": 0.1, "dp_noise": 1.0}

    def upload(method, secret):
        ins = method.configure_train(0, [0])[0]
        store = {"privacy.secret": torch.tensor(secret)}
        return method.client_update(clients[0], ins, 0, store), store

    private = FedLease(config.__class__(**dp), infos)
    first, store = upload(private, 5)
    second, _ = upload(private, 7)
    keys = [k for k in first.state if k != SIGNATURE]
    assert change_norm(first.state, second.state, keys) == 0  # clipped, not noised: the same data, the same upload
    assert change_norm(first.state, private.reference, keys) <= 0.1 * (1 + 1e-4)
    assert torch.equal(first.state[SIGNATURE], store[SIGNATURE])
    assert not torch.equal(first.state[SIGNATURE], second.state[SIGNATURE])  # each client's own noise
    plain = FedLease(config, infos).client_update(clients[0], FedLease(config, infos).configure_train(0, [0])[0], 0,
                                                  {})
    assert (first.state[SIGNATURE] - plain.state[SIGNATURE]).norm() > 1.0  # sigma 1 over its numbers
    assert first.num_examples == 1  # no example count leaves a DP client, nor a step count or a duration
    assert not {"examples", "steps", "seconds"} & set(first.metrics) and "train_loss" in first.metrics
    paper = FedLease(config.__class__(**{**dp, "allocation": "paper"}), infos)
    first, _ = upload(paper, 5)
    second, _ = upload(paper, 7)
    assert SIGNATURE not in first.state
    assert change_norm(first.state, second.state, list(first.state)) > 0.1  # the noise (sd 0.1 per number)


def test_with_the_embedding_allocation_the_experts_start_from_a_noised_mean_of_the_clipped_warmup_uploads(
        tiny_model, tmp_path, monkeypatch):
    """The server keeps the clients' clipped warmup uploads and releases them only as each expert's and head's
    starting mean, noised at noise x clip on the sum over its members and divided by their number: one release,
    charged once, in which a client takes part if it was sampled in any warmup round."""
    from fedlease.methods.fedlease import FedLease

    calls = record_noisy_means(monkeypatch)
    config = tiny_run_config(tiny_model, tmp_path / "run", tasks=["rotten_tomatoes:3", "snli:3"], global_rounds=3,
                             warmup_rounds=2, num_experts=2, dp_clip=0.05, dp_noise=0.5, sample_rate=0.5,
                             train_samples=16, local_epochs=1)
    run(config, progress=False)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    warmed = history["clustering"]["clients"] or list(range(6))
    starts = [(label, n, expected) for rnd, label, n, expected in calls if label.startswith("warmup ")]
    assert {rnd for rnd, label, _, _ in calls if label.startswith("warmup ")} == {1}  # released after the warmup
    experts = [c for c in starts if c[0].startswith("warmup expert")]
    assert len(experts) == history["clustering"]["num_clusters"] == 2
    assert sum(n for _, n, _ in experts) == len(warmed)  # every client that warmed up, in one expert
    assert all(expected == n for _, n, expected in starts)  # divided by the members that are in it
    heads = [c for c in starts if c[0].startswith("warmup head")]
    assert sum(n for _, n, _ in heads) == len(warmed)
    privacy = history["privacy"]
    assert privacy["releases"] == {"signature": 1, "warmup": 1, "round": 1}
    plan = FedLease.privacy_plan(config)
    assert [(r.kind, r.round, r.sample_rate) for r in plan] == [("signature", 0, 1.0), ("warmup", 1, 0.75),
                                                                  ("round", 2, 0.5)]
    assert privacy["epsilon"] == pytest.approx(epsilon(0.5, plan, privacy["delta"]))
    paper = FedLease.privacy_plan(tiny_run_config(tiny_model, tmp_path, allocation="paper", global_rounds=3,
                                                  warmup_rounds=2, dp_clip=0.05, dp_noise=0.5, sample_rate=0.5))
    assert [(r.kind, r.round, r.sample_rate) for r in paper] == [("warmup", 0, 0.5), ("warmup", 1, 0.5),
                                                                   ("round", 2, 0.5)]


def test_a_dp_run_resumes_with_the_same_accounting(tiny_model, tmp_path):
    args = ["run", "--model_name", tiny_model, "--tasks", "rotten_tomatoes:2", "snli:2", "--method", "fedit",
            "--global_rounds", "3", "--warmup_rounds", "1", "--train_samples", "16", "--test_samples", "8",
            "--batch_size", "8", "--max_length", "24", "--dp_clip", "0.1", "--dp_noise", "0.8", "--sample_rate",
            "0.9", "--no_progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--output_dir", str(whole)]) == 0
    proc = subprocess.run([sys.executable, str(HARNESS), "round:2", *args, "--output_dir", str(cut)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert main(["run", "--resume", str(cut), "--no_progress"]) == 0
    a, b = (json.loads((p / "training_history.json").read_text())["privacy"] for p in (whole, cut))
    assert a == b and a["rounds"] == 3


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (["--dp_clip", "0", "--dp_noise", "1"], "--dp_clip must be a positive number"),
    (["--dp_clip", "1", "--dp_noise", "-1"], "--dp_noise must be a positive number"),
    (["--dp_clip", "1", "--dp_epsilon", "0", "--dp_delta", "1e-5"], "--dp_epsilon must be a positive number"),
    (["--dp_clip", "1", "--dp_epsilon", "4", "--dp_noise", "1", "--dp_delta", "1e-5"], "pass one of them"),
    (["--dp_clip", "1", "--dp_noise", "1", "--dp_delta", "0.3"], "at least 1/4 clients"),
    (["--dp_clip", "1", "--dp_epsilon", "4"], "--dp_epsilon needs --dp_delta"),
    (["--dp_clip", "1"], "needs --dp_noise"),
    (["--dp_noise", "1"], "without --dp_clip"),
    (["--dp_clip", "1", "--dp_noise", "1", "--method", "local"], "nothing to protect"),
    (["--dp_clip", "1", "--dp_noise", "1", "--max_update_norm", "1"], "--max_update_norm with --dp_clip"),
])
def test_bad_privacy_settings_are_one_line_exit_2_and_nothing_written(capsys, tmp_path, flags, fragment):
    out = tmp_path / "out"
    code = main(["run", "--tasks", "snli:4", "--output_dir", str(out), "--no_progress", "--global_rounds", "2",
                 "--warmup_rounds", "1", "--train_samples", "8", "--test_samples", "4", *flags])  # short if not refused
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fedlease: error: ") and fragment in err[-1], err
    assert not out.exists()



def test_under_client_dp_the_cohort_is_drawn_from_the_servers_secret_not_the_public_seed(tiny_model, tmp_path,
                                                                                         monkeypatch):
    """Amplification by sampling assumes nobody outside the server knows who was sampled: whoever knows the run's
    settings knows --seed, so a DP run draws its cohorts from the server's secret (kept in its checkpoint)."""
    import secrets

    from fedlease.runtime.participation import Participation

    monkeypatch.setattr(secrets, "randbits", lambda bits: 987654321)
    config = tiny_run_config(tiny_model, tmp_path / "run", method="fedit", tasks=["snli"] * 8, global_rounds=4,
                             warmup_rounds=1, dp_clip=0.05, dp_noise=0.3, sample_rate=0.5, train_samples=8,
                             test_samples=4)
    run(config, progress=False)
    rounds = json.loads((tmp_path / "run" / "training_history.json").read_text())["rounds"]
    trained = [sorted(int(cid) for cid, c in r["clients"].items() if c.get("upload_bytes")) for r in rounds]
    sampler = Participation(config)
    assert trained == [sampler.cohort(rnd, secret=987654321) for rnd in range(4)]
    assert trained != [sampler.cohort(rnd) for rnd in range(4)]  # the public seed's draw
