"""The expert layer: router semantics, equivalence with plain LoRA, vectorised = naive, what trains."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedlease.model.experts import (
    AdaptedModel,
    ExpertLayout,
    ExpertLinear,
    inject_experts,
    own_expert_from_bank,
    route,
)
from fedlease.seeding import generator


def make_layer(d_in=16, d_out=12, rank=4, alpha=16.0, dropout=0.0, seed=0) -> ExpertLinear:
    torch.manual_seed(seed)
    return ExpertLinear(nn.Linear(d_in, d_out), rank, alpha, dropout)


def randomize(layer: ExpertLinear, layout: ExpertLayout, seed=1) -> None:
    layer.configure(layout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (layer.lora_A, layer.lora_B, layer.experts_A, layer.experts_B):
            t.copy_(torch.randn(t.shape, generator=g))
        if layer.router is not None:
            layer.router.copy_(torch.randn(layer.router.shape, generator=g))


@pytest.mark.parametrize("m", [2, 3, 4, 8])
def test_adaptive_routing_always_keeps_the_own_expert(m):
    torch.manual_seed(m)
    for own in range(m):
        layout = ExpertLayout(num_experts=m, own_expert=own, routing="adaptive")
        logits = torch.randn(64, 50, layout.num_slots) * 3
        weights = route(logits, layout)
        assert weights.shape == (64, 50, m)
        torch.testing.assert_close(weights.sum(-1), torch.ones(64, 50))
        assert (weights[..., own] > 0).all(), "own expert must be selected for every token"
        distinct = (weights > 0).sum(-1)
        assert distinct.min() >= 1 and distinct.max() <= m
        # adaptive: with random logits some tokens use only their own expert and some use several
        assert distinct.min() < distinct.max()


def test_route_matches_hand_computation():
    # M=2, own expert 1: slots (0 -> e0, 1 -> e1, 2 -> e1). probs (0.5, 0.2, 0.3): top-2 slots 0 and 2.
    layout = ExpertLayout(num_experts=2, own_expert=1, routing="adaptive")
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    weights = route(logits, layout)
    torch.testing.assert_close(weights, torch.tensor([[0.5 / 0.8, 0.3 / 0.8]]))
    # the own expert wins all kept slots when the extra slots dominate
    logits = torch.log(torch.tensor([[0.1, 0.45, 0.45]]))
    torch.testing.assert_close(route(logits, layout), torch.tensor([[0.0, 1.0]]))


def test_fixed_topk_routing_keeps_k_experts():
    layout = ExpertLayout(num_experts=4, own_expert=2, routing="topk", top_k=2)
    logits = torch.randn(100, 4)
    weights = route(logits, layout)
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(100))
    chosen = logits.topk(2, dim=-1).indices
    assert torch.equal((weights > 0).nonzero()[:, 1].view(100, 2).sort(-1).values, chosen.sort(-1).values)


def test_top1_routing_keeps_the_raw_probability_and_trains_the_router():
    layout = ExpertLayout(num_experts=3, own_expert=1, routing="topk", top_k=1)
    logits = torch.randn(50, 3)
    weights = route(logits, layout)
    # Switch Transformers: the chosen expert is scaled by its gate probability, not renormalised to 1
    torch.testing.assert_close(weights.max(-1).values, logits.softmax(-1).max(-1).values)
    assert ((weights > 0).sum(-1) == 1).all()
    layer = make_layer()
    randomize(layer, layout)
    layer(torch.randn(4, 5, 16)).pow(2).sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0


def naive_route(logits: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """The routing as the paper's code writes it: top-k slots, renormalised (k > 1), added up per expert."""
    probs = logits.softmax(dim=-1)
    top_p, top_slot = probs.topk(layout.kept_slots, dim=-1)
    if layout.kept_slots > 1:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    weights = probs.new_zeros(*probs.shape[:-1], layout.num_experts)
    return weights.scatter_add(-1, layout.slot_to_expert()[top_slot], top_p)


@pytest.mark.parametrize("layout", [ExpertLayout(num_experts=4, own_expert=2, routing="adaptive"),
                                    ExpertLayout(num_experts=3, own_expert=0, routing="topk", top_k=2),
                                    ExpertLayout(num_experts=3, own_expert=1, routing="topk", top_k=1)])
