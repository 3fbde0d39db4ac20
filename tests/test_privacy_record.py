"""Record-level differential privacy (--dp_unit record): DP-SGD on every client, per-client accounting, bad input."""

from __future__ import annotations

import json
import math
import os
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
from safetensors.torch import load_file

from conftest import tiny_instruction_config, tiny_run_config
from fedlease.cli import main
from fedlease.config import RunConfig
from fedlease.errors import ConfigError, FedleaseError
from fedlease.model.experts import ExpertLayout, ExpertLinear
from fedlease.privacy import per_example, record_level
from fedlease.privacy.record import (
    DPSGD,
    NOISE,
    STEPS,
    calibrated_noise,
    per_sample_gradients,
    planned_steps,
    release,
    sample_rate,
    spent,
)
from fedlease.runtime.simulation import run
from fedlease.train import LocalClient

HARNESS = Path(__file__).parent / "kill_harness.py"


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


# -- per-example gradients ------------------------------------------------------------------------------------

def test_micro_batched_gradients_equal_torch_funcs_per_example_gradients():
    """The micro-batched gradients equal torch.func's vmap of grad (an independent route) to 1e-6."""
    model = small_model()
    x, y = torch.randn(9, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2] * 3)
    params = list(model.parameters())

    def loss_of(rows):
        return torch.nn.functional.cross_entropy(model(x[rows]), y[rows])

    per_sample_gradients(loss_of, torch.arange(9), params)
    names = [name for name, _ in model.named_parameters()]

    def one(p, xi, yi):
        out = torch.func.functional_call(model, dict(zip(names, p, strict=True)), (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    reference = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(tuple(params), x, y)
    for param, expected in zip(params, reference, strict=True):
        assert param.grad_sample.shape == (9, *param.shape)
        assert torch.allclose(param.grad_sample, expected, atol=1e-6, rtol=0)


def test_micro_batched_gradients_of_a_lora_client_sum_to_the_batched_gradient(tiny_clients):
    """On the tiny LoRA encoder (dropout off), each example's own gradient, averaged, is the gradient of the
    padded batch's mean loss: micro-batching (each row trimmed to its own length) loses nothing."""
    _, clients, _ = tiny_clients
    client: LocalClient = clients[2]  # snli: a sentence pair
    client.apply(client.adapted.layout, client.adapted.initial_state(3))
    params = client.adapted.set_trainable(("lora_A", "lora_B", "head"))
    with torch.no_grad():  # B = 0 at init: give every LoRA weight a value, so every gradient is non-zero
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    client.adapted.model.eval()
    index = torch.arange(6)
    try:
        losses = per_sample_gradients(lambda rows: client.batch_loss(client.train_data, rows), index, params)
        batched = torch.autograd.grad(client.batch_loss(client.train_data, index), params)
        assert losses.shape == (6,)
        for param, grad in zip(params, batched, strict=True):
            assert torch.allclose(param.grad_sample.mean(0), grad, atol=1e-6, rtol=1e-4)
        assert sum(float(p.grad_sample.abs().sum()) for p in params) > 0
    finally:
        for p in params:
            p.requires_grad_(False)
            del p.grad_sample


# -- every example's gradient in one pass (Opacus' hooks, the expert layer's grad sampler) -------------------------

LAYOUTS = {"plain LoRA": ExpertLayout(), "adaptive": ExpertLayout(3, 1, "adaptive"),
           "top-2": ExpertLayout(3, 2, "topk", top_k=2), "fixed": ExpertLayout(3, 0, "fixed")}


def clients_of(config: RunConfig) -> list[LocalClient]:
    from fedlease.runtime.simulation import build_clients, load_partition, prepare_config

    config = prepare_config(config)
    _, splits = load_partition(config)
    return build_clients(config, splits)[1]


def randomised(client: LocalClient, layout: ExpertLayout, parts=("lora_A", "lora_B", "router", "head")) -> list:
    """``client`` arranged as ``layout`` with every LoRA, bank and router weight random (B = 0 at init gives
    zero gradients), its dropout off but in training mode (Opacus records only then); its trainable params."""
    client.adapted.configure(layout)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for tensor in client.adapted.tensors(("lora_A", "lora_B", "router", "experts")).values():
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
    if layout.routing == "fixed":
        client.adapted.set_mixture(torch.tensor([0.5, 0.3, 0.2]))
    for module in client.adapted.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    client.adapted.model.train()
    return client.adapted.set_trainable(parts)


def assert_one_pass_equals_one_example_at_a_time(client: LocalClient, params: list, index: torch.Tensor,
                                                 parts: list[torch.Tensor]) -> None:
    data = client.train_data
    try:
        reference_losses = per_sample_gradients(lambda rows: client.batch_loss(data, rows), index, params)
        reference = [p.grad_sample.clone() for p in params]
        release(params)
        with per_example.hooks(client.adapted.model):
            losses = per_example.gradients(lambda rows: client.example_losses(data, rows), parts, params)
            for param, expected in zip(params, reference, strict=True):
                assert param.grad_sample.shape == expected.shape
                assert torch.allclose(param.grad_sample, expected, atol=1e-5, rtol=1e-4), param.shape
        assert torch.allclose(losses, reference_losses, atol=1e-5)
        assert all(float(g.abs().sum()) > 0 for g in reference)  # every parameter's gradient was checked
        assert all(not hasattr(p, "grad_sample") for p in client.adapted.model.parameters())  # hooks removed
        assert not hasattr(client.adapted.model, "autograd_grad_sample_hooks")
    finally:
        release(params)
        for p in params:
            p.requires_grad_(False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("task", ["rotten_tomatoes", "snli"])
def test_per_example_gradients_in_one_pass_are_those_of_one_example_at_a_time(tiny_model, tmp_path, layout, task):
    """Every routing, one text or a separately encoded pair (two encoder rows an example, folded), one batch or
    the same rows in two parts (--max_batch_tokens): each example's gradient of every trainable weight (the own
    expert's A and B, the router, the head) is the one its own forward and backward give."""
    config = tiny_run_config(tiny_model, tmp_path, tasks=[task], lora_dropout=0.0, pair_encoding="separate")
    client = clients_of(config)[0]
    params = randomised(client, LAYOUTS[layout])
    index = torch.tensor([5, 0, 3, 7, 2])
    assert_one_pass_equals_one_example_at_a_time(client, params, index, [index])
    params = randomised(client, LAYOUTS[layout])
    assert_one_pass_equals_one_example_at_a_time(client, params, index, [index[:2], index[2:]])


@pytest.mark.parametrize("layout", ["plain LoRA", "adaptive"])
def test_per_example_gradients_of_a_decoder_are_each_rows_mean_over_its_response_tokens(tiny_causal_lm, tmp_path,
                                                                                         layout):
    config = tiny_instruction_config(tiny_causal_lm, tmp_path, lora_dropout=0.0, train_samples=6)
    client = clients_of(config)[0]
    params = randomised(client, LAYOUTS[layout], parts=("lora_A", "lora_B", "router"))
    index = torch.tensor([4, 1, 0, 5])
    assert_one_pass_equals_one_example_at_a_time(client, params, index, [index])


def test_per_example_router_gradients_under_bf16_autocast_follow_the_forwards_choice_of_experts(tiny_model,
                                                                                                 tmp_path):
    """As DP-SGD trains in bf16 (the forward under autocast, the backward outside it), the forward picks each
    token's top-2 experts from bf16 logits; the examples' router gradients must be that routing's, so their sum
    is the batched gradient of the same pass to bf16's precision. Small router weights make near-ties, for which
    logits recomputed in fp32 pick other experts (10-15% off on two layers of this model)."""
    config = tiny_run_config(tiny_model, tmp_path, tasks=["rotten_tomatoes"], lora_dropout=0.0, train_samples=48)
    client = clients_of(config)[0]
    params = randomised(client, LAYOUTS["top-2"], parts=("router",))
    with torch.no_grad():
        for param in params:
            param.mul_(0.02)
    try:
        with per_example.hooks(client.adapted.model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = client.example_losses(client.train_data, torch.arange(48))
            losses.sum().backward()
            for param in params:
                error = float((param.grad_sample.sum(0) - param.grad).norm() / param.grad.norm())
                assert error < 0.04, (param.shape, error)
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)


def test_hooks_leave_the_model_as_it_was_when_opacus_refuses_a_layer(tiny_model, tmp_path):
    """A trainable layer Opacus cannot handle (one holding a buffer, no grad sampler) stops the hooks while they
    are attached: no hook, no kept input is left behind, and the next DP-SGD call attaches its hooks again."""
    config = tiny_run_config(tiny_model, tmp_path, tasks=["rotten_tomatoes"], lora_dropout=0.0)
    client = clients_of(config)[0]
    params = randomised(client, LAYOUTS["adaptive"], parts=("lora_A", "lora_B"))
    model = client.adapted.model
    odd = torch.nn.Module()
    odd.weight = torch.nn.Parameter(torch.zeros(2))
    odd.register_buffer("count", torch.zeros(1))
    model.add_module("odd", odd)
    try:
        with pytest.raises(NotImplementedError), per_example.hooks(model):
            pass
        assert not hasattr(model, "autograd_grad_sample_hooks")
        experts = [m for m in model.modules() if isinstance(m, ExpertLinear)]
        assert experts and all(layer.dp_inputs is None for layer in experts)
        client.example_losses(client.train_data, torch.arange(3)).sum().backward()  # a plain step keeps nothing
        assert all(layer.dp_inputs is None for layer in experts)
        del model.odd
        for p in params:
            p.grad = None
        with per_example.hooks(model):
            per_example.gradients(lambda rows: client.example_losses(client.train_data, rows), [torch.arange(3)],
                                  params)
            assert all(p.grad_sample.shape[0] == 3 for p in params)
        assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())
    finally:
        if hasattr(model, "odd"):
            del model.odd
        for p in params:
            p.grad = None
            p.requires_grad_(False)


def test_a_parameter_that_gets_a_gradient_but_no_per_example_gradient_is_refused(tiny_model, tmp_path):
    """A parameter made trainable after the hooks were attached would get a batched gradient and no per-example
    one: DP-SGD stops rather than give it zeros (a noise-only update that never learns)."""
    config = tiny_run_config(tiny_model, tmp_path, tasks=["rotten_tomatoes"], lora_dropout=0.0)
    client = clients_of(config)[0]
    params = randomised(client, LAYOUTS["plain LoRA"], parts=("lora_A", "lora_B"))
    head = [p for name, p in client.adapted.model.named_parameters() if name.startswith("classifier")]
    assert head and not any(p.requires_grad for p in head)
    try:
        with per_example.hooks(client.adapted.model):
            for p in head:
                p.requires_grad_(True)
            with pytest.raises(FedleaseError, match="no per-example gradient"):
                per_example.gradients(lambda rows: client.example_losses(client.train_data, rows),
                                      [torch.arange(4)], params + head)
        assert all(p.grad is None for p in params + head)  # the hooks' exit drops what the failed step left
    finally:
        for p in params + head:
            p.grad = None
            p.requires_grad_(False)


@given(st.lists(st.integers(1, 128), min_size=0, max_size=40), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_a_poisson_batch_is_computed_in_parts_of_similar_lengths(lengths, seed):
    lengths = torch.tensor(lengths, dtype=torch.long)
    index = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))[: len(lengths) // 2 + 1]
    index = index[: len(lengths)]
    parts = per_example.length_parts(index, lengths)
    assert sorted(torch.cat(parts).tolist() if parts else []) == sorted(index.tolist())  # every row once
    for part in parts:
        assert lengths[part].max() <= per_example.SPREAD * lengths[part].min()
    for longer, shorter in zip(parts, parts[1:], strict=False):  # cut only where needed
        assert lengths[shorter[0]] * per_example.SPREAD < lengths[longer[0]]


def test_per_example_gradients_use_the_dropout_the_forward_drew(tiny_model, tmp_path):
    """With LoRA dropout on, each example's gradient must use its own forward's dropped-out input: their sum is
    the gradient of the summed loss from the same pass (a grad sampler that used the undropped input would not)."""
    config = tiny_run_config(tiny_model, tmp_path, tasks=["rotten_tomatoes"], lora_dropout=0.5)
    client = clients_of(config)[0]
    params = randomised(client, LAYOUTS["adaptive"])
    for layer in client.adapted.sites.values():
        layer.dropout.p = 0.5  # randomised switched every dropout off
    try:
        with per_example.hooks(client.adapted.model):
            client.example_losses(client.train_data, torch.arange(6)).sum().backward()
            for param in params:
                assert torch.allclose(param.grad_sample.sum(0), param.grad, atol=1e-5, rtol=1e-4), param.shape
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)


# -- the DP step (Opacus' DPOptimizer around AdamW or SGD) ---------------------------------------------------------

def dp_step(params, grad_samples, noise, clip, expected, seed=0, optimizer=None):
    """One DPOptimizer step on given per-example gradients; returns the gradient it handed the wrapped optimizer."""
    optimizer = optimizer or torch.optim.SGD(params, lr=0.0)
    dp = DPSGD(noise=noise, clip=clip, rate=0.5, secret=seed).optimizer(optimizer, expected, torch.device("cpu"))
    for param, sample in zip(params, grad_samples, strict=True):
        param.grad_sample = sample
    dp.step()
    grads = [p.grad.clone() for p in params]
    dp.zero_grad(set_to_none=True)
    return grads


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), clip=st.floats(1e-3, 10.0), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**20))
def test_every_per_example_gradient_the_optimizer_accumulates_has_norm_at_most_the_clip(batch, clip, scale, seed):
    """With no noise, the step on one example at a time is that example's clipped gradient (norm <= clip over all
    parameters together, its direction kept); the step on the batch is their sum over the expected batch size."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    samples = [scale * torch.randn(batch, *p.shape, generator=gen) for p in params]
    clipped = []
    for i in range(batch):
        one = dp_step(params, [s[i:i + 1] for s in samples], noise=0.0, clip=clip, expected=1)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in one))
        raw = math.sqrt(sum(float(s[i].double().pow(2).sum()) for s in samples))
        assert norm <= clip * (1 + 1e-5)
        # Opacus scales by clip / (norm + 1e-6): an absolute shortfall of at most 1e-6 in the norm
        assert norm == pytest.approx(min(raw, clip), rel=1e-5, abs=1.1e-6)
        clipped.append(one)
    whole = dp_step(params, samples, noise=0.0, clip=clip, expected=4)
    for k, grad in enumerate(whole):
        assert torch.allclose(grad, sum(c[k] for c in clipped) / 4, rtol=1e-5, atol=1e-7 * clip)


def test_without_noise_and_with_a_huge_clip_a_dp_step_is_the_summed_gradient_over_the_expected_batch():
    model = small_model(2)
    x, y = torch.randn(5, 5, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 0, 1])
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    per_sample_gradients(lambda r: torch.nn.functional.cross_entropy(model(x[r]), y[r]), torch.arange(5), params)
    samples = [p.grad_sample for p in params]
    summed = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"), params)
    grads = dp_step(params, samples, noise=0.0, clip=1e9, expected=8, optimizer=torch.optim.SGD(params, lr=0.5))
    for param, old, grad, total in zip(params, before, grads, summed, strict=True):
        assert torch.allclose(grad, total / 8, atol=1e-6)
        assert torch.allclose(param.detach(), old - 0.5 * total / 8, atol=1e-6)


def test_the_noise_of_a_step_has_standard_deviation_noise_times_clip_over_the_expected_batch():
    """With every per-example gradient zero, the step's gradient is N(0, (sigma x clip / expected)^2) noise: over
    200k draws the sample standard deviation is within 1.5% of 2.0 x 0.5 / 4 (its standard error is 0.16%). An
    empty Poisson batch still takes a step: the noise alone, with the same deviation. The noise follows the
    client's secret seed: the same seed, the same draw; another seed, another draw."""
    param = torch.nn.Parameter(torch.zeros(400, 500))
    (noise,) = dp_step([param], [torch.zeros(3, 400, 500)], noise=2.0, clip=0.5, expected=4, seed=11)
    assert noise.double().std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.015)
    assert abs(noise.double().mean().item()) < 3 * 0.25 / math.sqrt(noise.numel())
    (empty,) = dp_step([param], [torch.zeros(0, 400, 500)], noise=2.0, clip=0.5, expected=4, seed=12)
    assert empty.double().std().item() == pytest.approx(0.25, rel=0.015)
    (again,) = dp_step([param], [torch.zeros(3, 400, 500)], noise=2.0, clip=0.5, expected=4, seed=11)
    assert torch.equal(again, noise) and not torch.equal(empty, noise)


def test_batches_are_poisson_samples_at_the_clients_rate():
    dp = DPSGD(noise=1.0, clip=1.0, rate=sample_rate(8, 200), secret=5)
    assert dp.rate == 0.04 and sample_rate(128, 100) == 1.0
    gen = dp.batches()
    sizes = [len(dp.batch(200, gen)) for _ in range(2000)]
    assert sum(sizes) / len(sizes) == pytest.approx(8, rel=0.03)  # expected batch q x n; sd of the mean 0.06
    assert 0 in sizes or min(sizes) <= 2  # sizes vary (Binomial(200, 0.04)), an empty batch is possible
    assert torch.equal(DPSGD(1.0, 1.0, 0.04, 5).batch(200, DPSGD(1.0, 1.0, 0.04, 5).batches()),
                       DPSGD(1.0, 1.0, 0.04, 5).batch(200, DPSGD(1.0, 1.0, 0.04, 5).batches()))


# -- accounting -----------------------------------------------------------------------------------------------

def test_a_clients_epsilon_is_the_librarys_for_the_same_steps_and_grows_with_them():
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(1.1)), 250)
    assert spent(1.1, 0.04, 250, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    dp = DPSGD(noise=1.1, clip=1.0, rate=0.04, secret=1)
    curve = []
    for _ in range(5):
        dp.took(50)
        curve.append(dp.report(1e-5)["record_epsilon"])
    assert curve == sorted(curve) and curve[0] < curve[-1] and curve[-1] == spent(1.1, 0.04, 250, 1e-5)
    assert spent(1.1, 0.04, 0, 1e-5) == 0.0


def test_each_client_is_calibrated_for_every_round_of_the_run(tiny_model, tmp_path):
    config = tiny_run_config(tiny_model, tmp_path, dp_unit="record", dp_clip=1.0, dp_epsilon=3.0, dp_delta=1e-5,
                             global_rounds=5, local_epochs=2, batch_size=8)
    assert planned_steps(config, 20) == 5 * 2 * 3
    noise = calibrated_noise(3.0, 1e-5, sample_rate(8, 20), 30)
    assert spent(noise, 0.4, 30, 1e-5) <= 3.0 + 1e-6
    assert spent(noise * 0.99, 0.4, 30, 1e-5) > 3.0 - 1e-2  # the smallest noise that meets the budget


# -- runs -----------------------------------------------------------------------------------------------------

RUN = ["run", "--tasks", "rotten_tomatoes:2", "snli:2", "--global_rounds", "3", "--warmup_rounds", "1",
       "--train_samples", "16", "--test_samples", "8", "--batch_size", "8", "--max_length", "24", "--no_progress"]


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "fedlease", "fedlease:paper"])
def test_a_record_level_run_writes_each_clients_accounting(tiny_model, tmp_path, method):
    """Through the command line: every client is calibrated for the run's 3 rounds x 2 epochs x 2 batches (and
    FedLEASE's data signature, with the embedding allocation) and spends its epsilon by the end; each round's train
    record carries the epsilon spent so far."""
    method, _, allocation = method.partition(":")
    out = tmp_path / (method + allocation)
    extra = ["--allocation", allocation or "embedding", "--num_experts", "2"] if method == "fedlease" else []
    signature = int(method == "fedlease" and not allocation)
    assert main([*RUN, "--model_name", tiny_model, "--method", method, "--output_dir", str(out), "--dp_unit",
                 "record", "--dp_clip", "0.5", "--dp_epsilon", "3", "--dp_delta", "1e-5", *extra]) == 0
    history = json.loads((out / "training_history.json").read_text())
    privacy = history["privacy"]
    assert privacy["unit"] == "record" and privacy["delta"] == 1e-5 and privacy["clip"] == 0.5
    assert "add or remove one example" in privacy["accountant"]
    assert set(privacy["clients"]) == {"0", "1", "2", "3"}
    for entry in privacy["clients"].values():
        assert entry["sample_rate"] == 0.5 and entry["steps"] == 3 * 2 * 2
        assert entry["signature_releases"] == signature
        assert entry["epsilon"] == pytest.approx(spent(entry["noise_multiplier"], 0.5, 12, 1e-5, signature))
        assert entry["noise_multiplier"] == pytest.approx(calibrated_noise(3.0, 1e-5, 0.5, 12, signature))
        assert 2.9 < entry["epsilon"] <= 3.0 + 1e-6
    assert privacy["epsilon"] == max(e["epsilon"] for e in privacy["clients"].values())
    spent_by_round = [r["clients"]["0"]["train"]["record_epsilon"] for r in history["rounds"]]
    assert spent_by_round == sorted(spent_by_round) and spent_by_round[-1] == privacy["clients"]["0"]["epsilon"]
    log = (out / "training_log.txt").read_text()
    assert log.count("the largest epsilon a client spent is") == 3 and "DP-SGD on every client" in log
    store = load_file(out / "clients" / "0" / "round-2.safetensors")
    assert int(store[STEPS]) == 12 and float(store[NOISE]) == privacy["clients"]["0"]["noise_multiplier"]