def test_route_equals_the_top_k_slots_added_up_per_expert(layout):
    logits = torch.randn(40, 9, layout.num_slots) * 2
    torch.testing.assert_close(route(logits, layout), naive_route(logits, layout))


def test_tied_slots_keep_exactly_k_and_a_kept_slot_its_probability():
    # bf16 router logits tie now and then: still exactly k slots, and one kept slot weighs its probability once
    logits = torch.zeros(5, 7)
    adaptive = ExpertLayout(num_experts=4, own_expert=2, routing="adaptive")
    torch.testing.assert_close(route(logits, adaptive), naive_route(logits, adaptive))
    assert ((route(logits, adaptive) > 0).sum(-1) <= 4).all()
    top1 = ExpertLayout(num_experts=3, own_expert=0, routing="topk", top_k=1)
    tied = torch.tensor([[2.0, 2.0, 0.0]])
    torch.testing.assert_close(route(tied, top1).sum(-1), tied.softmax(-1).max(-1).values)


def test_a_layer_configured_while_evaluating_trains_and_any_float_dtype_runs():
    layer = make_layer()
    with torch.inference_mode():
        randomize(layer, ExpertLayout(num_experts=3, own_expert=1, routing="adaptive"))
    layer.router.requires_grad_(True)
    layer(torch.randn(2, 5, 16)).pow(2).sum().backward()  # nothing it keeps is an inference tensor
    assert layer.router.grad.abs().sum() > 0
    layer.double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)


def naive_forward(layer: ExpertLinear, x: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k B_k A_k x with a Python loop over experts: the definition, not the implementation."""
    layout = layer.layout
    experts_A = layer.experts_A.clone()
    experts_B = layer.experts_B.clone()
    experts_A[layout.own_expert] = layer.lora_A
    experts_B[layout.own_expert] = layer.lora_B
    weights = naive_route(x @ layer.router.t(), layout)
    out = layer.base(x)
    for k in range(layout.num_experts):
        out = out + weights[..., k : k + 1] * (x @ experts_A[k].t() @ experts_B[k].t()) * layer.scaling
    return out


@pytest.mark.parametrize("m,own,routing", [(2, 0, "adaptive"), (4, 3, "adaptive"), (8, 5, "adaptive"),
                                           (4, 1, "topk")])
def test_vectorised_forward_equals_naive_loop(m, own, routing):
    layer = make_layer()
    randomize(layer, ExpertLayout(num_experts=m, own_expert=own, routing=routing, top_k=2))
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_the_forward_follows_every_change_of_the_bank_it_keeps_in_its_own_layout():
    # the B bank's (d_out, M*r) layout is kept between steps: an in-place load, a new layout and a moved own
    # expert must each reach the next forward
    layer = make_layer()
    model = AdaptedModel(nn.Sequential(layer), {"0": layer}, head_names=[])
    randomize(layer, ExpertLayout(num_experts=4, own_expert=1, routing="adaptive"))
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        layer(x)
        g = torch.Generator().manual_seed(5)
        model.load_state({"0.experts_B": torch.randn(layer.experts_B.shape, generator=g)})  # copy_ in place
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)
        layer.experts_B[2].mul_(3.0)
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)
        randomize(layer, ExpertLayout(num_experts=4, own_expert=3, routing="adaptive"), seed=7)
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)
        randomize(layer, ExpertLayout(num_experts=2, own_expert=0, routing="adaptive"), seed=8)
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)
    # a layout made while evaluating (inference mode) serves training: the own expert gets its gradient
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    with torch.inference_mode():
        layer(x)
    layer(x).pow(2).sum().backward()
    grads = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.lora_A.grad = layer.lora_B.grad = None
    naive_forward(layer, x).pow(2).sum().backward()
    torch.testing.assert_close(grads, (layer.lora_A.grad, layer.lora_B.grad), rtol=1e-5, atol=1e-3)
    with torch.inference_mode():  # a bank made in inference mode keeps no version: used as it is each time
        layer.configure(ExpertLayout(num_experts=3, own_expert=2, routing="adaptive"))
        layer.router.normal_()  # a zero router ties every slot: top-k would pick among them by position
        layer.experts_A.normal_()
        layer.experts_B.normal_()
        first = layer(x)
        layer.experts_B.normal_()
        torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first, layer(x))


def test_single_expert_without_router_is_exactly_peft_lora():
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(16, 12)

        def forward(self, x):
            return self.query(x)

    torch.manual_seed(0)
    block = Block()
    reference = peft.get_peft_model(Block(), peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules=["query"]))
    reference.base_model.model.query.base_layer.load_state_dict(block.query.state_dict())
    with torch.no_grad():
        reference.base_model.model.query.lora_B["default"].weight.normal_()
    sites = inject_experts(block, ["query"], rank=4, alpha=16, dropout=0.0)
    layer = sites["query"]
    assert layer.router is None and layer.layout == ExpertLayout()
    with torch.no_grad():
        layer.lora_A.copy_(reference.base_model.model.query.lora_A["default"].weight)
        layer.lora_B.copy_(reference.base_model.model.query.lora_B["default"].weight)
    x = torch.randn(5, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x), rtol=1e-6, atol=1e-6)
    assert layer.scaling == 4.0


def test_only_own_expert_router_and_head_receive_updates():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("query", nn.Linear(16, 16))
    model.add_module("classifier", nn.Linear(16, 3))
    sites = inject_experts(model, ["query"], rank=4, alpha=16, dropout=0.0)
    adapted = AdaptedModel(model, sites, ["classifier.weight", "classifier.bias"])
    layout = ExpertLayout(num_experts=3, own_expert=1, routing="adaptive")
    randomize(sites["query"], layout)
    before = {k: v.clone() for k, v in adapted.tensors(["lora_A", "lora_B", "router", "experts", "head"]).items()}
    base_before = sites["query"].base.weight.clone()
    params = adapted.set_trainable(["lora_A", "lora_B", "router", "head"])
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = adapted.tensors(["lora_A", "lora_B", "router", "experts", "head"])
    for key in ("query.lora_A", "query.lora_B", "query.router", "head.classifier.weight"):
        assert not torch.equal(before[key], after[key]), key
    for key in ("query.experts_A", "query.experts_B"):
        torch.testing.assert_close(before[key], after[key])  # the frozen bank never moves
    torch.testing.assert_close(base_before, sites["query"].base.weight)


def test_own_expert_is_taken_from_its_bank_slot_unless_sent():
    layout = ExpertLayout(num_experts=3, own_expert=2, routing="adaptive")
    bank_A, bank_B = torch.randn(3, 4, 16), torch.randn(3, 12, 4)
    own = own_expert_from_bank({"q.experts_A": bank_A, "q.experts_B": bank_B, "q.router": torch.randn(5, 16)},
                               layout)
    assert set(own) == {"q.lora_A", "q.lora_B"}
    assert torch.equal(own["q.lora_A"], bank_A[2]) and torch.equal(own["q.lora_B"], bank_B[2])
    sent = {"q.experts_A": bank_A, "q.experts_B": bank_B, "q.lora_A": bank_A[0], "q.lora_B": bank_B[0]}
    assert own_expert_from_bank(sent, layout) == {}  # an own expert given with the bank is kept as given


def test_configure_and_load_state_check_shapes():
    layer = make_layer()
    model = nn.Module()
    model.query = layer.base
    sites = inject_experts(model, ["query"], rank=4, alpha=16, dropout=0.0)
    adapted = AdaptedModel(model, sites, [])
    adapted.configure(ExpertLayout(num_experts=3, own_expert=0, routing="adaptive"))
    assert sites["query"].router.shape == (5, 16)
    assert sites["query"].experts_A.shape == (3, 4, 16)
    with pytest.raises(ValueError, match="shape"):
        adapted.load_state({"query.router": torch.zeros(4, 16)})
    with pytest.raises(KeyError):
        adapted.load_state({"query.unknown": torch.zeros(1)})
    adapted.configure(ExpertLayout())
    assert sites["query"].router is None
    with pytest.raises(KeyError):
        adapted.load_state({"query.router": torch.zeros(5, 16)})


def test_initial_state_is_seeded_and_shared():
    layer = make_layer()
    model = nn.Module()
    model.query = layer.base
    model.classifier = nn.Linear(16, 2)
    sites = inject_experts(model, ["query"], rank=4, alpha=16, dropout=0.0)
    adapted = AdaptedModel(model, sites, ["classifier.weight", "classifier.bias"])
    first, again, other = adapted.initial_state(7), adapted.initial_state(7), adapted.initial_state(8)
    for key in first:
        torch.testing.assert_close(first[key], again[key])
    assert not torch.equal(first["query.lora_A"], other["query.lora_A"])
    assert torch.count_nonzero(first["query.lora_B"]) == 0
    bound = 1 / math.sqrt(16)  # kaiming-uniform with a=sqrt(5) on fan_in 16
    assert first["query.lora_A"].abs().max() <= bound


def test_a_new_head_starts_as_its_modules_own_initialisation():
    model = nn.Module()
    model.query = nn.Linear(16, 16)
    model.head = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    model.classifier = nn.Linear(16, 2)
    sites = inject_experts(model, ["query"], rank=4, alpha=16, dropout=0.0)
    names = ["head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "classifier.weight", "classifier.bias"]
    state = AdaptedModel(model, sites, names).initial_state(7)
    assert torch.equal(state["head.head.1.weight"], torch.ones(16))  # a LayerNorm that outputs something
    for bias in ("head.0.bias", "head.1.bias", "classifier.bias"):
        assert torch.count_nonzero(state[f"head.{bias}"]) == 0
    for matrix in ("head.0.weight", "classifier.weight"):  # the same seeded draw as before
        expected = torch.zeros(state[f"head.{matrix}"].shape).normal_(0.0, 0.02, generator=generator(7, "head", matrix))
        assert torch.equal(state[f"head.{matrix}"], expected)


@pytest.mark.parametrize("bad", [dict(num_experts=2, routing="none"), dict(num_experts=2, own_expert=2,
                                 routing="adaptive"), dict(num_experts=3, routing="topk", top_k=4),
                                 dict(routing="sparse")])
def test_invalid_layouts_are_refused(bad):
    with pytest.raises(ValueError):
        ExpertLayout(**bad)


@pytest.mark.parametrize("routing", ["adaptive", "fixed"])
def test_the_expert_layer_compiles_into_one_graph_with_the_same_output(routing):
    """torch.compile (what a static generation cache gets on CUDA) traces the layer without a graph break: the B
    bank's cached layout is made inside the graph there. fullgraph=True raises at any break."""
    layer = make_layer()
    layout = ExpertLayout(num_experts=3, own_expert=2, routing=routing)
    randomize(layer, layout)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


def test_one_compiled_graph_serves_every_own_expert_and_trains_as_the_eager_layer():
    """Clients of different clusters differ by their own expert only: a compiled layer (a static generation cache on
    CUDA, a compiled training step) must not compile again for each of them, and its gradients must be the eager
    layer's. Before the own expert's rows were a tensor, the graph sliced at their Python offsets, and every own
    expert compiled a graph of its own."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):  # AOTAutograd's forward and backward graphs, as inductor gets them
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    layer = make_layer()
    compiled = torch.compile(layer, backend=counting, fullgraph=True, dynamic=False)
    x = torch.randn(2, 5, 16)
    for own in range(3):
        randomize(layer, ExpertLayout(num_experts=3, own_expert=own, routing="adaptive"), seed=own)
        results = []
        for forward in (compiled, layer):
            params = (layer.lora_A, layer.lora_B, layer.router)
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            out = forward(x)
            out.square().sum().backward()
            results.append((out.detach(), [p.grad.clone() for p in params]))
        (out, grads), (eager_out, eager_grads) = results
        torch.testing.assert_close(out, eager_out)
        for g, eager_g in zip(grads, eager_grads, strict=True):
            assert eager_g.abs().sum() > 0
            torch.testing.assert_close(g, eager_g)
    assert len(graphs) == 1