@pytest.mark.parametrize("method,steps", [("fedsa_lora", 12), ("ifca", 12), ("feddpa", 4 + 8 + 8)])
def test_every_other_method_trains_with_dp_sgd_and_counts_every_local_call(tiny_model, tmp_path, method, steps):
    """FedDPA trains its local adapter too from round 2 on (two DP-SGD calls a round, and planned as two)."""
    config = tiny_run_config(tiny_model, tmp_path / method, method=method, train_samples=16, batch_size=8,
                             dp_unit="record", dp_clip=0.5, dp_epsilon=4.0, dp_delta=1e-5,
                             num_clusters=2 if method == "ifca" else 4)
    run(config, progress=False)
    privacy = json.loads((tmp_path / method / "training_history.json").read_text())["privacy"]
    calls = 2 if method == "feddpa" else 1
    for entry in privacy["clients"].values():
        assert entry["steps"] == steps
        assert entry["noise_multiplier"] == pytest.approx(calibrated_noise(4.0, 1e-5, 0.5, 3 * calls * 4))
        assert entry["epsilon"] <= 4.0 + 1e-6


def test_fedleases_signature_is_released_once_with_noise_sigma_over_n_and_charged(tiny_clients):
    """Under record-level DP the data signature (clipped embeddings summed per class, over the public count n) gets
    Gaussian noise of standard deviation sigma / n (one example moves it by at most 1/n), is charged once in the
    client's accountant, and is kept: a later round neither recomputes nor charges it again."""
    from dataclasses import replace

    from fedlease.methods.fedlease import SIGNATURE, FedLease, data_signature

    config, clients, infos = tiny_clients
    method = FedLease(replace(config, dp_unit="record", dp_clip=1.0, dp_noise=40.0), infos)
    client = clients[0]
    clean = data_signature(client, config.seed, method.signature_blocks(), clip_examples=True)
    stores = [{"privacy.secret": torch.tensor(1)}, {"privacy.secret": torch.tensor(2)}]
    noise = []
    for store in stores:
        client.record = dp = DPSGD(noise=40.0, clip=1.0, rate=0.3, secret=0)
        try:
            method.keep_signature(client, store, method.signature_blocks())
            method.keep_signature(client, store, method.signature_blocks())
        finally:
            client.record = None
        assert dp.releases == 1 and dp.report(1e-5)["dp_round_releases"] == 1
        noise.append(store[SIGNATURE] - clean)
    sd = 40.0 / client.num_train
    draws = torch.cat(noise)
    assert draws.numel() >= 150  # 2 x blocks x hidden: the sample deviation's standard error is under 6%
    assert draws.std().item() == pytest.approx(sd, rel=0.2)
    assert not torch.equal(noise[0], noise[1])  # each client's own secret draws its noise
    assert clean.norm() <= 1 + 1e-6


def test_fit_takes_dp_sgd_steps_only_in_record_mode(tiny_model, tmp_path, monkeypatch):
    """DP off and client-level DP never reach DP-SGD (their results stay what they were); record mode trains
    every local call with it, and its noise comes from each client's secret, not the public seed."""
    calls = []
    original = LocalClient.fit_private
    monkeypatch.setattr(LocalClient, "fit_private", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for name, dp in (("off", {}), ("client", dict(dp_clip=0.1, dp_noise=0.5, dp_unit="client"))):
        run(tiny_run_config(tiny_model, tmp_path / name, method="fedit", global_rounds=2, **dp), progress=False)
    assert not calls
    assert not record_level(tiny_run_config(tiny_model, tmp_path, dp_clip=0.1, dp_noise=0.5))
    for name in ("a", "b"):
        run(tiny_run_config(tiny_model, tmp_path / name, method="fedit", global_rounds=2, dp_unit="record",
                            dp_clip=0.5, dp_noise=1.0), progress=False)
    assert len(calls) == 2 * 2 * 4  # two runs, two rounds, four clients
    a, b = (load_file(tmp_path / name / "final" / "client_0.safetensors") for name in ("a", "b"))
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_B" in k)  # each run's clients draw their own noise


def test_default_dp_unit_is_client_and_leaves_results_bit_identical(tiny_model, tmp_path):
    """--dp_unit client, given or not, is the same run to the bit (with DP off and with client-level DP)."""
    for dp in ({}, dict(dp_clip=0.1, dp_noise=0.0001)):
        outs = []
        for name, unit in (("default", {}), ("explicit", {"dp_unit": "client"})):
            out = tmp_path / f"{name}{len(dp)}"
            run(tiny_run_config(tiny_model, out, method="fedit", global_rounds=2, **dp, **unit), progress=False)
            outs.append(out)
        if not dp:  # client-level DP draws its server noise from a per-run secret: compare DP off to the bit
            a, b = (load_file(o / "final" / "client_1.safetensors") for o in outs)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            privacy = [json.loads((o / "training_history.json").read_text())["privacy"] for o in outs]
            assert privacy[0] == privacy[1] and "unit" not in privacy[0]


def test_an_instruction_client_trains_with_dp_sgd(tiny_causal_lm, tmp_path):
    config = tiny_instruction_config(tiny_causal_lm, tmp_path / "lm", method="fedit", global_rounds=2,
                                     train_samples=6, test_samples=2, batch_size=4, dp_unit="record", dp_clip=1.0,
                                     dp_noise=0.8)
    run(config, progress=False)
    privacy = json.loads((tmp_path / "lm" / "training_history.json").read_text())["privacy"]
    assert privacy["unit"] == "record" and len(privacy["clients"]) == 4
    assert all(e["steps"] == 2 * 2 * 2 and e["noise_multiplier"] == 0.8 for e in privacy["clients"].values())


@pytest.mark.parametrize("point", ["round:2", "fit:7"])
def test_a_record_level_run_resumes_with_the_same_accounting_and_results(tiny_model, tmp_path, point,
                                                                          monkeypatch):
    """Killed after round 2's artifacts, or during round 2's training of its third client, and resumed: every
    client's steps, noise and epsilon are the uninterrupted run's, and so are its results and final weights (the
    batches and the noise follow each client's secret and step count, which its store keeps). The clients'
    secrets are drawn at random in every run: both runs pin the same draws, or their noise would differ."""
    from kill_harness import pin_secrets

    from fedlease.methods import base

    args = [*RUN, "--model_name", tiny_model, "--method", "fedit", "--dp_unit", "record", "--dp_clip", "0.5",
            "--dp_noise", "0.9"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    monkeypatch.setattr(base, "secrets", pin_secrets(7))
    assert main([*args, "--output_dir", str(whole)]) == 0
    proc = subprocess.run([sys.executable, str(HARNESS), point, *args, "--output_dir", str(cut)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_HARNESS_SECRETS": "7"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    monkeypatch.setattr(base, "secrets", pin_secrets(8))  # a resumed run draws no secret: its stores keep them
    assert main(["run", "--resume", str(cut), "--no_progress"]) == 0
    a, b = (json.loads((p / "training_history.json").read_text()) for p in (whole, cut))
    assert a["privacy"] == b["privacy"] and a["privacy"]["clients"]["3"]["steps"] == 12
    assert [r["mean"] for r in a["rounds"]] == [r["mean"] for r in b["rounds"]]
    for name in ("client_0.safetensors", "client_3.safetensors"):
        x, y = (load_file(p / "final" / name) for p in (whole, cut))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (["--dp_unit", "record"], "--dp_unit record without --dp_clip"),
    (["--dp_unit", "record", "--dp_noise", "1"], "--dp_unit record --dp_noise without --dp_clip"),
    (["--dp_unit", "record", "--dp_clip", "1", "--dp_noise", "1", "--method", "local"], "nothing to protect"),
    (["--dp_unit", "record", "--dp_clip", "1", "--dp_noise", "1", "--method", "fedit", "--max_update_norm", "1"],
     "--max_update_norm with --dp_unit record"),
    (["--dp_unit", "record", "--dp_clip", "1", "--dp_noise", "1", "--method", "fedit", "--dp_delta", "0.2"],
     "at least 1/8 training examples"),
    (["--dp_unit", "record", "--dp_clip", "1", "--method", "fedit"], "needs --dp_noise"),
    (["--dp_unit", "record", "--dp_clip", "1", "--method", "fedit", "--dp_epsilon", "3"], "needs --dp_delta"),
    (["--dp_unit", "record", "--dp_clip", "-1", "--dp_noise", "1", "--method", "fedit"], "must be a positive"),
    (["--dp_unit", "sample", "--dp_clip", "1", "--dp_noise", "1"], "invalid choice"),
])
def test_bad_record_level_settings_are_one_line_exit_2_and_nothing_written(capsys, tmp_path, flags, fragment):
    out = tmp_path / "out"
    code = main(["run", "--tasks", "snli:4", "--output_dir", str(out), "--no_progress", "--global_rounds", "2",
                 "--warmup_rounds", "1", "--train_samples", "8", "--test_samples", "4", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and fragment in err[-1], err
    assert not out.exists()


def test_an_unknown_unit_from_python_is_refused():
    from fedlease.config import RunConfig
    from fedlease.privacy import check_privacy

    with pytest.raises(ConfigError, match="--dp_unit must be one of client, record"):
        check_privacy(RunConfig(dp_unit="example", dp_clip=1.0, dp_noise=1.0))


def test_8bit_weights_with_record_level_dp_are_refused_unless_fp32():
    from fedlease.config import RunConfig

    # 8-bit computes under fp16 autocast (auto), which DP-SGD here cannot scale: refused before anything loads
    for precision in ("auto", "fp16"):
        with pytest.raises(ConfigError, match="--precision fp32"):
            RunConfig(dp_unit="record", dp_clip=1.0, dp_noise=1.0, quantization="8bit", precision=precision).validate()
    RunConfig(dp_unit="record", dp_clip=1.0, dp_noise=1.0, quantization="8bit", precision="fp32").validate()
    RunConfig(dp_unit="client", dp_clip=1.0, dp_noise=1.0, quantization="8bit").validate()


def test_fp16_loss_scaling_is_refused_in_record_mode(tiny_clients):
    from dataclasses import replace

    _, clients, _ = tiny_clients
    client = clients[0]
    saved = client.settings
    client.settings = replace(saved, amp_dtype=torch.float16)
    client.record = DPSGD(noise=1.0, clip=1.0, rate=0.5, secret=1)
    try:
        with pytest.raises(ConfigError, match="--precision bf16 or fp32"):
            client.fit(("lora_B",), seed=0)
    finally:
        client.settings, client.record = saved, None


def test_the_ledger_charges_the_steps_of_an_update_that_never_arrived():
    """A client's running count says it took steps in a round whose update the server never saw (a reply past the
    round's timeout): they are charged when its next update arrives; a client that lost its count is not
    uncharged."""
    from fedlease.config import RunConfig
    from fedlease.methods.base import Update
    from fedlease.privacy.record import RecordLedger

    ledger = RecordLedger(RunConfig(dp_clip=1.0, dp_noise=1.0, dp_unit="record"))

    def update(steps: int, round_steps: int, releases: int = 0, round_releases: int = 0) -> Update:
        return Update({}, 1, {"dp_noise": 1.0, "dp_sample_rate": 0.5, "dp_steps": steps, "dp_round_steps": round_steps,
                              "dp_releases": releases, "dp_round_releases": round_releases})

    ledger.observe({0: update(4, 4, 1, 1), 1: update(4, 4)})
    ledger.observe({1: update(8, 4)})  # client 0's round-2 update did not arrive
    ledger.observe({0: update(12, 4, 1, 0), 1: update(12, 4)})
    assert ledger.clients[0]["steps"] == ledger.clients[1]["steps"] == 12
    assert ledger.clients[0]["signature_releases"] == 1
    ledger.observe({1: update(4, 4)})  # client 1's node lost its state and started again
    assert ledger.clients[1]["steps"] == 16
    assert ledger.epsilon_of(0) == pytest.approx(spent(1.0, 0.5, 12, 1e-5, 1))
    assert set(ledger.record()["clients"]["0"]) == {"noise_multiplier", "sample_rate", "steps", "signature_releases",
                                                    "epsilon"}
